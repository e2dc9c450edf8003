//! The kernel's heap ledger (exact `--heap` with frame-pointer heap stacks). Every heap block
//! made while it is on is held here (process and address → size, stack key, image generation;
//! in a recent slot, `heap_recent.rs`, while one is free, else in `HELD_BLOCKS`) and counted in
//! its stack's totals (`STACK_TOTALS`, keyed by a hash of the stack); its free is matched here.
//! Such a call puts nothing in the ring: each stack goes to user space once
//! (`event_kind::HEAP_STACK`), tried again at the stack's next block while the ring has no room,
//! so a burst of new stacks delays names, never bytes. Failures and what the kernel could not
//! hold (counted, `LEDGER_STATS`) go through the ring as events. No call rate outruns user
//! space, which reads each stack's totals once a second. Holding every block, the kernel also
//! keeps the heap's live bytes and peak at every call (`HEAP_LIVE`); an exec takes out the old
//! image's share, summed from its stacks' totals. The accounting rules are the user-space
//! ledger's (`tracer/src/ledger/mod.rs`).

use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd};

use aya_ebpf::bindings::BPF_NOEXIST;
use tracer_common::{
    MAX_FRAMES, StackArea, drop_cause,
    heap_ledger::{BlockKey, HeldBlock, StackTotals, TracedProcess},
    ledger_stat,
    python::MAX_PY_FRAMES,
};

use crate::{
    diag, heap_recent,
    maps::{
        HEAP_DUTY_CYCLED, HEAP_KERNEL_LEDGER, HEAP_LIVE, HELD_BLOCKS, KEY_FRAMES, LEDGER_STATS,
        PY_OFFSETS, STACK_TOTALS, global,
    },
    stack::forget_value,
    traced::{self, Traced},
};

const EEXIST: i32 = 17;

/// Python frames' words a stack key covers at most (two per frame).
const KEY_PY_WORDS: usize = 2 * MAX_PY_FRAMES;

/// What user space set for a process in maps of their own, as a heap call needs it.
#[derive(Copy, Clone)]
pub struct Settings {
    /// Native frames its stack keys cover (`KEY_FRAMES`; all by default).
    pub key_frames: usize,
    /// Whether it runs CPython (`PY_OFFSETS` has it): else no stack of it has Python frames
    /// to look for.
    pub python: bool,
}

/// `Settings::encode`: this bit (0: never read), `SETTINGS_PYTHON`, and the key's native
/// frames (low byte). `TracedProcess::settings` keeps the `SETTINGS_VERSION` they were read at
/// in its high half.
const SETTINGS_READ: u32 = 1 << 31;
const SETTINGS_PYTHON: u32 = 1 << 30;
const _: () = assert!(MAX_FRAMES <= 0xff);

impl Settings {
    /// As one word, never 0.
    #[inline(always)]
    pub fn encode(self) -> u32 {
        let python = if self.python { SETTINGS_PYTHON } else { 0 };
        SETTINGS_READ | python | self.key_frames as u32
    }

    /// From `encode`'s word.
    #[inline(always)]
    pub fn decode(word: u32) -> Settings {
        Settings {
            key_frames: (word & 0xff) as usize,
            python: word & SETTINGS_PYTHON != 0,
        }
    }
}

/// The settings of `tgid`, read from their maps.
#[inline(always)]
fn read_settings(tgid: u32) -> Settings {
    // SAFETY: lookups of plain values.
    let key_frames = match unsafe { KEY_FRAMES.get(tgid) } {
        Some(&n) => (n as usize).min(MAX_FRAMES),
        None => MAX_FRAMES,
    };
    // SAFETY: as above.
    let python = unsafe { PY_OFFSETS.get(tgid) }.is_some();
    Settings { key_frames, python }
}

