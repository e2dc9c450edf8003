//! Known answers of the fixtures: what the `leaks` scenario leaks, the page size of mapping
//! figures, the C library frames that may stand before a mapping's caller.

use super::Totals;

/// Leaking functions of the `leaks` scenario: (function, blocks, requested bytes per block).
pub const LEAKS: [(&str, u64, u64); 9] = [
    ("leak_malloc", 10, 100),
    ("leak_calloc", 11, 3 * 70),
    ("leak_realloc", 12, 300),
    ("leak_reallocarray", 13, 5 * 80),
    ("leak_posix_memalign", 14, 500),
    ("leak_aligned_alloc", 15, 640),
    ("leak_memalign", 16, 700),
    ("leak_valloc", 17, 1000),
    ("leak_pvalloc", 18, 1100),
];

/// Totals of the `leaks` scenario: 76710 bytes in 126 blocks, nothing freed.
pub fn leaks_totals() -> Totals {
    let bytes: u64 = LEAKS.iter().map(|(_, n, size)| n * size).sum();
    let count: u64 = LEAKS.iter().map(|(_, n, _)| n).sum();
    assert_eq!((bytes, count), (76710, 126));
    Totals {
        live_bytes: bytes,
        live_count: count,
        peak_bytes: bytes,
        allocated_bytes: bytes,
        allocated_count: count,
        freed_count: 0,
    }
}

/// The page size: mapping figures are whole pages.
pub fn page() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    assert!(size > 0, "sysconf(_SC_PAGESIZE) failed");
    size as u64
}

/// C library functions that may stand between a memory system call and the function that asked
/// for it: the system-call wrappers (their caller is recovered as the next frame) and thread
/// creation (which maps the thread's stack).
pub const LIBC_FRAMES: [&str; 20] = [
    "mmap",
    "mmap64",
    "__mmap",
    "__mmap64",
    "munmap",
    "__munmap",
    "mremap",
    "__mremap",
    "mprotect",
    "__mprotect",
    "syscall",
    "brk",
    "__brk",
    "sbrk",
    "__sbrk",
    "pthread_create",
    "pthread_create@@GLIBC_2.34",
    "pthread_create@GLIBC_2.2.5",
    "__pthread_create_2_1",
    "allocate_stack",
];

/// Whether `frame` is a C library frame: one of `LIBC_FRAMES`, glibc's internal alias of one
/// (`__GI___mmap64`), or an unnamed libc address.
pub fn is_libc_frame(frame: &str) -> bool {
    LIBC_FRAMES.contains(&frame)
        || frame.starts_with("__GI_")
        || frame.starts_with("[unknown] libc.so")
}
