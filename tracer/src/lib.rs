//! alloctrace: eBPF memory-allocation tracer. Data flows probes → events → ledger → recording → views.
pub mod cuda;
pub mod cuda_vmm;
pub mod events;
pub mod gpu;
pub mod hooks;
pub mod ledger;
pub mod mappings;
pub mod model;
pub mod output;
pub mod probes;
pub mod python;
pub mod record;
pub mod recording;
pub mod stacks;
pub mod target;
pub mod unwind;
pub mod views;
