//! Kernel side of alloctrace: uprobes on the C allocator and the CUDA libraries, tracepoints on
//! memory syscalls, the process tree and page faults.
//!
//! Allocation entries save their arguments per thread; the matching return emits one event with
//! the result and the user stack, or, for the heap with the kernel's heap ledger, holds the
//! block and counts it per stack here (`heap_ledger`). Frees emit at entry, or are matched in
//! the ledger. Nested calls (glibc's realloc calls malloc and free itself) are folded into the
//! outer call.
//!
//! One module a concern; the programs (`#[uprobe]`, `#[tracepoint]`, ...) are exported under
//! their function names, which user space loads them by (`alloctrace::hooks`).
#![no_std]
#![no_main]
// The bpf target has no `AtomicU64::compare_exchange`; the intrinsic lowers to BPF_CMPXCHG (v3).
#![feature(core_intrinsics)]
#![allow(internal_features)]

/// Allocation returns and frees, heap or CUDA.
mod alloc;
/// x86-64 specifics: registers, argument and frame layout.
mod arch;
/// CUDA driver and runtime probes.
mod cuda;
/// Loss counters and the kernel-side log (`--debug-bpf`).
mod diag;
/// Sampled page faults.
mod faults;
/// The C allocator's probes.
mod heap;
/// The kernel's heap ledger: blocks with known stacks held and counted in the kernel.
mod heap_ledger;
/// The heap ledger's recent blocks: a direct-mapped table where young blocks live and die.
mod heap_recent;
/// In-flight call slots: claim, enter, leave.
mod inflight;
/// Every map and load-time global.
mod maps;
/// Request phases: the phase stack of each thread.
mod phase;
/// Process-tree tracepoints.
mod process;
/// CPython frames.
mod python;
/// Writing records into the ring buffer.
mod ring;
/// User stacks and `emit_with_stack`.
mod stack;
/// Memory syscall tracepoints.
mod syscalls;
/// PyTorch's CUDA caching allocator.
mod torch;
/// Whether a heap call's process is traced: a per-CPU cache of `TARGETS`.
mod traced;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
