//! The sink fed with synthetic ring records, laid out as the eBPF programs write them (the
//! `#[repr(C)]` events of tracer-common, then their stack). No root needed.

use std::collections::HashMap;

use tracer_common::{
    AllocEvent, FreeEvent, HeapFn, MAP_FROM_ALLOCATOR, MapEvent, ProcEvent, drop_cause, event_kind,
    heap_ledger::StackTotals, map_op, proc_op,
};

use super::EventSink;
use crate::{
    ledger::kernel_heap::KernelTotals,
    model::{Class, PAGE},
    session::batch::BatchBuilder,
};

/// Above PID_MAX_LIMIT (2^22): never a live process, so nothing is read from /proc.
const PID: u32 = 999_999_999;
const CHILD: u32 = 999_999_998;

/// The frame every synthetic event carries.
const CALLER: u64 = 0x5555_0000_1234;

fn sink() -> EventSink {
    let names = HashMap::from([(HeapFn::Realloc as u32, "realloc".to_string())]);
    EventSink::new(PID, Vec::new(), names, false, false)
}

/// The bytes of a plain-old-data event.
fn bytes_of<T: Copy>(event: &T) -> Vec<u8> {
    // SAFETY: reading the bytes of a plain-old-data value.
    unsafe { std::slice::from_raw_parts((event as *const T).cast::<u8>(), size_of::<T>()).to_vec() }
}

/// An event followed by a one-frame stack.
fn with_stack<T: Copy>(event: &T) -> Vec<u8> {
    let mut record = bytes_of(event);
    record.extend(CALLER.to_ne_bytes());
    record
}

/// A heap function returning `addr` for `size` bytes (`old` is realloc's block).
fn heap_alloc(func: HeapFn, addr: u64, size: u64, old: u64) -> Vec<u8> {
    with_stack(&AllocEvent {
        kind: event_kind::ALLOC,
        tgid: PID,
        tid: PID,
        nframes: 1,
        stack_flags: 0,
        addr,
        size,
        origin: old,
        err: if addr == 0 { libc::ENOMEM } else { 0 },
        func: func as u32,
        aux: 0,
        stack_key: 0,
        phase: 0,
        _pad: 0,
    })
}

fn heap_free(addr: u64) -> Vec<u8> {
    bytes_of(&FreeEvent {
        kind: event_kind::FREE,
        tgid: PID,
        addr,
        phase: 0,
        _pad: 0,
    })
}

/// A memory syscall `op` with its arguments and return value.
fn map_event(op: u32, args: [u64; 5], ret: u64, flags: u32) -> Vec<u8> {
    with_stack(&MapEvent {
        kind: event_kind::MAP,
        tgid: PID,
        tid: PID,
        nframes: 1,
        stack_flags: 0,
        op,
        flags,
        ret,
        args,
        phase: 0,
        _pad: 0,
    })
}

fn proc_event(op: u32, pid: u32, parent: u32) -> ProcEvent {
    ProcEvent {
        kind: event_kind::PROC,
        op,
        pid,
        parent,
    }
}

/// (live bytes, live count) of `class`.
fn live(sink: &EventSink, class: Class) -> (u64, u64) {
    let totals = sink.ledger.totals(class);
    (totals.live_bytes, totals.live_count)
}

const PROT_RW: u64 = 0x3;
const PRIVATE_ANONYMOUS: u64 = 0x22;
const NO_FD: u64 = -1i64 as u64;

#[test]
fn a_heap_block_lives_until_freed() {
    let mut sink = sink();
    sink.apply(&heap_alloc(HeapFn::Malloc, 0x1000, 64, 0));
    assert_eq!(live(&sink, Class::Heap), (64, 1));
    assert_eq!(sink.ledger.block_size(PID, 0x1000), Some(64));
    assert_eq!(sink.ledger.live_of(PID, |c| c == Class::Heap), 64);
    sink.apply(&heap_alloc(HeapFn::Calloc, 0x2000, 1000, 0));
    assert_eq!(live(&sink, Class::Heap), (1064, 2));
    sink.apply(&heap_free(0x1000));
    assert_eq!(live(&sink, Class::Heap), (1000, 1));
    assert_eq!(sink.ledger.block_size(PID, 0x1000), None);
    sink.apply(&heap_free(0x2000));
    assert_eq!(live(&sink, Class::Heap), (0, 0));
    assert_eq!(sink.events, 4);
    // Both allocations came from the same caller: one stack.
    assert_eq!(sink.take_new_stacks().count(), 1);
}

