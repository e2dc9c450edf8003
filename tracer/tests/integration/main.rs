//! The integration tests: one binary (one build of the shared helpers, one fixture build each),
//! a module per suite. Most suites load eBPF programs and need root (`require_privileges!`).

#[macro_use]
mod common;

mod bad_input;
mod check;
mod demo;
mod hostile_target;
mod python_frames;
mod record_children;
mod record_command;
mod record_cuda;
mod record_heap;
mod record_lifecycle;
mod record_mappings;
mod record_oom;
mod record_python;
mod record_rss;
mod record_stacks;
mod record_torch;
mod unwind;
