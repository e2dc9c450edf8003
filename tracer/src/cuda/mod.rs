//! The CUDA layer's rules beyond allocations and VMM handles (vmm.rs): capture state,
//! graphs, pools, IPC imports, host registration, and the driver's hidden memory (NVML minus
//! what was traced), charged to the opaque call after which it appeared. The rules are in
//! docs/accounting.md, "CUDA".

pub mod nvml;
pub mod vmm;

use std::collections::{BTreeMap, HashMap, HashSet};

use tracer_common::{AllocEvent, CudaCallEvent};

use crate::{
    cuda::vmm::VmmLedger,
    hooks::{self, CudaHook, Records},
    ledger::{CellRef, Ledger},
    model::{Class, FailureKey, PHASE_PRE_ATTACH, StackIndex},
};

/// The built-in phase of allocations made while a CUDA graph is being captured or instantiated.
pub const PHASE_GRAPH_CAPTURE: &str = "graph-capture";

/// Registered host ranges live in the ledger under their address with this bit set: the same
/// address is usually a heap block or a mapping too, which keeps its own entry.
const REGISTERED_TAG: u64 = 1 << 62;

pub struct CudaLayer {
    /// Threads capturing a CUDA graph: (pid, tid) → nested captures.
    capturing: HashMap<(u32, u32), u32>,
    /// Device blocks exported with cuIpcGetMemHandle, by the handle's fingerprint: their size,
    /// for the processes that open them.
    ipc_exports: HashMap<u64, u64>,
    /// Imported IPC blocks by (pid, address): how many opens are not closed yet (the driver
    /// returns the same address for a handle opened again, counted once).
    ipc_opens: HashMap<(u32, u64), u32>,
    /// What driver calls made inside a runtime call not yet returned did, by (pid, tid).
    in_runtime: HashMap<(u32, u32), InRuntime>,
    /// Graph executables launched at least once, by (pid, exec).
    launched: HashSet<(u32, u64)>,
    pub hidden: HiddenMemory,
}

impl CudaLayer {
    /// `sample_gpu`: whether a GPU memory source exists (else opaque calls are only counted).
    pub fn new(sample_gpu: bool) -> CudaLayer {
        CudaLayer {
            capturing: HashMap::new(),
            ipc_exports: HashMap::new(),
            ipc_opens: HashMap::new(),
            in_runtime: HashMap::new(),
            launched: HashSet::new(),
            hidden: HiddenMemory::new(sample_gpu),
        }
    }

    /// Class and phase of a successful CUDA allocation: device memory obtained while its thread
    /// captures a graph, or inside a graph instantiation, belongs to the graph.
    pub fn placement(&self, ledger: &mut Ledger, ev: &AllocEvent, hook: &CudaHook) -> CellRef {
        let in_call = hooks::cuda_hook(ev.enclosing_calls().driver).map(|h| h.records);
        let graph = self.capturing.contains_key(&(ev.tgid, ev.tid))
            || in_call == Some(Records::GraphInstantiate);
        let mut at = CellRef::new(ev.tgid, hook.class, None);
        if graph {
            at.phase = ledger.phase(PHASE_GRAPH_CAPTURE);
            if matches!(hook.class, Class::Cuda | Class::CudaPool) {
                at.class = Class::CudaGraph;
            }
        }
        at
    }

    /// A successful driver allocation made inside a runtime call: counted when that call
    /// returns, at the stack of the runtime's caller (libcudart has no frame pointers: the
    /// driver's own walk stops in it).
    pub fn defer_alloc(&mut self, ev: AllocEvent, at: CellRef) {
        let calls = self.in_runtime.entry((ev.tgid, ev.tid)).or_default();
        calls.allocs.push((ev, at));
    }

    /// A driver allocation failed; inside a runtime call it is named after both and recorded
    /// when the runtime call returns, at its caller's stack (and the runtime's own failure is not
    /// counted again).
    pub fn driver_failure(&mut self, ledger: &mut Ledger, ev: &AllocEvent, failure: FailureKey) {
        let hook = hooks::cuda_hook(ev.func);
        match (hooks::runtime_hook(ev.enclosing_calls().runtime), hook) {
            (Some(rt), Some(h)) => {
                let failure = FailureKey {
                    function: format!("{} → {}", rt.symbol, h.symbol),
                    ..failure
                };
                let calls = self.in_runtime.entry((ev.tgid, ev.tid)).or_default();
                calls.failures.push(failure);
            }
            _ => ledger.failure(failure),
        }
    }

