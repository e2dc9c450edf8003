// Lets `tracer` name this crate as a build-dependency (cargo needs a lib target for that).
#![no_std]