#[test]
fn realloc_moves_a_block_and_realloc_to_zero_frees_it() {
    let mut sink = sink();
    sink.apply(&heap_alloc(HeapFn::Malloc, 0x1000, 100, 0));
    sink.apply(&heap_alloc(HeapFn::Realloc, 0x2000, 300, 0x1000));
    assert_eq!(live(&sink, Class::Heap), (300, 1));
    assert_eq!(sink.ledger.block_size(PID, 0x1000), None);
    assert_eq!(sink.ledger.block_size(PID, 0x2000), Some(300));
    // realloc(NULL, n) is malloc(n).
    sink.apply(&heap_alloc(HeapFn::Reallocarray, 0x3000, 8, 0));
    assert_eq!(live(&sink, Class::Heap), (308, 2));
    // glibc's realloc(p, 0) frees p and returns NULL: no failure.
    sink.apply(&heap_alloc(HeapFn::Realloc, 0, 0, 0x2000));
    assert_eq!(live(&sink, Class::Heap), (8, 1));
    let state = sink
        .ledger
        .state(&sink.lost([0; drop_cause::COUNT as usize]));
    assert!(state.failures.is_empty(), "{:?}", state.failures);
    // A realloc that fails leaves its block and is a failure of `realloc`.
    sink.apply(&heap_alloc(HeapFn::Realloc, 0, 1 << 40, 0x3000));
    assert_eq!(live(&sink, Class::Heap), (8, 1));
    let state = sink
        .ledger
        .state(&sink.lost([0; drop_cause::COUNT as usize]));
    let failures: Vec<_> = state.failures.keys().collect();
    assert_eq!(failures.len(), 1);
    assert_eq!(
        (
            failures[0].function.as_str(),
            failures[0].error.as_str(),
            failures[0].size
        ),
        ("realloc", "ENOMEM", 1 << 40)
    );
}

#[test]
fn a_mapping_counts_its_pages_until_unmapped() {
    let mut sink = sink();
    let base = 0x7f00_0000_0000;
    let mmap = [0, 5 * PAGE, PROT_RW, PRIVATE_ANONYMOUS, NO_FD];
    sink.apply(&map_event(map_op::MMAP, mmap, base, 0));
    assert_eq!(live(&sink, Class::Mmap), (5 * PAGE, 1));
    // Two pages out of the middle: the rest is still one mapping.
    let munmap = [base + PAGE, 2 * PAGE, 0, 0, 0];
    sink.apply(&map_event(map_op::MUNMAP, munmap, 0, 0));
    assert_eq!(live(&sink, Class::Mmap), (3 * PAGE, 1));
    sink.apply(&map_event(map_op::MUNMAP, [base, 5 * PAGE, 0, 0, 0], 0, 0));
    assert_eq!(live(&sink, Class::Mmap), (0, 0));
    // A mapping made inside a hooked allocator is the heap's: counted in no class.
    let inside = map_event(map_op::MMAP, mmap, base, MAP_FROM_ALLOCATOR);
    sink.apply(&inside);
    assert_eq!(live(&sink, Class::Mmap), (0, 0));
    // Anonymous shared memory and thread stacks are classes of their own.
    let shared = [0, PAGE, PROT_RW, 0x21, NO_FD];
    sink.apply(&map_event(map_op::MMAP, shared, base + (16 * PAGE), 0));
    assert_eq!(live(&sink, Class::MmapShared), (PAGE, 1));
    let stack = [0, 2 * PAGE, PROT_RW, PRIVATE_ANONYMOUS | 0x20000, NO_FD];
    sink.apply(&map_event(map_op::MMAP, stack, base + (32 * PAGE), 0));
    assert_eq!(live(&sink, Class::ThreadStack), (2 * PAGE, 1));
}