/// The settings of traced process `tgid` (`process`, its `TARGETS` value): as the value caches
/// them, unless user space changed any since (`SETTINGS_VERSION` is no longer `version`); then
/// read from their maps, and cached. Threads of a process may read and cache them at once:
/// they write the same value, one word.
#[inline(always)]
pub fn settings((tgid, process): (u32, *mut TracedProcess), version: u32) -> Settings {
    // SAFETY: a map value, valid while this program runs.
    let cached = unsafe { core::ptr::read_volatile(&raw const (*process).settings) };
    if cached as u32 & SETTINGS_READ != 0 && (cached >> 32) as u32 == version {
        return Settings::decode(cached as u32);
    }
    let settings = read_settings(tgid);
    let word = u64::from(version) << 32 | u64::from(settings.encode());
    // SAFETY: as above; an aligned 8-byte store, seen whole by other CPUs.
    unsafe { core::ptr::write_volatile(&raw mut (*process).settings, word) };
    settings
}

/// The settings of `tgid`, traced (`process`) or not.
#[inline(always)]
pub fn settings_of((tgid, process): (u32, Process)) -> Settings {
    process.map_or_else(|| read_settings(tgid), |p| p.settings)
}

/// Whether the kernel keeps the heap ledger in this recording.
#[inline(always)]
pub fn enabled() -> bool {
    global(&HEAP_KERNEL_LEDGER) != 0
}

/// The calling process as a heap call sees it, looked up once per call (`traced.rs`); None if
/// it is not traced.
pub type Process = Option<Traced>;

/// Traced process `tgid`; None if it is not traced.
#[inline(always)]
pub fn process(tgid: u32) -> Process {
    traced::traced(tgid)
}

/// The image generation of `process` (0 if untraced).
#[inline(always)]
pub fn generation(process: Process) -> u32 {
    process.map_or(0, |p| p.generation)
}

#[inline(always)]
fn mix(h: u64) -> u64 {
    let h = h.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h ^ (h >> 29)
}

/// The key of a stack of `nframes` native frames then Python frames up to `bytes` bytes:
/// its first `covered` native frames, its Python frames and flags, mixed with the process and its
/// image generation (an exec'd image's stacks get new keys, so that user space can retire the old
/// image's) and the phase it was made in. Never 0 (0 is "no key" in `AllocEvent`).
#[inline(always)]
pub fn stack_key(
    (tgid, generation): (u32, u32),
    (flags, phase): (u16, u32),
    area: &StackArea,
    (nframes, bytes): (usize, usize),
    covered: usize,
) -> u64 {
    let mut h = mix((u64::from(tgid) << 32 | u64::from(generation)) ^ 0x5bd1_e995);
    h = mix(h ^ covered as u64);
    // Each bound is laundered (`forget_value`): the walk before knows the frame count exactly
    // on each of its paths, and a loop's exit pins its bound; verified with a known bound, the
    // loops would be verified once per frame count, and the program would be too large.
    let native_end = forget_value(nframes.min(covered));
    for i in 0..MAX_FRAMES {
        if i >= native_end {
            break;
        }
        h = mix(h ^ area[i]);
    }
    // The Python words follow the native frames. The index is masked so that the verifier
    // sees it bounded (a sum with the frame count would not be).
    let start = forget_value(nframes);
    let words = bytes / 8;
    for j in 0..KEY_PY_WORDS {
        let at = (start + j) & 0x7f;
        if at >= words || at < start {
            break;
        }
        h = mix(h ^ area[at]);
    }
    let h = mix(h ^ u64::from(flags) ^ u64::from(phase) << 16);
    if h == 0 { 1 } else { h }
}

/// Adds `n` (wrapping: a subtraction as its complement) to a counter other CPUs update too.
#[inline(always)]
fn add(counter: *mut u64, n: u64) {
    // SAFETY: the counter lives in a map value (8-byte aligned) for as long as this program
    // runs.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, n) };
}

