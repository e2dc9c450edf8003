//! Decoding ring-buffer records into events.

use std::mem::size_of;

use tracer_common::{
    AllocEvent, CudaCallEvent, FaultEvent, FreeEvent, MapEvent, ProcEvent, STACK_COPY,
    StackCopyHeader, StackEvent, TorchEvent, event_kind,
    python::{PY_FRAMES_MASK, PY_FRAMES_SHIFT, PyRawFrame},
};

/// A decoded ring record; stacks borrow the record's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event<'a> {
    Alloc(AllocEvent, RawStack<'a>),
    /// The stack of a key the kernel's heap ledger counts (`AllocEvent::stack_key`), with the
    /// call that first made it (counted in the kernel, not here).
    HeapStack(AllocEvent, RawStack<'a>),
    Free(FreeEvent),
    Map(MapEvent, RawStack<'a>),
    Proc(ProcEvent),
    Fault(FaultEvent, RawStack<'a>),
    CudaCall(CudaCallEvent, RawStack<'a>),
    /// PyTorch's caching allocator; the stack is empty for releases.
    Torch(TorchEvent, RawStack<'a>),
}

/// The user stack that follows an event in its record, as the kernel took it: `u64` addresses,
/// innermost first, or (`STACK_COPY`) a copy of the stack to unwind; then Python frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawStack<'a> {
    bytes: &'a [u8],
    /// Python frames (`PyRawFrame`s) recorded after the stack.
    python: &'a [u8],
    /// The event's `stack_flags` (`STACK_TRUNCATED`, `STACK_SP_CANDIDATE`, `STACK_COPY`, the
    /// Python frame count).
    pub flags: u16,
}

impl<'a> RawStack<'a> {
    /// The registers and bytes of a stack copy, if the record carries one.
    pub fn copy(&self) -> Option<(StackCopyHeader, &'a [u8])> {
        if self.flags & STACK_COPY == 0 {
            return None;
        }
        let header: StackCopyHeader = read_pod(self.bytes)?;
        Some((header, self.bytes.get(size_of::<StackCopyHeader>()..)?))
    }

    /// The stack that follows `event` in `record`: `nframes` addresses, or a copy (its header
    /// says how long).
    fn after<E: StackEvent>(record: &'a [u8], event: &E) -> Option<RawStack<'a>> {
        let start = size_of::<E>();
        let flags = event.stack_flags();
        let end = if flags & STACK_COPY != 0 {
            let header: StackCopyHeader = read_pod(record.get(start..)?)?;
            let header_end = start + size_of::<StackCopyHeader>();
            header_end.checked_add(usize::try_from(header.len).ok()?)?
        } else {
            start + 8 * usize::from(event.nframes())
        };
        let py = usize::from(flags >> PY_FRAMES_SHIFT & PY_FRAMES_MASK) * size_of::<PyRawFrame>();
        Some(RawStack {
            bytes: record.get(start..end)?,
            python: record.get(end..end + py)?,
            flags,
        })
    }

    /// The Python frames recorded with the stack: (code object, bytecode offset), innermost
    /// first.
    pub fn python_frames(&self) -> impl Iterator<Item = (u64, u64)> + 'a {
        self.python.chunks_exact(16).map(|c| {
            let word = |i: usize| u64::from_ne_bytes(c[i..i + 8].try_into().expect("8 bytes"));
            (word(0), word(8))
        })
    }
}

impl RawStack<'_> {
    pub fn len(&self) -> usize {
        self.bytes.len() / 8
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Copies the addresses into `out` (cleared first).
    pub fn read_into(&self, out: &mut Vec<u64>) {
        out.clear();
        out.extend(
            self.bytes
                .chunks_exact(8)
                .map(|c| u64::from_ne_bytes(c.try_into().expect("8 bytes"))),
        );
    }
}

/// The `T` at the start of `bytes`, if they are long enough.
fn read_pod<T: aya::Pod>(bytes: &[u8]) -> Option<T> {
    let bytes = bytes.get(..size_of::<T>())?;
    // SAFETY: length checked; `T` is plain old data; the record may be unaligned.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) })
}

/// The event at the start of `record` and the stack after it.
fn with_stack<E: StackEvent + aya::Pod>(record: &[u8]) -> Option<(E, RawStack<'_>)> {
    let event: E = read_pod(record)?;
    let stack = RawStack::after(record, &event)?;
    Some((event, stack))
}

/// Decodes one record; `None` for a record of unknown kind or size (counted as lost by the caller).
pub fn decode(bytes: &[u8]) -> Option<Event<'_>> {
    let kind = u32::from_ne_bytes(bytes.get(..4)?.try_into().ok()?);
    match kind {
        event_kind::ALLOC => with_stack(bytes).map(|(ev, stack)| Event::Alloc(ev, stack)),
        event_kind::HEAP_STACK => with_stack(bytes).map(|(ev, stack)| Event::HeapStack(ev, stack)),
        event_kind::MAP => with_stack(bytes).map(|(ev, stack)| Event::Map(ev, stack)),
        event_kind::FAULT => with_stack(bytes).map(|(ev, stack)| Event::Fault(ev, stack)),
        event_kind::CUDA_CALL => with_stack(bytes).map(|(ev, stack)| Event::CudaCall(ev, stack)),
        event_kind::TORCH => with_stack(bytes).map(|(ev, stack)| Event::Torch(ev, stack)),
        event_kind::PROC => read_pod(bytes).map(Event::Proc),
        event_kind::FREE => read_pod(bytes).map(Event::Free),
        _ => None,
    }
}

/// Name of an errno value as the report shows it.
pub fn errno_name(err: i32) -> String {
    match err {
        libc::ENOMEM => "ENOMEM".into(),
        libc::EINVAL => "EINVAL".into(),
        libc::EAGAIN => "EAGAIN".into(),
        0 => "none".into(),
        n => format!("errno {n}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes<T>(v: &T) -> Vec<u8> {
        // SAFETY: reading the bytes of a plain-old-data value.
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()).to_vec() }
    }

    #[test]
    fn decodes_both_kinds_and_rejects_garbage() {
        let a = AllocEvent {
            kind: event_kind::ALLOC,
            tgid: 7,
            tid: 8,
            nframes: 2,
            stack_flags: tracer_common::STACK_TRUNCATED,
            addr: 0x1000,
            size: 64,
            origin: 0,
            err: 0,
            func: 0,
            aux: 0,
            stack_key: 0,
            phase: 3,
            _pad: 0,
        };
        let mut record = bytes(&a);
        record.extend(0x1111u64.to_ne_bytes());
        record.extend(0x2222u64.to_ne_bytes());
        let Some(Event::Alloc(ev, stack)) = decode(&record) else {
            panic!("not decoded")
        };
        assert_eq!(ev, a);
        let mut ips = Vec::new();
        stack.read_into(&mut ips);
        assert_eq!(
            (ips, stack.flags),
            (vec![0x1111, 0x2222], tracer_common::STACK_TRUNCATED)
        );
        // A record shorter than its frame count says is rejected.
        assert_eq!(decode(&record[..record.len() - 8]), None);
        let f = FreeEvent {
            kind: event_kind::FREE,
            tgid: 7,
            addr: 0x1000,
            phase: 2,
            _pad: 0,
        };
        assert_eq!(decode(&bytes(&f)), Some(Event::Free(f)));
        assert_eq!(decode(&bytes(&a)[..20]), None);
        assert_eq!(decode(&[9, 0, 0, 0, 1, 2, 3, 4]), None);
        assert_eq!(decode(&[]), None);
    }

    #[test]
    fn names_errnos() {
        assert_eq!(errno_name(12), "ENOMEM");
        assert_eq!(errno_name(22), "EINVAL");
        assert_eq!(errno_name(99), "errno 99");
    }
}