#[test]
fn undecodable_records_count_as_lost() {
    let mut sink = sink();
    let no_loss = sink.lost([0; drop_cause::COUNT as usize]);
    assert!(no_loss.values().all(|&n| n == 0), "{no_loss:?}");
    sink.apply(&[9, 0, 0, 0, 1, 2, 3, 4]);
    sink.apply(&[]);
    // A heap event shorter than its frame count says.
    let record = heap_alloc(HeapFn::Malloc, 0x1000, 64, 0);
    sink.apply(&record[..record.len() - 8]);
    // A mapping event of no known syscall.
    sink.apply(&map_event(99, [0; 5], 0, 0));
    assert_eq!(sink.events, 4);
    assert_eq!(live(&sink, Class::Heap), (0, 0));
    let lost = sink.lost([3, 0, 1, 0, 0]);
    assert_eq!(lost.get("undecodable_record"), Some(&4));
    assert_eq!(lost.get(drop_cause::NAMES[0]), Some(&3));
    assert_eq!(lost.values().sum::<u64>(), 8);
}

#[test]
fn process_events_are_kept_for_the_recorder() {
    let mut sink = sink();
    let exit = proc_event(proc_op::EXIT, PID, 0);
    sink.apply(&bytes_of(&exit));
    assert_eq!(sink.take_proc_events(), vec![exit]);
    assert_eq!(sink.take_proc_events(), vec![], "handed on once");
    assert_eq!(sink.events, 1);
    assert_eq!(live(&sink, Class::Heap), (0, 0));
}

#[test]
fn an_exec_ends_the_old_images_memory() {
    let mut sink = sink();
    let fork = proc_event(proc_op::FORK, CHILD, PID);
    sink.apply(&bytes_of(&fork));
    sink.apply(&heap_alloc(HeapFn::Malloc, 0x1000, 64, 0));
    let mmap = [0, 2 * PAGE, PROT_RW, PRIVATE_ANONYMOUS, NO_FD];
    sink.apply(&map_event(map_op::MMAP, mmap, 0x7f00_0000_0000, 0));
    assert_eq!(live(&sink, Class::Heap), (64, 1));
    assert_eq!(live(&sink, Class::Mmap), (2 * PAGE, 1));
    let exec = proc_event(proc_op::EXEC, PID, 0);
    sink.apply(&bytes_of(&exec));
    assert_eq!(live(&sink, Class::Heap), (0, 0));
    assert_eq!(live(&sink, Class::Mmap), (0, 0));
    assert_eq!(sink.take_proc_events(), vec![fork, exec]);
}

#[test]
fn a_batch_applies_its_records_in_order() {
    let mut sink = sink();
    let mut batch = BatchBuilder::new();
    batch.push(&heap_alloc(HeapFn::Malloc, 0x1000, 64, 0));
    batch.push(&heap_alloc(HeapFn::Malloc, 0x2000, 32, 0));
    batch.push(&heap_free(0x1000));
    sink.apply_batch(&batch.take().expect("a batch"));
    assert_eq!(sink.events, 3);
    assert_eq!(live(&sink, Class::Heap), (32, 1));
}

/// The kernel's heap ledger as the sink sees it: totals per stack key.
#[derive(Default)]
struct KernelFake(std::sync::Arc<std::sync::Mutex<HashMap<u64, StackTotals>>>);

impl KernelTotals for KernelFake {
    fn read(&self, key: u64) -> Option<StackTotals> {
        self.0.lock().unwrap().get(&key).copied()
    }
    fn forget(&mut self, key: u64) {
        self.0.lock().unwrap().remove(&key);
    }
    fn heap_peak(&self) -> Option<u64> {
        None
    }
    fn all(&self) -> Vec<(u64, StackTotals)> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect()
    }
}

