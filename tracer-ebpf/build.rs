use which::which;

/// Rebuild the eBPF object when the linker changes (the template's trick: cargo cannot see it otherwise).
fn main() {
    if let Ok(linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
