//! The event sink: applies ring records to the ledger layers (live blocks, mappings, the CUDA
//! layer), one method per event kind, interning each event's stack as it comes (`frames`).

mod frames;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};

use tracer_common::{
    AllocEvent, CudaCallEvent, HeapFn, MAP_FROM_ALLOCATOR, MapEvent, ProcEvent, drop_cause, map_op,
    proc_op,
};

use crate::{
    cuda::{CudaLayer, vmm::VmmLedger},
    events::{self, Event, RawStack},
    hooks::{self, CudaHook, Records},
    ledger::{
        CellRef, Ledger, PhaseId,
        kernel_heap::{KernelHeap, KernelTotals},
        mappings::{self, MappingLedger},
        torch::TorchLayer,
    },
    model::{Class, FailureKey, StackIndex},
    proc::{fd, maps::Mapping},
    python::PythonProcess,
    session::{batch::RecordBatch, phases::PythonRule},
    stacks::{
        FrameNamer, StackTable,
        unwind::{ProcessUnwinder, UnwindCache},
    },
};

/// The frame of the heap stacks whose names never reached user space.
pub const STACK_NOT_RECEIVED: &str = "[stack not received: the ring was full each time]";

/// User-space loss causes, besides the kernel's `drop_cause::NAMES`.
const UNDECODABLE: &str = "undecodable_record";

/// CPython arenas are 256 KiB (up to 3.9) or 1 MiB; smaller mmaps are not worth a look.
const PYTHON_ARENA_MIN: u64 = 256 << 10;

const PROT_EXEC: u64 = 0x4;

/// Applies events to the ledger, interning stacks as they come.
pub struct EventSink {
    pub ledger: Ledger,
    pub cuda: CudaLayer,
    vmm: VmmLedger,
    pub mappings: MappingLedger,
    /// PyTorch's caching allocators.
    pub torch: TorchLayer,
    /// Heap blocks the kernel holds, by stack; and where their totals are read.
    pub kernel_heap: KernelHeap,
    kernel_totals: Option<Box<dyn KernelTotals>>,
    stacks: StackTable,
    /// Display names of hooked functions by cookie (aliases joined: `memalign/aligned_alloc`).
    fn_names: HashMap<u32, String>,
    /// Records applied, and those that could not be decoded.
    pub events: u64,
    undecodable: u64,
    /// Reused buffer for a record's stack.
    ips: Vec<u64>,
    /// Processes that mapped an executable file since the last look: their frame namers must
    /// re-read maps while they still live.
    code_mapped: Vec<u32>,
    /// Frame namers by process.
    namers: HashMap<u32, FrameNamer>,
    /// DWARF unwinders of stack copies by process, sharing parsed unwind tables by build id.
    unwinders: HashMap<u32, ProcessUnwinder>,
    unwind_cache: UnwindCache,
    /// CPython processes whose Python frames are recorded: their code objects are read here.
    pythons: HashMap<u32, PythonProcess>,
    python_frames: bool,
    /// Stack copies unwound, and those that did not reach the outermost frame.
    pub unwinds: u64,
    pub unwinds_truncated: u64,
    /// Process-tree events, for the recorder to act on (attach heap probes, stop when all exit).
    proc_events: Vec<ProcEvent>,
    /// What `--max-memory` made the sink give up.
    pub shed: Shed,
    /// Heap stack walks judged per process (walks, walks with frames that are not return
    /// addresses), and the processes whose keys are to be shortened.
    walks: HashMap<u32, (u32, u32)>,
    short_keys: Vec<u32>,
    /// `record --phase`: the ledger's id of each kernel phase id.
    phase_ids: Vec<PhaseId>,
    /// `record --phase NAME=py:...`: the rules matched in Python frames, with their phase ids;
    /// what each Python frame matched (by its stack word); the phase the last stack read is in
    /// by its Python frames (0: none).
    python_rules: Vec<(PythonRule, PhaseId)>,
    /// Which of them matched a frame so far.
    python_matched: Vec<bool>,
    python_phase_of: HashMap<u64, PhaseId>,
    stack_python_phase: PhaseId,
}