/// `add` that returns the counter's new value (the BPF target's generic CPU has no fetching
/// add: a compare-and-exchange, retried a few times; None if other CPUs kept winning, and
/// the plain add was made).
#[inline(always)]
fn add_fetch(counter: *mut u64, n: u64) -> Option<u64> {
    // SAFETY: as in `add`.
    let mut seen = unsafe { core::ptr::read_volatile(counter) };
    for _ in 0..4 {
        let new = seen.wrapping_add(n);
        // SAFETY: as in `add`.
        let (was, done) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::Relaxed }, { AtomicOrdering::Relaxed }>(
                counter, seen, new,
            )
        };
        if done {
            return Some(new);
        }
        seen = was;
    }
    add(counter, n);
    None
}

/// Raises `peak` to `now` unless another CPU raised it past `now` meanwhile.
#[inline(always)]
fn raise(peak: *mut u64, now: u64) {
    // SAFETY: as in `add`.
    let mut seen = unsafe { core::ptr::read_volatile(peak) };
    for _ in 0..4 {
        if now <= seen {
            return;
        }
        // SAFETY: as in `add`.
        let (was, done) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::Relaxed }, { AtomicOrdering::Relaxed }>(
                peak, seen, now,
            )
        };
        if done {
            return;
        }
        seen = was;
    }
}

/// Counts one more of `stat` (a `ledger_stat`).
#[inline(always)]
pub fn count(stat: u32) {
    if let Some(slot) = LEDGER_STATS.get_ptr_mut(stat) {
        // SAFETY: per-CPU slot: no other writer while this program runs.
        unsafe { *slot += 1 };
    }
}

/// `size` bytes became live (`grew`) or stopped being live: the heap's live bytes and its peak
/// follow.
#[inline(always)]
fn count_live(size: u64, grew: bool) {
    let n = if grew { size } else { size.wrapping_neg() };
    let Some(heap) = HEAP_LIVE.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: the map's one value, valid while this program runs.
    let (live, peak) = unsafe { (&raw mut (*heap).live, &raw mut (*heap).peak) };
    if !grew {
        add(live, n);
        return;
    }
    match add_fetch(live, n) {
        Some(now) => raise(peak, now),
        // Contended: the live figure read now, at most the other CPUs' blocks away.
        // SAFETY: as above.
        None => raise(peak, unsafe { core::ptr::read_volatile(live) }),
    }
}

/// A process image's live heap bytes, summed over its stacks' totals (`image_stack`).
#[repr(C)]
struct ImageHeap {
    tgid: u32,
    generation: u32,
    live: u64,
}

/// An exec replaced image `generation` of process `tgid`: its heap went with the old address
/// space, and leaves the live bytes. Its share is the sum of its stacks' totals: every block
/// the kernel holds is counted there and in the live bytes alike, and no thread of the image
/// is left to change them. Once per exec, a walk of the stacks table.
#[inline(always)]
pub fn forget_image(tgid: u32, generation: u32) {
    if !enabled() {
        return;
    }
    let mut image = ImageHeap {
        tgid,
        generation,
        live: 0,
    };
    // SAFETY: `image_stack` has the callback's signature; `image` outlives the call; the map
    // pointer is the map's definition (`HashMap` is transparent over it).
    unsafe {
        aya_ebpf::helpers::generated::bpf_for_each_map_elem(
            (&raw const STACK_TOTALS).cast_mut().cast(),
            image_stack as *mut core::ffi::c_void,
            (&raw mut image).cast(),
            0,
        )
    };
    if let Some(heap) = HEAP_LIVE.get_ptr_mut(0) {
        // SAFETY: the map's one value, valid while this program runs.
        add(unsafe { &raw mut (*heap).live }, image.live.wrapping_neg());
    }
}

