//! The user stack that follows an event in its ring record: frame addresses or a stack copy,
//! then the Python frames; and the scratch record the eBPF programs assemble it in.

use crate::python;

/// Most user frames an event carries (frame-pointer walk in the eBPF program).
pub const MAX_FRAMES: usize = 64;

/// `stack_flags`: the walk stopped at `MAX_FRAMES` with more frames above.
pub const STACK_TRUNCATED: u16 = 1;

/// `stack_flags`: the second address was read from the stack pointer, not from the frame chain;
/// it is a real frame only if the instruction before it is a call (see `walk_user_stack`).
pub const STACK_SP_CANDIDATE: u16 = 2;

/// `stack_flags`: the record carries a copy of the user stack (`StackCopyHeader` then `len`
/// bytes) instead of frame addresses; user space unwinds it with the modules' call-frame
/// information (DWARF stack mode).
pub const STACK_COPY: u16 = 4;

/// The most user-stack bytes a record can carry (`--stack-copy`).
pub const STACK_COPY_MAX: usize = 32768;

/// The registers and length of a stack copy; the `len` bytes from `sp` up follow it.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct StackCopyHeader {
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
    pub len: u64,
}

/// Words of a scratch record's stack area: `MAX_FRAMES` addresses in frame-pointer mode, or a
/// `StackCopyHeader` and up to `STACK_COPY_MAX` bytes, with room past the end for the
/// verifier's view of a page-sized copy at any offset below `STACK_COPY_MAX`.
pub const STACK_AREA_WORDS: usize = (32 + STACK_COPY_MAX + 8192) / 8;

/// Bytes of the stack area after which Python frames still fit.
pub const PY_FRAMES_AT_MOST: usize = 8 * STACK_AREA_WORDS - 16 * python::MAX_PY_FRAMES;

/// The stack area of a scratch record.
pub type StackArea = [u64; STACK_AREA_WORDS];

/// An event followed in its ring record by a user stack: `nframes` addresses (or a copy, per
/// `stack_flags`), then the Python frames `stack_flags` counts.
pub trait StackEvent: Copy {
    fn nframes(&self) -> u16;
    fn stack_flags(&self) -> u16;
    fn set_nframes(&mut self, nframes: u16);
    fn set_stack_flags(&mut self, flags: u16);
}

/// Implements `StackEvent` for event types with `nframes` and `stack_flags` fields.
macro_rules! stack_events {
    ($($event:ty),*) => {$(
        impl StackEvent for $event {
            #[inline(always)]
            fn nframes(&self) -> u16 {
                self.nframes
            }
            #[inline(always)]
            fn stack_flags(&self) -> u16 {
                self.stack_flags
            }
            #[inline(always)]
            fn set_nframes(&mut self, nframes: u16) {
                self.nframes = nframes;
            }
            #[inline(always)]
            fn set_stack_flags(&mut self, flags: u16) {
                self.stack_flags = flags;
            }
        }
    )*};
}

stack_events!(
    crate::AllocEvent,
    crate::MapEvent,
    crate::FaultEvent,
    crate::CudaCallEvent,
    crate::TorchEvent
);

/// The eBPF programs' scratch space for one record: the event and room for the longest stack.
/// Only `size_of::<E>()` plus the used bytes of `stack` go into the ring.
#[repr(C)]
#[derive(Copy, Clone)]
pub struct StackRecord<E> {
    pub event: E,
    pub stack: StackArea,
}