/// What the sink gave up to stay within `--max-memory`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Shed {
    /// Events keep no stack from now on.
    pub collapse: bool,
    /// Times the caches were dropped.
    pub caches_dropped: u64,
    /// Events whose stack was not kept.
    pub stacks_collapsed: u64,
}

impl EventSink {
    /// A sink for a recording of `pid`, whose frames are named from `maps` (its mappings at
    /// attach). `fn_names`: display names of the hooked heap functions by cookie; `gpu`: whether
    /// GPU memory is sampled; `python_frames`: whether Python frames are read.
    pub fn new(
        pid: u32,
        maps: Vec<Mapping>,
        fn_names: HashMap<u32, String>,
        gpu: bool,
        python_frames: bool,
    ) -> EventSink {
        let mut ledger = Ledger::new();
        for class in Class::ALL {
            ledger.track(class);
        }
        EventSink {
            ledger,
            cuda: CudaLayer::new(gpu),
            vmm: VmmLedger::new(),
            mappings: MappingLedger::new(),
            torch: TorchLayer::new(),
            kernel_heap: KernelHeap::default(),
            kernel_totals: None,
            stacks: StackTable::new(),
            fn_names,
            events: 0,
            undecodable: 0,
            ips: Vec::new(),
            code_mapped: Vec::new(),
            namers: HashMap::from([(pid, FrameNamer::new(pid, maps))]),
            unwinders: HashMap::new(),
            unwind_cache: UnwindCache::new(),
            pythons: HashMap::new(),
            python_frames,
            unwinds: 0,
            unwinds_truncated: 0,
            proc_events: Vec::new(),
            shed: Shed::default(),
            walks: HashMap::new(),
            short_keys: Vec::new(),
            phase_ids: Vec::new(),
            python_rules: Vec::new(),
            python_matched: Vec::new(),
            python_phase_of: HashMap::new(),
            stack_python_phase: 0,
        }
    }

    /// Phase rules are given: kernel phase id `i` is `names[i]` (0 is none), `python` are
    /// matched in stacks' Python frames; frees are counted by phase.
    pub fn set_phases(&mut self, names: &[String], python: &[PythonRule]) {
        self.set_kernel_phases(names);
        self.python_rules = (python.iter())
            .map(|r| (r.clone(), self.ledger.phase(&r.name)))
            .collect();
        self.python_matched = vec![false; self.python_rules.len()];
        self.ledger.count_phase_frees();
    }

    /// Kernel phase id `i` is `names[i]` from now on (a rule attached late).
    pub fn set_kernel_phases(&mut self, names: &[String]) {
        self.phase_ids = names.iter().map(|n| self.ledger.phase(n)).collect();
    }

    /// The Python rules that matched a frame so far, as given.
    pub fn python_rules_matched(&self) -> Vec<String> {
        (self.python_rules.iter().zip(&self.python_matched))
            .filter(|(_, m)| **m)
            .map(|((r, _), _)| r.rule.clone())
            .collect()
    }

    /// The ledger's phase of a record's kernel phase id (none for an id no rule has).
    fn phase(&self, kernel: u32) -> PhaseId {
        self.phase_ids.get(kernel as usize).copied().unwrap_or(0)
    }

    /// The phase of an event whose stack was just read: the thread's (a native rule's), else
    /// that of the stack's Python frames.
    fn event_phase(&self, kernel: u32) -> PhaseId {
        match self.phase(kernel) {
            0 => self.stack_python_phase,
            // Idle is what no phase explains: a Python phase of the stack does.
            _ if kernel == tracer_common::phase::IDLE && self.stack_python_phase != 0 => {
                self.stack_python_phase
            }
            native => native,
        }
    }