    /// A runtime call returned: what its driver calls did counts now at `stack`; a runtime
    /// failure without a driver failure inside (no driver, no device) is a failure of its own.
    pub fn runtime_return(
        &mut self,
        ledger: &mut Ledger,
        ev: &AllocEvent,
        hook: &CudaHook,
        stack: Option<StackIndex>,
    ) {
        let inside = self
            .in_runtime
            .remove(&(ev.tgid, ev.tid))
            .unwrap_or_default();
        let driver_failed = !inside.failures.is_empty();
        inside.apply(ledger, stack);
        if ev.addr == 0 && !driver_failed {
            ledger.failure(FailureKey {
                class: hook.class,
                pid: ev.tgid,
                function: hook.symbol.to_string(),
                size: ev.size,
                error: hooks::runtime_error_name(ev.err),
                stack,
            });
        }
    }

    /// The recording ends: driver calls whose runtime call never returned (or whose return was
    /// lost) count at their own stacks.
    pub fn finish(&mut self, ledger: &mut Ledger) {
        for (_, inside) in self.in_runtime.drain() {
            inside.apply(ledger, None);
        }
    }

    /// A non-allocating driver call returned.
    pub fn call(
        &mut self,
        ledger: &mut Ledger,
        vmm: &mut VmmLedger,
        ev: &CudaCallEvent,
        (stack, ips): (Option<StackIndex>, &[u64]),
    ) {
        let Some(hook) = hooks::cuda_hook(ev.func) else {
            return;
        };
        let (pid, a, ok) = (ev.tgid, ev.args, ev.ret == 0);
        let counted = !matches!(
            hook.records,
            Records::VmmMap | Records::VmmUnmap | Records::VmmRelease
        );
        if counted {
            ledger.cuda_call(pid, hook.symbol, stack, ok);
        }
        if !ok {
            if hook.records == Records::CaptureEnd {
                // A failed end (an invalidated capture) still ends the capture.
                self.end_capture(pid, ev.tid);
            }
            ledger.failure(FailureKey {
                class: hook.class,
                pid,
                function: hook.symbol.to_string(),
                size: if hook.records == Records::HostRegister {
                    a[1]
                } else {
                    0
                },
                error: hooks::cuda_error_name(ev.ret),
                stack,
            });
            return;
        }
        if hook.records.samples_gpu() {
            self.hidden.opaque_call(pid, hook.symbol, stack, ips);
        }
        match hook.records {
            Records::VmmRelease => vmm.release(ledger, pid, a[0]),
            Records::VmmMap => vmm.map(pid, a[0], a[1], a[3]),
            Records::VmmUnmap => vmm.unmap(ledger, pid, a[0], a[1]),
            Records::CaptureBegin => *self.capturing.entry((pid, ev.tid)).or_default() += 1,
            Records::CaptureEnd => self.end_capture(pid, ev.tid),
            Records::GraphMemFree => {
                ledger.free(pid, a[4]);
            }
            // The first replay of an executable may back its memory nodes: sample then.
            Records::GraphLaunch if self.launched.insert((pid, a[0])) => {
                self.hidden.opaque_call(pid, hook.symbol, stack, ips);
            }
            Records::GraphDestroy => {
                self.launched.remove(&(pid, a[0]));
            }
            Records::HostRegister => {
                let at = CellRef::new(pid, Class::CudaRegistered, stack);
                ledger.alloc(pid, a[0] | REGISTERED_TAG, a[1], at);
            }
            Records::HostUnregister => {
                ledger.free(pid, a[0] | REGISTERED_TAG);
            }
            Records::IpcExport => {
                if let Some(size) = ledger.block_size(pid, a[1]) {
                    self.ipc_exports.insert(ev.out, size);
                }
            }
            Records::IpcOpen => {
                let opens = self.ipc_opens.entry((pid, ev.out)).or_default();
                *opens += 1;
                if *opens == 1 {
                    // Size known when the exporter is traced too (vLLM's workers are children).
                    let size = self.ipc_exports.get(&a[1]).copied().unwrap_or(0);
                    ledger.alloc(pid, ev.out, size, CellRef::new(pid, Class::CudaIpc, stack));
                }
            }
            Records::IpcClose => {
                if let Some(opens) = self.ipc_opens.get_mut(&(pid, a[0])) {
                    *opens -= 1;
                    if *opens == 0 {
                        self.ipc_opens.remove(&(pid, a[0]));
                        ledger.free(pid, a[0]);
                    }
                }
            }
            _ => {}
        }
    }

    fn end_capture(&mut self, pid: u32, tid: u32) {
        if let Some(n) = self.capturing.get_mut(&(pid, tid)) {
            *n -= 1;
            if *n == 0 {
                self.capturing.remove(&(pid, tid));
            }
        }
    }
}

