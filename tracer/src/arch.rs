//! x86-64 specifics of user space, gathered: reading machine code the target runs. (The
//! kernel side has its own in `tracer-ebpf/src/arch.rs`; the DWARF unwinder's registers are
//! framehop's x86-64 unwinder, in `stacks/unwind`; the page size is `model::PAGE`.)

/// Offset of the first instruction past a leading `test %rdi,%rdi; je <out>` when that instruction
/// is a `push` (emulated by the kernel's uprobe code, no single-step), else 0 (the entry).
///
/// At that site neither %rdi nor %rsp has changed, so the probe reads the same argument; only
/// `free(NULL)`, a no-op, skips it.
pub fn after_null_check(code: &[u8]) -> u64 {
    let mut i = 0usize;
    if code.starts_with(&[0xf3, 0x0f, 0x1e, 0xfa]) {
        i = 4; // endbr64
    }
    if code.get(i..i + 3) != Some(&[0x48, 0x85, 0xff]) {
        return 0; // not `test %rdi,%rdi`
    }
    i += 3;
    let target = match code.get(i..) {
        Some([0x74, rel, ..]) => (i + 2) as i64 + i64::from(*rel as i8),
        Some([0x0f, 0x84, a, b, c, d, ..]) => {
            (i + 6) as i64 + i64::from(i32::from_le_bytes([*a, *b, *c, *d]))
        }
        _ => return 0,
    };
    i += if code[i] == 0x74 { 2 } else { 6 };
    if target <= i as i64 {
        return 0; // the NULL path must leave forwards, past the site
    }
    let is_push = match code.get(i..) {
        Some([op, ..]) if (0x50..=0x57).contains(op) => true,
        Some([0x41, op, ..]) if (0x50..=0x57).contains(op) => true,
        _ => false,
    };
    if is_push { i as u64 } else { 0 }
}

/// Whether `code`, the 7 bytes before a return address, ends with an x86-64 call instruction:
/// `call rel32` (e8), `call *disp32(%rip)` (ff 15), `call *%reg` (ff d0-d7, 41 ff d0-d7),
/// `call *disp8(%reg)` (ff 50-57 xx), `call *disp32(%reg)` (ff 90-97 xxxxxxxx).
pub fn is_call_before(code: &[u8; 7]) -> bool {
    let modrm_call = |m: u8| (m & 0x38) == 0x10; // reg field 2: CALL r/m64
    code[2] == 0xe8
        || (code[1] == 0xff && code[2] == 0x15)
        || (code[5] == 0xff && modrm_call(code[6]) && code[6] >= 0xc0)
        || (code[4] == 0xff && (0x50..=0x57).contains(&code[5]))
        || (code[1] == 0xff && (0x90..=0x97).contains(&code[2]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_push_after_glibc_free_null_check() {
        // glibc 2.36 free: test %rdi,%rdi; je rel32; push %rbp
        let code = [
            0x48, 0x85, 0xff, 0x0f, 0x84, 0x80, 0, 0, 0, 0x55, 0x48, 0x89, 0xe5,
        ];
        assert_eq!(after_null_check(&code), 9);
        // endbr64; test; je rel8; push %r12
        let code = [
            0xf3, 0x0f, 0x1e, 0xfa, 0x48, 0x85, 0xff, 0x74, 0x20, 0x41, 0x54,
        ];
        assert_eq!(after_null_check(&code), 9);
    }

    #[test]
    fn falls_back_to_the_entry() {
        // push at entry: nothing to skip
        assert_eq!(after_null_check(&[0x55, 0x48, 0x89, 0xe5]), 0);
        // test; je; mov (not emulated) -> entry
        assert_eq!(
            after_null_check(&[0x48, 0x85, 0xff, 0x74, 0x10, 0x48, 0x8b, 0x07]),
            0
        );
        // backwards jump -> entry
        assert_eq!(after_null_check(&[0x48, 0x85, 0xff, 0x74, 0xf0, 0x55]), 0);
        assert_eq!(after_null_check(&[]), 0);
    }

    #[test]
    fn recognizes_call_instructions_before_return_addresses() {
        // call rel32
        assert!(is_call_before(&[0x90, 0x90, 0xe8, 1, 2, 3, 4]));
        // call *0x10(%rip)
        assert!(is_call_before(&[0x90, 0xff, 0x15, 1, 2, 3, 4]));
        // call *%rax ; call *%r8 (41 ff d0)
        assert!(is_call_before(&[0, 0, 0, 0, 0, 0xff, 0xd0]));
        assert!(is_call_before(&[0, 0, 0, 0, 0x41, 0xff, 0xd0]));
        // call *0x8(%rax)
        assert!(is_call_before(&[0, 0, 0, 0, 0xff, 0x50, 0x08]));
        // data: a pointer-looking word on the stack, or jmp *%rax (ff e0)
        assert!(!is_call_before(&[0x48, 0x89, 0xe5, 0x48, 0x83, 0xec, 0x10]));
        assert!(!is_call_before(&[0, 0, 0, 0, 0, 0xff, 0xe0]));
    }
}