/// A `bpf_for_each_map_elem` turn of `forget_image`: adds a stack's live bytes if it is the
/// image's; 0 goes on.
#[inline(never)]
extern "C" fn image_stack(
    _map: *mut core::ffi::c_void,
    _key: *mut core::ffi::c_void,
    value: *mut core::ffi::c_void,
    ctx: *mut core::ffi::c_void,
) -> i64 {
    // SAFETY: the helper passes a `STACK_TOTALS` value and the `ImageHeap` given to it.
    let (totals, image) = unsafe { (&*value.cast::<StackTotals>(), &mut *ctx.cast::<ImageHeap>()) };
    if totals.tgid == image.tgid && totals.generation == image.generation {
        let live = totals.allocated_bytes.wrapping_sub(totals.freed_bytes);
        image.live = image.live.wrapping_add(live);
    }
    0
}

/// Counts `block` as freed in its stack's totals (none once user space retired the stack).
#[inline(always)]
fn count_freed(block: &HeldBlock) {
    let Some(totals) = STACK_TOTALS.get_ptr_mut(block.stack_key) else {
        return;
    };
    // SAFETY: a map value, valid while this program runs.
    unsafe {
        add(&raw mut (*totals).freed_bytes, block.size);
        add(&raw mut (*totals).freed_count, 1);
    }
}

/// Whether a released block was held here.
#[derive(Copy, Clone, PartialEq, Eq)]
pub enum Released {
    /// It was, and is now counted freed.
    Kernel,
    /// Not here: made before the ledger knew the process (or its image), or went through the
    /// ring when the ledger was full.
    Unknown,
}

/// A block `process` releases: it leaves the live bytes and its stack's totals.
#[inline(always)]
fn end_block(process: Process, block: &HeldBlock) -> Released {
    if block.generation != generation(process) {
        // The old image's block, gone with it at the exec.
        return Released::Unknown;
    }
    count_live(block.size, false);
    count_freed(block);
    crate::phase::count_free(u32::from(block.phase), block.size);
    Released::Kernel
}

/// The block `HELD_BLOCKS` holds at `key`, unless its slot pair's count says it holds none
/// of the pair (`heap_recent::may_be_spilled`).
#[inline(always)]
fn held(key: &BlockKey) -> Option<HeldBlock> {
    if !heap_recent::may_be_spilled(key.tgid, key.addr) {
        return None;
    }
    // SAFETY: a lookup of a plain value.
    unsafe { HELD_BLOCKS.get(key) }.copied()
}

/// Takes the block at `key` out of `HELD_BLOCKS`, its pair's count with it (if it was still
/// there: another CPU may have taken it since it was read).
#[inline(always)]
fn unhold(key: &BlockKey) {
    if HELD_BLOCKS.remove(key).is_ok() {
        heap_recent::count_spilled(key.tgid, key.addr, false);
    }
}

/// A release of the block at `addr` by `tgid` (free, realloc's old block).
#[inline(always)]
pub fn release((tgid, process): (u32, Process), addr: u64) -> Released {
    let key = BlockKey {
        tgid,
        _pad: 0,
        addr,
    };
    // One `end_block` call site, wherever the block was: the verifier walks it once.
    let block = match recent_block(tgid, addr, false) {
        Some(block) => block,
        None => {
            let Some(block) = held(&key) else {
                return Released::Unknown;
            };
            unhold(&key);
            block
        }
    };
    end_block(process, &block)
}

/// A realloc of the block at `addr` by `tgid` begins: until it returns, an allocation of the
/// same address by another thread is the realloc's release, seen early (not a missed free).
#[inline(always)]
pub fn mark_reallocating(tgid: u32, addr: u64, reallocating: bool) {
    if heap_recent::enabled() && heap_recent::mark_reallocating(tgid, addr, reallocating) {
        return;
    }
    let key = BlockKey {
        tgid,
        _pad: 0,
        addr,
    };
    if heap_recent::may_be_spilled(tgid, addr)
        && let Some(block) = HELD_BLOCKS.get_ptr_mut(&key)
    {
        // SAFETY: a map value, valid while this program runs.
        unsafe {
            core::ptr::write_volatile(&raw mut (*block).reallocating, u16::from(reallocating))
        };
    }
}