    /// Applies the records of a batch, in ring order.
    pub fn apply_batch(&mut self, batch: &RecordBatch) {
        for record in batch.records() {
            self.apply(record);
        }
    }

    /// Applies one ring record; one that cannot be decoded is counted as lost.
    pub fn apply(&mut self, record: &[u8]) {
        self.events += 1;
        self.stack_python_phase = 0;
        match events::decode(record) {
            Some(Event::Alloc(ev, stack)) => self.heap_alloc(&ev, &stack),
            Some(Event::HeapStack(ev, stack)) => self.heap_stack(&ev, &stack),
            Some(Event::Free(ev)) => {
                (self.ledger).free_in(ev.tgid, ev.addr, self.phase(ev.phase));
                if self.torch.has_pinned() {
                    // cuMemFreeHost of a pinned block PyTorch cached.
                    (self.torch).driver_freed(&mut self.ledger, ev.tgid, ev.addr);
                }
            }
            Some(Event::Map(ev, stack)) => self.mapping(&ev, &stack),
            Some(Event::Fault(ev, stack)) => {
                let stack = self.stack_of(ev.tgid, &stack);
                self.ledger.fault(ev.tgid, stack, u64::from(ev.weight));
            }
            Some(Event::CudaCall(ev, stack)) => {
                let stack = self.stack_of(ev.tgid, &stack);
                let at = (stack, self.ips.as_slice());
                self.cuda.call(&mut self.ledger, &mut self.vmm, &ev, at);
                self.torch_sees_mapping(&ev);
            }
            Some(Event::Torch(ev, stack)) => {
                let creates = ev.nframes > 0 || ev.stack_flags != 0;
                let stack = if creates {
                    self.stack_of(ev.tgid, &stack)
                } else {
                    None
                };
                let phase = self.event_phase(ev.phase);
                self.torch.apply_in(&mut self.ledger, &ev, stack, phase);
            }
            Some(Event::Proc(ev)) => self.process(ev),
            None => self.undecodable += 1,
        }
    }

    /// A hooked allocating call returned: a heap block (malloc family) or CUDA memory.
    fn heap_alloc(&mut self, ev: &AllocEvent, stack: &RawStack) {
        let is_realloc = matches!(
            HeapFn::from_u32(ev.func),
            Some(HeapFn::Realloc | HeapFn::Reallocarray)
        );
        if ev.addr == 0 && is_realloc && ev.size == 0 && ev.old_block() != 0 {
            // glibc's realloc(p, 0) frees p and returns NULL.
            (self.ledger).free_in(ev.tgid, ev.old_block(), self.phase(ev.phase));
            return;
        }
        let stack = self.stack_of(ev.tgid, stack);
        if let Some(runtime) = hooks::runtime_hook(ev.func) {
            self.cuda
                .runtime_return(&mut self.ledger, ev, runtime, stack);
            return;
        }
        let cuda = hooks::cuda_hook(ev.func);
        if ev.addr == 0 {
            self.alloc_failure(ev, cuda, stack);
            return;
        }
        if cuda.is_some() {
            // A tensor of PyTorch's cudaMallocAsync backend, if the thread is in mallocAsync.
            (self.torch).driver_allocated(&mut self.ledger, ev.tid, ev.addr, ev.size);
        }
        let (phase, thread_phase) = (self.event_phase(ev.phase), self.phase(ev.phase));
        let at = match cuda {
            Some(hook) => {
                let at = self.cuda.placement(&mut self.ledger, ev, hook);
                // A graph capture's own phase stands.
                let phase = if at.phase == 0 { phase } else { at.phase };
                CellRef {
                    stack,
                    phase,
                    thread_phase,
                    ..at
                }
            }
            None => CellRef {
                phase,
                thread_phase,
                ..CellRef::new(ev.tgid, Class::Heap, stack)
            },
        };
        if cuda.is_some_and(|hook| self.counted_by_cuda_layer(ev, hook.records, at)) {
            return;
        }
        // --heap-sample: a recorded block stands for size / p bytes (exact without sampling).
        let bytes = match cuda {
            Some(_) => ev.size,
            None => tracer_common::heap_sample::estimate(ev.size, ev.aux as u32),
        };
        if is_realloc {
            self.ledger
                .realloc(ev.tgid, ev.old_block(), ev.addr, bytes, at);
        } else {
            self.ledger.alloc(ev.tgid, ev.addr, bytes, at);
        }
    }

