//! x86-64 specifics of the kernel side, gathered: where a program finds the user registers a
//! stack starts from, where a by-value argument lies, what a frame record looks like.

use aya_ebpf::{
    EbpfContext,
    bindings::pt_regs,
    helpers::{
        bpf_probe_read_kernel,
        generated::{bpf_get_current_task_btf, bpf_task_pt_regs},
    },
};

/// The user registers a stack is taken from.
#[derive(Copy, Clone)]
pub struct UserRegs {
    /// The instruction pointer (`rip`).
    pub ip: u64,
    /// The stack pointer (`rsp`).
    pub sp: u64,
    /// The frame pointer (`rbp`).
    pub bp: u64,
}

impl UserRegs {
    /// At a uprobe: the context is the user `pt_regs`. At a return probe they are the caller's:
    /// `ip` is the return address into the function that called the hooked one, `sp` and `bp`
    /// its stack and frame.
    #[inline(always)]
    pub fn of_probe<C: EbpfContext>(ctx: &C) -> UserRegs {
        let regs = ctx.as_ptr() as *const pt_regs;
        // SAFETY: the context of a uprobe program is the user pt_regs.
        unsafe {
            UserRegs {
                ip: (*regs).rip,
                sp: (*regs).rsp,
                bp: (*regs).rbp,
            }
        }
    }

    /// At a uprobe on a `ret` instruction: the value being returned.
    #[inline(always)]
    pub fn rax<C: EbpfContext>(ctx: &C) -> u64 {
        let regs = ctx.as_ptr() as *const pt_regs;
        // SAFETY: the context of a uprobe program is the user pt_regs.
        unsafe { (*regs).rax }
    }

    /// At a tracepoint, whose context holds no registers: the current task's saved user
    /// registers (for a syscall, its return address and the caller's frame pointer).
    #[inline(always)]
    pub fn of_current_task() -> Option<UserRegs> {
        // SAFETY: the current task's user pt_regs, read with bpf_probe_read_kernel.
        let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as *const pt_regs;
        let regs = unsafe { bpf_probe_read_kernel(regs) }.ok()?;
        Some(UserRegs {
            ip: regs.rip,
            sp: regs.rsp,
            bp: regs.rbp,
        })
    }
}

/// At a function's entry, the address of its first argument passed in memory: above the return
/// address (System V: aggregates over 16 bytes, such as a 64-byte CUipcMemHandle, go there).
#[inline(always)]
pub fn first_stack_argument<C: EbpfContext>(ctx: &C) -> u64 {
    UserRegs::of_probe(ctx).sp + 8
}

/// A frame record of the frame-pointer chain, at the frame pointer: the caller's saved frame
/// pointer, then the return address into the caller.
pub type FrameRecord = [u64; 2];