/// The release of realloc's old block at its return: only if the block held at `addr` is still
/// the one the realloc was given. When another thread's allocation took the address in between,
/// it already counted this block freed, and the block now held there is that thread's.
#[inline(always)]
pub fn release_reallocated((tgid, process): (u32, Process), addr: u64) -> Released {
    let key = BlockKey {
        tgid,
        _pad: 0,
        addr,
    };
    let block = match recent_block(tgid, addr, true) {
        Some(block) => block,
        None => match held(&key) {
            Some(block) if block.reallocating != 0 => {
                unhold(&key);
                block
            }
            _ => return Released::Unknown,
        },
    };
    end_block(process, &block)
}

/// The block at `addr` of `tgid` taken out of its recent slot, if it is in one (and, with
/// `reallocating_only`, marked reallocating).
#[inline(always)]
fn recent_block(tgid: u32, addr: u64, reallocating_only: bool) -> Option<HeldBlock> {
    if !heap_recent::enabled() {
        return None;
    }
    heap_recent::take(tgid, addr, reallocating_only)
}

/// What `hold` did with a block.
#[derive(Copy, Clone, PartialEq, Eq)]
pub enum Held {
    /// Held and counted here; the stack still has to go to user space (`deliver`).
    Undelivered,
    /// Held and counted here: nothing to emit.
    Yes,
    /// The kernel had no room: the block goes through the ring (counted).
    Full,
}

/// The totals of stack `key` of image `generation` of process `tgid`, made (zero,
/// undelivered) if new; None when the table is full.
#[inline(always)]
fn totals_of((tgid, generation): (u32, u32), key: u64) -> Option<*mut StackTotals> {
    if let Some(totals) = STACK_TOTALS.get_ptr_mut(key) {
        return Some(totals);
    }
    let zero = StackTotals {
        allocated_bytes: 0,
        allocated_count: 0,
        freed_bytes: 0,
        freed_count: 0,
        tgid,
        delivered: 0,
        generation,
        _pad: 0,
    };
    match STACK_TOTALS.insert(key, &zero, u64::from(BPF_NOEXIST)) {
        Ok(()) => {}
        Err(e) if e == -EEXIST => {}
        Err(_) => {
            count(ledger_stat::STACKS_FULL);
            return None;
        }
    }
    STACK_TOTALS.get_ptr_mut(key)
}

/// A successful allocation of `size` bytes at `addr` by `tgid` (of `process`, whose image
/// generation the block keeps), at the stack with `key`, in `phase`.
#[inline(always)]
pub fn hold(
    (tgid, process): (u32, Process),
    addr: u64,
    size: u64,
    (key, phase): (u64, u32),
) -> Held {
    let generation = generation(process);
    let Some(totals) = totals_of((tgid, generation), key) else {
        // Its free must reach user space, which holds it.
        mark_full();
        return Held::Full;
    };
    let block = HeldBlock {
        size,
        stack_key: key,
        generation,
        reallocating: 0,
        phase: phase as u16,
    };
    if !keep((tgid, process), addr, &block) {
        return full();
    }
    count_live(size, true);
    // SAFETY: a map value, valid while this program runs.
    unsafe {
        add(&raw mut (*totals).allocated_bytes, size);
        add(&raw mut (*totals).allocated_count, 1);
        if core::ptr::read_volatile(&raw const (*totals).delivered) == 0 {
            return Held::Undelivered;
        }
    }
    Held::Yes
}

