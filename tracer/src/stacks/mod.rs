//! Stacks: instruction pointers from events → interned stack indexes ([`StackTable`]) →
//! function names ([`FrameNamer`]). `unwind` recovers the instruction pointers of code built
//! without frame pointers from stack copies.
//!
//! Stacks are symbolized from the ELF files the target maps (opened through /proc/PID/root, so
//! containers work), using a snapshot of its mappings refreshed while it lives. Stacks seen just
//! before the target exits are therefore still symbolized after it is gone.

mod namer;
pub mod resident;
mod table;
pub mod unwind;

pub use self::{
    namer::{FrameNamer, TRUNCATED_FRAME},
    table::StackTable,
};
