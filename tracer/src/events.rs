//! Decoding ring-buffer records into events.

use std::mem::size_of;

use tracer_common::{HeapAllocEvent, HeapFreeEvent, event_kind};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    HeapAlloc(HeapAllocEvent),
    HeapFree(HeapFreeEvent),
}

/// Decodes one record; `None` for a record of unknown kind or size (counted as lost by the caller).
pub fn decode(bytes: &[u8]) -> Option<Event> {
    let kind = u32::from_ne_bytes(bytes.get(..4)?.try_into().ok()?);
    match kind {
        event_kind::HEAP_ALLOC if bytes.len() >= size_of::<HeapAllocEvent>() => {
            // SAFETY: length checked; HeapAllocEvent is plain old data; the record may be unaligned.
            Some(Event::HeapAlloc(unsafe {
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
            stack_id: 3,
            addr: 0x1000,
            size: 64,
            old_addr: 0,
            err: 0,
            func: 0,
        };
        assert_eq!(decode(&bytes(&a)), Some(Event::HeapAlloc(a)));
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