    /// The stack of a key the kernel's heap ledger counts: its blocks go to that stack's cell.
    fn heap_stack(&mut self, ev: &AllocEvent, stack: &RawStack) {
        let covered = usize::try_from(ev.aux).unwrap_or(usize::MAX);
        let stack = self.heap_stack_of(ev.tgid, stack, covered);
        let at = CellRef {
            phase: self.event_phase(ev.phase),
            ..CellRef::new(ev.tgid, Class::Heap, stack)
        };
        let cell = self.ledger.cell_of(at);
        self.kernel_heap.register(ev.stack_key, ev.tgid, cell);
    }

    /// Reads what the kernel's heap ledger counted (`set_kernel_totals`) since the last call;
    /// `complete`: it knew every block (none went past a full ledger).
    pub fn sync_kernel_heap(&mut self, complete: bool) {
        if let Some(kernel) = self.kernel_totals.as_deref() {
            self.kernel_heap.sync(&mut self.ledger, kernel, complete);
        }
    }

    /// At the end: stacks the kernel counted whose names never reached user space (the ring had
    /// no room each time one of their blocks came) are counted under one frame that says so.
    pub fn adopt_undelivered_heap(&mut self) {
        let Some(kernel) = self.kernel_totals.as_deref() else {
            return;
        };
        let (stacks, ledger) = (&mut self.stacks, &mut self.ledger);
        let mut cell_of = |pid: u32| {
            let frame = stacks.python_frame(STACK_NOT_RECEIVED.to_string());
            let stack = stacks.intern(pid, &[frame], 0);
            ledger.cell_of(CellRef::new(pid, Class::Heap, stack))
        };
        self.kernel_heap.adopt_undelivered(kernel, &mut cell_of);
    }

    /// The kernel keeps a heap ledger: its totals are read from `kernel`.
    pub fn set_kernel_totals(&mut self, kernel: Box<dyn KernelTotals>) {
        self.kernel_totals = Some(kernel);
    }

    /// Driver allocations the CUDA layer counts by itself: VMM handles, and allocations made
    /// inside a runtime call, counted when it returns, at the runtime caller's stack (libcudart
    /// has no frame pointers: the driver's own walk stops in it). Whether it took the event.
    fn counted_by_cuda_layer(&mut self, ev: &AllocEvent, records: Records, at: CellRef) -> bool {
        match records {
            Records::VmmCreate => {
                self.vmm
                    .create(&mut self.ledger, ev.tgid, ev.addr, ev.size, at);
            }
            Records::VmmRetain => self.vmm.retain(ev.tgid, ev.addr),
            Records::Alloc if hooks::runtime_hook(ev.enclosing_calls().runtime).is_some() => {
                self.cuda.defer_alloc(*ev, at);
            }
            _ => return false,
        }
        true
    }

    /// A driver mapping changed under PyTorch's allocators: vLLM's sleep and wake unmap and
    /// map device memory, the pinned allocator's host-register mode unregisters its blocks.
    fn torch_sees_mapping(&mut self, ev: &CudaCallEvent) {
        if ev.ret != 0 {
            return;
        }
        let [addr, size, ..] = ev.args;
        match hooks::cuda_hook(ev.func).map(|h| h.records) {
            Some(Records::VmmUnmap) => self.torch.driver_unmapped(ev.tgid, addr, size),
            Some(Records::VmmMap) => self.torch.driver_mapped(ev.tgid, addr, size),
            Some(Records::HostUnregister) => {
                (self.torch).driver_freed(&mut self.ledger, ev.tgid, addr);
            }
            _ => {}
        }
    }