#[test]
fn blocks_the_kernel_holds_count_at_their_stack_and_go_with_an_exec() {
    let mut sink = sink();
    let kernel = KernelFake::default();
    let totals = kernel.0.clone();
    sink.set_kernel_totals(Box::new(kernel));
    // The stack of a key the kernel counts (with the call that first made it: counted there).
    let mut stack = heap_alloc(HeapFn::Malloc, 0x1000, 64, 0);
    let at = std::mem::offset_of!(AllocEvent, stack_key);
    stack[at..at + 8].copy_from_slice(&77u64.to_ne_bytes());
    stack[..4].copy_from_slice(&event_kind::HEAP_STACK.to_ne_bytes());
    // Its key covers every native frame.
    let aux = std::mem::offset_of!(AllocEvent, aux);
    stack[aux..aux + 8].copy_from_slice(&64u64.to_ne_bytes());
    sink.apply(&stack);
    assert_eq!(live(&sink, Class::Heap), (0, 0), "the kernel counts it");
    totals.lock().unwrap().insert(
        77,
        StackTotals {
            allocated_bytes: 6400,
            allocated_count: 100,
            freed_bytes: 640,
            freed_count: 10,
            tgid: PID,
            delivered: 1,
            ..StackTotals::default()
        },
    );
    sink.sync_kernel_heap(true);
    assert_eq!(live(&sink, Class::Heap), (5760, 90));
    assert_eq!(sink.take_new_stacks().count(), 1);
    // An exec: the old image's blocks are gone, its key forgotten in the kernel.
    sink.apply(&bytes_of(&proc_event(proc_op::EXEC, PID, 0)));
    assert_eq!(live(&sink, Class::Heap), (0, 0));
    assert!(totals.lock().unwrap().is_empty());
    assert_eq!(sink.ledger.totals(Class::Heap).allocated_count, 100);
}

/// `--phase`: records carry the kernel's phase id; the sink puts each block and mapping in its
/// phase's cell, and counts each free by (allocated-in, freed-in) phase; an id no rule has is
/// none.
#[test]
fn blocks_and_mappings_go_to_their_phase_and_frees_are_counted_by_phase() {
    let mut sink = sink();
    sink.set_phases(&["none".into(), "load".into(), "serve".into()], &[]);
    let in_phase = |mut record: Vec<u8>, phase: u32, at: usize| {
        record[at..at + 4].copy_from_slice(&phase.to_ne_bytes());
        record
    };
    let alloc_at = std::mem::offset_of!(AllocEvent, phase);
    let free_at = std::mem::offset_of!(FreeEvent, phase);
    let map_at = std::mem::offset_of!(MapEvent, phase);
    sink.apply(&in_phase(
        heap_alloc(HeapFn::Malloc, 0x1000, 100, 0),
        1,
        alloc_at,
    ));
    sink.apply(&in_phase(
        heap_alloc(HeapFn::Malloc, 0x2000, 200, 0),
        2,
        alloc_at,
    ));
    sink.apply(&in_phase(
        heap_alloc(HeapFn::Malloc, 0x3000, 300, 0),
        2,
        alloc_at,
    ));
    sink.apply(&in_phase(
        heap_alloc(HeapFn::Malloc, 0x4000, 400, 0),
        9,
        alloc_at,
    ));
    let mmap = [0, 2 * PAGE, PROT_RW, PRIVATE_ANONYMOUS, NO_FD];
    sink.apply(&in_phase(
        map_event(map_op::MMAP, mmap, 0x7000_0000, 0),
        2,
        map_at,
    ));
    sink.apply(&in_phase(heap_free(0x2000), 2, free_at));
    sink.apply(&in_phase(heap_free(0x3000), 0, free_at));
    sink.apply(&in_phase(heap_free(0x1000), 2, free_at));
    let state = sink.ledger.state(&Default::default());
    let mut live: Vec<(Class, &str, u64, u64)> = (state.cells.iter())
        .map(|(k, c)| (k.class, k.phase.as_str(), c.live_bytes, c.allocated_bytes))
        .collect();
    live.sort();
    assert_eq!(
        live,
        [
            (Class::Heap, "load", 0, 100),
            (Class::Heap, "none", 400, 400),
            (Class::Heap, "serve", 0, 500),
            (Class::Mmap, "serve", 2 * PAGE, 2 * PAGE),
        ]
    );
    assert_eq!(
        sink.ledger.phase_frees(),
        [
            ((Class::Heap, "load", "serve"), (100, 1)),
            ((Class::Heap, "serve", "none"), (300, 1)),
            ((Class::Heap, "serve", "serve"), (200, 1)),
        ]
    );
}
