//! Builds the eBPF object (tracer-ebpf) for the bpf target with the nightly toolchain and
//! bpf-linker, so that `cargo build` alone produces a complete `alloctrace`.
use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let root_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tracer-ebpf");
    let package = aya_build::Package {
        name: "tracer-ebpf",
        root_dir: root_dir.to_str().expect("utf-8 path"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}