/// What the driver calls made inside one runtime call did.
#[derive(Default)]
struct InRuntime {
    allocs: Vec<(AllocEvent, CellRef)>,
    failures: Vec<FailureKey>,
}

impl InRuntime {
    /// Counts it at `stack` (the runtime caller's), or at the driver's own stacks.
    fn apply(self, ledger: &mut Ledger, stack: Option<StackIndex>) {
        for (ev, at) in self.allocs {
            let at = CellRef {
                stack: stack.or(at.stack),
                ..at
            };
            ledger.alloc(ev.tgid, ev.addr, ev.size, at);
        }
        for failure in self.failures {
            ledger.failure(FailureKey {
                stack: stack.or(failure.stack),
                ..failure
            });
        }
    }
}

/// A call after which the driver may hold memory no API returned.
struct OpaqueCall {
    function: &'static str,
    stack: Option<StackIndex>,
    ips: Vec<u64>,
}

/// GPU memory the driver holds beyond the traced device classes (`gpu-untraced`): sampled right
/// after opaque calls and once a second; each rise of the residual is charged to the opaque
/// call since the previous sample when there was one (or several from one call site), else to
/// one node that names the calls between the two samples ("between two GPU samples:
/// cublasCreate_v2, cuModuleLoadData ×2", above the first call's stack) — not split into
/// per-call figures nobody measured — and to no stack when there were none; a fall gives back
/// the most recent charges first.
pub struct HiddenMemory {
    enabled: bool,
    /// Opaque calls since the last sample, by process.
    window: BTreeMap<u32, Vec<OpaqueCall>>,
    /// Charges still standing, by process, oldest first: (ledger cell, bytes).
    charges: HashMap<u32, Vec<(u32, u64)>>,
    /// Processes attached to by PID whose first sample is still to come: what the driver
    /// holds for them then is memory no probe saw made (phase `pre-attach`).
    pre_attach: HashSet<u32>,
}

impl HiddenMemory {
    fn new(enabled: bool) -> HiddenMemory {
        HiddenMemory {
            enabled,
            window: BTreeMap::new(),
            charges: HashMap::new(),
            pre_attach: HashSet::new(),
        }
    }

    /// `pid` ran before the recorder attached: its first sample's residual is pre-attach.
    pub fn attached_to(&mut self, pid: u32) {
        self.pre_attach.insert(pid);
    }

    /// An opaque call at `stack` (its addresses `ips`, for a node that would name it).
    fn opaque_call(
        &mut self,
        pid: u32,
        function: &'static str,
        stack: Option<StackIndex>,
        ips: &[u64],
    ) {
        if self.enabled {
            self.window.entry(pid).or_default().push(OpaqueCall {
                function,
                stack,
                ips: ips.to_vec(),
            });
        }
    }

    /// Processes with opaque calls not yet followed by a sample.
    pub fn waiting(&self) -> Vec<u32> {
        self.window.keys().copied().collect()
    }

    /// NVML says `pid` uses `used` bytes, of which its device classes traced `traced`: charges
    /// or gives back the change of the residual. `named_stack(label, ips)` makes the stack of a
    /// frame naming several calls above the first call's addresses.
    pub fn sample(
        &mut self,
        ledger: &mut Ledger,
        pid: u32,
        (used, traced): (u64, u64),
        named_stack: impl FnOnce(String, &[u64]) -> Option<StackIndex>,
    ) {
        let window = self.window.remove(&pid).unwrap_or_default();
        let pre_attach = self.pre_attach.remove(&pid);
        let residual = used.saturating_sub(traced);
        let charges = self.charges.entry(pid).or_default();
        let charged: u64 = charges.iter().map(|c| c.1).sum();
        if residual > charged {
            let delta = residual - charged;
            let stack = match window.as_slice() {
                [] => None,
                [first, rest @ ..] if rest.iter().all(|c| c.stack == first.stack) => first.stack,
                calls => named_stack(between_samples(calls), &calls[0].ips),
            };
            let mut at = CellRef::new(pid, Class::GpuUntraced, stack);
            if pre_attach && window.is_empty() {
                at.phase = ledger.phase(PHASE_PRE_ATTACH);
            }
            charges.push((ledger.credit(at, delta, true), delta));
        } else {
            let mut excess = charged - residual;
            while excess > 0 {
                let Some((cell, bytes)) = charges.pop() else {
                    break;
                };
                let back = bytes.min(excess);
                ledger.debit(cell, back, back == bytes);
                if back < bytes {
                    charges.push((cell, bytes - back));
                }
                excess -= back;
            }
        }
    }

    /// The process is gone: nothing more to attribute for it.
    pub fn forget(&mut self, pid: u32) {
        self.window.remove(&pid);
    }
}

