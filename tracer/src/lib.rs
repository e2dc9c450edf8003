//! alloctrace: eBPF memory-allocation tracer. Data flows probes → events → ledger → recording → views.
pub mod events;
pub mod hooks;
pub mod ledger;
pub mod model;
pub mod probes;
// pub mod record;
pub mod stacks;
pub mod target;
