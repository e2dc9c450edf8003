//! alloctrace: eBPF memory-allocation tracer. Data flows one way, one folder a stage:
//! `probes` (kernel programs attached to the target) → `events` (ring records decoded) →
//! `session` (the recording loop, one method per event source) → the ledger layers (`ledger`:
//! live blocks and mappings; `cuda`: the driver layer and what it hides) → `recording` (the
//! crash-safe file) → `views` (report, flamegraph). `hooks` is the hook table every stage reads;
//! `proc`, `elf`, `stacks` and `python` read the target.
pub mod cuda;
pub mod escape;
pub mod events;
pub mod hooks;
pub mod ledger;
pub mod model;
pub mod output;
pub mod probes;
pub mod proc;
pub mod python;
pub mod recording;
pub mod session;
pub mod stacks;
pub mod views;