/// Keeps `block`, made at `addr` by `tgid`: in a recent slot (`heap_recent`) when one is
/// free, else in `HELD_BLOCKS`; false if neither had room. A block still held at the same
/// address is ended first.
#[inline(always)]
fn keep((tgid, process): (u32, Process), addr: u64, block: &HeldBlock) -> bool {
    let key = BlockKey {
        tgid,
        _pad: 0,
        addr,
    };
    // The older block still held at this address, ended once below: one call site, so that
    // the verifier walks its accounting (and, with `--debug-bpf`, its log) once.
    let mut old = None;
    let mut kept = false;
    if heap_recent::enabled() {
        match heap_recent::put(tgid, addr, block) {
            heap_recent::Put::Kept => {
                kept = true;
                // One table holds a block at a time: one still held at this address in the
                // hash table is ended, as the hash table's insert would have found it.
                if let Some(block) = held(&key) {
                    unhold(&key);
                    old = Some(block);
                }
            }
            // The slot held the older block: the hash table does not.
            heap_recent::Put::Replaced(in_slot) => {
                kept = true;
                old = Some(in_slot);
            }
            heap_recent::Put::NoRoom => {}
        }
    }
    if !kept {
        heap_recent::count_spilled(tgid, addr, true);
        kept = match HELD_BLOCKS.insert(&key, block, u64::from(BPF_NOEXIST)) {
            Ok(()) => true,
            Err(e) if e == -EEXIST => {
                // The block there is replaced: one block of the pair all the same.
                heap_recent::count_spilled(tgid, addr, false);
                // SAFETY: a lookup of a plain value.
                if let Some(held) = unsafe { HELD_BLOCKS.get(&key) }.copied() {
                    old = Some(held);
                }
                HELD_BLOCKS.insert(&key, block, 0).is_ok()
            }
            Err(_) => {
                heap_recent::count_spilled(tgid, addr, false);
                false
            }
        };
    }
    if let Some(old) = old {
        replaced(process, &old);
    }
    kept
}

/// `old` was still held at the address a new block of `process` was made at: a realloc in
/// flight freed it inside (counted freed here, before that realloc returns), or its free was
/// not seen (or it belonged to an exec'd image).
#[inline(always)]
fn replaced(process: Process, old: &HeldBlock) {
    if end_block(process, old) == Released::Kernel && old.reallocating == 0 {
        if global(&HEAP_DUTY_CYCLED) != 0 {
            count(ledger_stat::FREED_UNSEEN);
        } else {
            diag::lost(drop_cause::MISSED_FREE, "held heap block");
        }
    }
}

/// The stack with `key` reached user space: its next blocks need not send it again.
#[inline(always)]
pub fn delivered(key: u64) {
    if let Some(totals) = STACK_TOTALS.get_ptr_mut(key) {
        // SAFETY: a map value, valid while this program runs; any CPU writes only 1.
        unsafe { core::ptr::write_volatile(&raw mut (*totals).delivered, 1) };
    }
}

/// `HELD_BLOCKS` had no room for a block: it goes to user space, which from now on holds
/// blocks the kernel does not know (`ever_full`).
#[inline(always)]
fn full() -> Held {
    count(ledger_stat::BLOCKS_FULL);
    mark_full();
    Held::Full
}

/// A block went to user space instead of the kernel's ledger: from now on frees of blocks the
/// ledger does not know go to user space (`ever_full`), which may hold them.
#[inline(always)]
fn mark_full() {
    if let Some(heap) = HEAP_LIVE.get_ptr_mut(0) {
        // SAFETY: the map's one value, valid while this program runs; any CPU writes only 1.
        unsafe { core::ptr::write_volatile(&raw mut (*heap).full, 1) };
    }
}

/// Whether `HELD_BLOCKS` was ever full: user space may then hold blocks the kernel never knew.
#[inline(always)]
pub fn ever_full() -> bool {
    // SAFETY: the map's one value, valid while this program runs.
    HEAP_LIVE
        .get_ptr(0)
        .is_none_or(|heap| unsafe { core::ptr::read_volatile(&raw const (*heap).full) } != 0)
}
