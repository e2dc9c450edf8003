//! Sampling the resident memory of traced processes, split by what the mapping layer traced.

use crate::{
    ledger::mappings::MappingLedger,
    model::RssSample,
    proc::{smaps, status},
};

/// Resident memory of `pid` from /proc/PID/smaps (and status for shared memory and swap);
/// `None` once it is gone.
pub fn sample_rss(pid: u32, t_s: u64, mappings: &MappingLedger) -> Option<RssSample> {
    let status = status::read_status(pid).ok()?;
    let smaps = smaps::read_smaps(pid).unwrap_or_default();
    let (traced_resident, arena_resident) = mappings.resident(pid, &smaps.vmas);
    // Exact totals from smaps; the shared-memory split only status has (approximate).
    let shmem = status.rss_shmem.min(smaps.rss.saturating_sub(smaps.anon));
    // A zombie has released its memory: no sample rather than zeros.
    (smaps.rss > 0).then(|| RssSample {
        t_s,
        pid,
        rss: smaps.rss,
        anon: smaps.anon,
        file: smaps.rss - smaps.anon - shmem,
        shmem,
        swap: status.swap,
        arena: mappings.arena_bytes(pid),
        traced_resident,
        arena_resident,
    })
}

/// This process's peak resident memory (VmHWM), KiB; 0 if unreadable.
pub fn own_peak_rss_kib() -> u64 {
    status::own_status().map_or(0, |s| s.peak_rss / 1024)
}