    /// A hooked allocating call failed: a failure of its function, class and error.
    fn alloc_failure(
        &mut self,
        ev: &AllocEvent,
        cuda: Option<&'static CudaHook>,
        stack: Option<StackIndex>,
    ) {
        let (function, error) = match cuda {
            Some(hook) => (hook.symbol.to_string(), hooks::cuda_error_name(ev.err)),
            None => (self.heap_fn_name(ev.func), events::errno_name(ev.err)),
        };
        let failure = FailureKey {
            class: cuda.map_or(Class::Heap, |hook| hook.class),
            pid: ev.tgid,
            function,
            size: ev.size,
            error,
            stack,
        };
        match cuda {
            Some(_) => self.cuda.driver_failure(&mut self.ledger, ev, failure),
            None => self.ledger.failure(failure),
        }
    }

    /// The name of hooked heap function `func` as failures show it.
    fn heap_fn_name(&self, func: u32) -> String {
        self.fn_names
            .get(&func)
            .cloned()
            .unwrap_or_else(|| format!("fn{func}"))
    }

    /// A memory syscall returned: the mapping layer follows it.
    fn mapping(&mut self, ev: &MapEvent, stack: &RawStack) {
        let stack = self.stack_of(ev.tgid, stack);
        let stack = (stack, self.event_phase(ev.phase));
        let (pid, a) = (ev.tgid, ev.args);
        let ledger = &mut self.ledger;
        match ev.op {
            map_op::MMAP => self.mmap(ev, stack),
            map_op::MUNMAP => self.mappings.unmap(ledger, pid, a[0], a[1]),
            map_op::MPROTECT => self.mappings.protect(ledger, pid, a[0], a[1], a[2] != 0),
            map_op::MREMAP => {
                let at = |class| map_cell(ev, class, stack);
                let (old, new) = ((a[0], a[1]), (ev.ret, a[2]));
                self.mappings
                    .remap(ledger, pid, old.0, old.1, new.0, new.1, Class::Mmap, at);
            }
            map_op::MADVISE => ledger.released(pid, stack.0, mappings::page_up(a[1])),
            map_op::BRK => {
                // A duty-cycled heap's allocator grows the break between windows too, where no
                // probe marks it: the break is the allocator's, whose blocks the windows count.
                let at = map_cell(ev, Class::Heap, stack).filter(|_| !ledger.duty_cycled());
                self.mappings.brk(ledger, pid, ev.ret, at);
            }
            _ => self.undecodable += 1,
        }
    }

    /// An mmap returned: a new mapping in the class its flags (or its stack, for CPython's
    /// arenas) say; mapped code makes the process's frame namer look again.
    fn mmap(&mut self, ev: &MapEvent, stack: (Option<StackIndex>, PhaseId)) {
        let (pid, [_, len, prot, flags, fd]) = (ev.tgid, ev.args);
        let fd = fd as i32;
        if prot & PROT_EXEC != 0 && fd >= 0 {
            if let Some(namer) = self.namers.get_mut(&pid) {
                namer.maps_changed();
            }
            if !self.code_mapped.contains(&pid) {
                self.code_mapped.push(pid);
            }
        }
        let class = match mappings::mmap_class(flags, fd, || fd::fd_target(pid, fd).ok()) {
            Class::Mmap if len >= PYTHON_ARENA_MIN && self.is_python_arena(pid) => {
                Class::PythonArena
            }
            class => class,
        };
        let at = map_cell(ev, class, stack);
        self.mappings
            .map(&mut self.ledger, pid, (ev.ret, len), prot != 0, class, at);
    }