/// "between two GPU samples: cublasCreate_v2, cuModuleLoadData ×2": the calls in the order they
/// were first made.
fn between_samples(calls: &[OpaqueCall]) -> String {
    let mut counted: Vec<(&str, u32)> = Vec::new();
    for call in calls {
        match counted.iter_mut().find(|(f, _)| *f == call.function) {
            Some((_, n)) => *n += 1,
            None => counted.push((call.function, 1)),
        }
    }
    let names: Vec<String> = counted
        .into_iter()
        .map(|(f, n)| {
            if n == 1 {
                f.to_string()
            } else {
                format!("{f} ×{n}")
            }
        })
        .collect();
    format!("between two GPU samples: {}", names.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn untraced(ledger: &Ledger) -> BTreeMap<Option<StackIndex>, u64> {
        ledger
            .state(&BTreeMap::new())
            .cells
            .into_iter()
            .filter(|(k, c)| k.class == Class::GpuUntraced && c.live_bytes > 0)
            .map(|(k, c)| (k.stack, c.live_bytes))
            .collect()
    }

    #[test]
    fn residual_rises_are_charged_to_the_opaque_calls_before_them() {
        let mut ledger = Ledger::new();
        let mut hidden = HiddenMemory::new(true);
        let named = std::cell::RefCell::new(Vec::new());
        let name = |label: String, ips: &[u64]| {
            named.borrow_mut().push((label, ips.to_vec()));
            Some(99)
        };
        // A traced 100-byte device block: not part of the residual.
        ledger.alloc(7, 0x1000, 100, CellRef::new(7, Class::Cuda, Some(9)));
        hidden.opaque_call(7, "cuCtxCreate_v2", Some(1), &[0x10]); // context: +300
        hidden.sample(&mut ledger, 7, (400, 100), name);
        // Three calls from two sites: +21 to one node that names them.
        hidden.opaque_call(7, "cuModuleLoadData", Some(2), &[0x20, 0x21]);
        hidden.opaque_call(7, "cublasCreate_v2", Some(3), &[0x30]);
        hidden.opaque_call(7, "cuModuleLoadData", Some(2), &[0x20, 0x21]);
        hidden.sample(&mut ledger, 7, (421, 100), name);
        // Two calls from one site: theirs.
        hidden.opaque_call(7, "cuModuleLoadData", Some(4), &[0x40]);
        hidden.opaque_call(7, "cuModuleLoadData", Some(4), &[0x40]);
        hidden.sample(&mut ledger, 7, (431, 100), name);
        assert_eq!(
            untraced(&ledger),
            BTreeMap::from([(Some(1), 300), (Some(99), 21), (Some(4), 10)])
        );
        assert_eq!(
            *named.borrow(),
            [(
                "between two GPU samples: cuModuleLoadData ×2, cublasCreate_v2".to_string(),
                vec![0x20, 0x21]
            )]
        );
        // A rise with no opaque call: unattributed.
        hidden.sample(&mut ledger, 7, (435, 100), name);
        assert_eq!(untraced(&ledger)[&None], 4);
        // A fall gives back the latest charges first: 4 (unattributed), 10, then 11 of 21.
        hidden.sample(&mut ledger, 7, (406, 100), name);
        assert_eq!(
            untraced(&ledger),
            BTreeMap::from([(Some(1), 300), (Some(99), 6)])
        );
        assert_eq!(ledger.totals(Class::GpuUntraced).live_bytes, 306);
        assert!(hidden.waiting().is_empty());
    }

    #[test]
    fn what_the_driver_held_at_attach_is_pre_attach() {
        let mut ledger = Ledger::new();
        let mut hidden = HiddenMemory::new(true);
        let never = |_: String, _: &[u64]| -> Option<StackIndex> { unreachable!() };
        let phases = |ledger: &Ledger| -> Vec<(u32, String, u64)> {
            let cells = ledger.state(&BTreeMap::new()).cells;
            (cells.into_iter())
                .filter(|(k, c)| k.class == Class::GpuUntraced && c.live_bytes > 0)
                .map(|(k, c)| (k.pid, k.phase, c.live_bytes))
                .collect()
        };
        // PID 7 was attached to, PID 8 launched: only 7's first residual predates the recorder.
        hidden.attached_to(7);
        hidden.sample(&mut ledger, 7, (500, 0), never);
        hidden.sample(&mut ledger, 8, (200, 0), never);
        hidden.sample(&mut ledger, 7, (540, 0), never);
        assert_eq!(
            phases(&ledger),
            [
                (7, "none".to_string(), 40),
                (7, "pre-attach".to_string(), 500),
                (8, "none".to_string(), 200)
            ]
        );
    }
}
