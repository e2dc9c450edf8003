//! Decoding ring-buffer records into events.

use std::mem::size_of;

use tracer_common::{
    CudaCallEvent, FaultEvent, HeapAllocEvent, HeapFreeEvent, MapEvent, ProcEvent, STACK_COPY,
    StackCopyHeader, event_kind,
    python::{PY_FRAMES_MASK, PY_FRAMES_SHIFT, PyRawFrame},
};

/// A decoded ring record; stacks borrow the record's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event<'a> {
    HeapAlloc(HeapAllocEvent, Stack<'a>),
    HeapFree(HeapFreeEvent),
    Map(MapEvent, Stack<'a>),
    Proc(ProcEvent),
    Fault(FaultEvent, Stack<'a>),
    CudaCall(CudaCallEvent, Stack<'a>),
}

/// The user stack that follows an event in its record: `u64` addresses, innermost first, or
/// (`STACK_COPY`) a copy of the stack to unwind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stack<'a> {
    bytes: &'a [u8],
    /// Python frames (`PyRawFrame`s) recorded after the stack.
    python: &'a [u8],
    /// The event's `stack_flags` (`STACK_TRUNCATED`, `STACK_SP_CANDIDATE`, `STACK_COPY`, the
    /// Python frame count).
    pub flags: u16,
}

impl<'a> Stack<'a> {
    /// The registers and bytes of a stack copy, if the record carries one.
    pub fn copy(&self) -> Option<(StackCopyHeader, &'a [u8])> {
        if self.flags & STACK_COPY == 0 {
            return None;
        }
        let header_len = size_of::<StackCopyHeader>();
        let header = self.bytes.get(..header_len)?;
        // SAFETY: length checked; plain old data; the record may be unaligned.
        let header: StackCopyHeader = unsafe { std::ptr::read_unaligned(header.as_ptr().cast()) };
        Some((header, self.bytes.get(header_len..)?))
    }

    /// The stack that starts at `start` in `record`: `nframes` addresses, or a copy (its
    /// header says how long).
    fn at(record: &'a [u8], start: usize, nframes: u16, flags: u16) -> Option<Stack<'a>> {
        let end = if flags & STACK_COPY != 0 {
            let header_end = start + size_of::<StackCopyHeader>();
            let header = record.get(start..header_end)?;
            // SAFETY: length checked; plain old data; the record may be unaligned.
            let header: StackCopyHeader =
                unsafe { std::ptr::read_unaligned(header.as_ptr().cast()) };
            header_end.checked_add(usize::try_from(header.len).ok()?)?
        } else {
            start + 8 * usize::from(nframes)
        };
        let py = usize::from(flags >> PY_FRAMES_SHIFT & PY_FRAMES_MASK) * size_of::<PyRawFrame>();
        Some(Stack {
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

impl Stack<'_> {
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

/// Decodes one record; `None` for a record of unknown kind or size (counted as lost by the caller).
pub fn decode(bytes: &[u8]) -> Option<Event<'_>> {
    let kind = u32::from_ne_bytes(bytes.get(..4)?.try_into().ok()?);
    match kind {
        event_kind::HEAP_ALLOC if bytes.len() >= size_of::<HeapAllocEvent>() => {
            // SAFETY: length checked; HeapAllocEvent is plain old data; the record may be unaligned.
            let ev: HeapAllocEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
            let stack = Stack::at(
                bytes,
                size_of::<HeapAllocEvent>(),
                ev.nframes,
                ev.stack_flags,
            )?;
            Some(Event::HeapAlloc(ev, stack))
        }
        event_kind::MAP if bytes.len() >= size_of::<MapEvent>() => {
            // SAFETY: length checked; MapEvent is plain old data; the record may be unaligned.
            let ev: MapEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
            let stack = Stack::at(bytes, size_of::<MapEvent>(), ev.nframes, ev.stack_flags)?;
            Some(Event::Map(ev, stack))
        }
        event_kind::FAULT if bytes.len() >= size_of::<FaultEvent>() => {
            // SAFETY: length checked; FaultEvent is plain old data; the record may be unaligned.
            let ev: FaultEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
            let stack = Stack::at(bytes, size_of::<FaultEvent>(), ev.nframes, ev.stack_flags)?;
            Some(Event::Fault(ev, stack))
        }
        event_kind::CUDA_CALL if bytes.len() >= size_of::<CudaCallEvent>() => {
            // SAFETY: length checked; CudaCallEvent is plain old data; the record may be unaligned.
            let ev: CudaCallEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
            let stack = Stack::at(
                bytes,
                size_of::<CudaCallEvent>(),
                ev.nframes,
                ev.stack_flags,
            )?;
            Some(Event::CudaCall(ev, stack))
        }
        event_kind::PROC if bytes.len() >= size_of::<ProcEvent>() => {
            // SAFETY: length checked; ProcEvent is plain old data.
            Some(Event::Proc(unsafe {
                std::ptr::read_unaligned(bytes.as_ptr().cast())
            }))
        }
        event_kind::HEAP_FREE if bytes.len() >= size_of::<HeapFreeEvent>() => {
            // SAFETY: as above.
            Some(Event::HeapFree(unsafe {
                std::ptr::read_unaligned(bytes.as_ptr().cast())
            }))
        }
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
        let a = HeapAllocEvent {
            kind: event_kind::HEAP_ALLOC,
            tgid: 7,
            tid: 8,
            nframes: 2,
            stack_flags: tracer_common::STACK_TRUNCATED,
            addr: 0x1000,
            size: 64,
            old_addr: 0,
            err: 0,
            func: 0,
            aux: 0,
        };
        let mut record = bytes(&a);
        record.extend(0x1111u64.to_ne_bytes());
        record.extend(0x2222u64.to_ne_bytes());
        let Some(Event::HeapAlloc(ev, stack)) = decode(&record) else {
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
        let f = HeapFreeEvent {
            kind: event_kind::HEAP_FREE,
            tgid: 7,
            addr: 0x1000,
        };
        assert_eq!(decode(&bytes(&f)), Some(Event::HeapFree(f)));
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