    /// A process-tree event: a child inherits its parent's mappings and frame namer; an exec
    /// ends what the old image had. Kept for the recorder to act on.
    fn process(&mut self, ev: ProcEvent) {
        match ev.op {
            proc_op::FORK => self.fork(ev.parent, ev.pid),
            proc_op::EXEC => self.exec(ev.pid),
            _ => {}
        }
        self.proc_events.push(ev);
    }

    fn fork(&mut self, parent: u32, child: u32) {
        self.mappings.fork(parent, child);
        self.learn_code_of(child);
        if let Some(parent) = self.namers.get(&parent) {
            let namer = parent.for_child(child);
            self.namers.insert(child, namer);
        }
    }

    fn exec(&mut self, pid: u32) {
        // The old image's stacks are named with the old image's mappings.
        self.unwinders.remove(&pid);
        self.pythons.remove(&pid);
        if let Some(mut namer) = self.namers.remove(&pid) {
            self.stacks.name_pending_of(pid, &mut namer);
        }
        // Its memory went with the old address space.
        self.torch.forget_process(&mut self.ledger, pid);
        self.ledger.forget_process(pid);
        if let Some(kernel) = self.kernel_totals.as_deref_mut() {
            (self.kernel_heap).forget_process(&mut self.ledger, pid, kernel);
        }
        self.mappings.forget_process(&mut self.ledger, pid);
    }

    /// The process-tree events applied since the last call.
    pub fn take_proc_events(&mut self) -> Vec<ProcEvent> {
        std::mem::take(&mut self.proc_events)
    }

    /// The processes that mapped code since the last call.
    pub fn take_code_mapped(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.code_mapped)
    }

    /// NVML's figure for `pid` against its traced device bytes: the driver's hidden memory
    /// charged (`cuda::HiddenMemory`), several calls named by a one-frame stack of their own.
    pub fn sample_hidden(&mut self, pid: u32, used: u64, traced: u64) {
        let stacks = &mut self.stacks;
        let named = |label: String, first: &[u64]| {
            let mut ips = vec![stacks.python_frame(label)];
            ips.extend_from_slice(first);
            stacks.intern(pid, &ips, 0)
        };
        self.cuda
            .hidden
            .sample(&mut self.ledger, pid, (used, traced), named);
    }

    /// The stacks interned since the last call, named.
    pub fn take_new_stacks(&mut self) -> impl Iterator<Item = crate::model::Stack> + '_ {
        self.stacks.take_new(&mut self.namers)
    }

    /// Whether the Python frames of `pid` should be read and are not yet.
    pub fn wants_python(&self, pid: u32) -> bool {
        self.python_frames && !self.pythons.contains_key(&pid)
    }

    /// Reads the Python frames of `pid`'s events from now on.
    pub fn add_python(&mut self, pid: u32, python: PythonProcess) {
        self.pythons.insert(pid, python);
    }

    /// Events lost, by cause: the kernel's drops (`drop_cause` order), then records that could
    /// not be decoded.
    pub fn lost(&self, kernel_drops: [u64; drop_cause::COUNT as usize]) -> BTreeMap<String, u64> {
        let mut lost: BTreeMap<String, u64> = drop_cause::NAMES
            .iter()
            .zip(kernel_drops)
            .map(|(name, n)| (name.to_string(), n))
            .collect();
        if self.undecodable > 0 {
            lost.insert(UNDECODABLE.to_string(), self.undecodable);
        }
        lost
    }
}

/// The cell a mapping event's bytes go to, at its (stack, phase): none for a mapping made
/// inside a hooked allocator call (the heap counts those bytes block by block).
fn map_cell(
    ev: &MapEvent,
    class: Class,
    (stack, phase): (Option<StackIndex>, PhaseId),
) -> Option<CellRef> {
    (ev.flags & MAP_FROM_ALLOCATOR == 0).then(|| CellRef {
        phase,
        ..CellRef::new(ev.tgid, class, stack)
    })
}
