//! `alloctrace report`: the JSON contract (docs/recording.md, "The JSON report", in `json`) and
//! the text postmortem (`text`), both rendering the figures of `analysis`.

mod analysis;
mod html;
mod json;
mod phases;
mod suspects;
mod text;
mod verdict;

pub use analysis::{gpu_residuals, waterfall};
pub use json::JSON_SCHEMA;
use serde::Serialize;
pub use suspects::suspects;

use crate::recording::Recorded;

/// The JSON report, pretty-printed, ending in a newline; no character a terminal acts on is
/// written raw.
pub fn render_json(rec: &Recorded) -> String {
    crate::escape::for_json(json::render(rec))
}

/// The postmortem as one self-contained HTML page.
pub fn render_html(rec: &Recorded) -> String {
    html::render(rec)
}

/// The human postmortem: what the target held when the recording ended, where, and how it grew.
pub fn render_text(rec: &Recorded) -> String {
    text::render(rec)
}

/// The leak test's section of the text report alone (`alloctrace check` prints it).
pub fn render_check_text(rec: &Recorded) -> String {
    let mut out = String::new();
    text::text_check(&mut out, rec);
    out.trim_start_matches('\n').to_string()
}

/// The leak test's verdict on a recording `alloctrace check` made; None for another recording,
/// or one with fewer than two batches marked.
pub fn check_verdict(rec: &Recorded) -> Option<crate::views::check::Verdict> {
    crate::views::check::analyse(&rec.marks, rec.check?).map(|a| a.verdict)
}

/// NVML's figure for a process and what alloctrace traced: `untraced` is the memory nobody
/// traced (driver context, modules, graph pools, ...), class `gpu-untraced` of the accounting.
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpuResidual {
    pub pid: u32,
    pub t_s: u64,
    pub used: u64,
    pub traced: u64,
    /// `used - traced`; negative when traced device memory exceeds what the driver reports.
    pub untraced: i64,
}

/// RSS = file-backed resident + shared memory + anonymous, and the anonymous part broken down
/// into what alloctrace traced (docs/accounting.md, "RSS reconciliation").
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Waterfall {
    pub pid: u32,
    pub t_s: u64,
    pub rss: u64,
    pub file: u64,
    pub shmem: u64,
    pub anon: u64,
    /// Live bytes of class `heap`: malloc blocks with --heap, else the program break's growth.
    pub heap_live: u64,
    /// Resident allocator arena traced since attach minus live malloc bytes (free chunks the
    /// allocator keeps).
    pub allocator_retained: u64,
    /// Resident bytes of the traced anonymous mappings (classes `mmap`, `thread-stack`,
    /// `python-arena`), from /proc/PID/smaps.
    pub traced_mappings: u64,
    /// Their live (accessible, mapped) bytes, resident or not.
    pub traced_mappings_mapped: u64,
    /// `anon` minus the three above; negative when the allocator's mapped arena is not all
    /// resident.
    pub untraced_anon: i64,
    /// Of `untraced_anon`, at most what was anonymous and resident when the recorder attached
    /// to a running target (phase `pre-attach`: no probe saw it made); null for a launched
    /// command.
    pub pre_attach: Option<u64>,
    /// Changes since the first sample (t = `first_t_s`).
    pub first_t_s: u64,
    pub rss_growth: i64,
    pub anon_growth: i64,
    pub file_growth: i64,
    pub shmem_growth: i64,
}
