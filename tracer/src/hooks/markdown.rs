//! docs/hooks.md, generated from the tables (`alloctrace hooks`; a test keeps the file in sync).

use std::fmt::Write as _;

use super::{
    CUDA_HOOKS, HOOKS, PROCESS_TRACEPOINTS, PROFILES, RUNTIME_HOOKS, Records, SYSCALL_TRACEPOINTS,
    Site, TORCH_HOOKS,
};

/// The table as the Markdown document docs/hooks.md (kept in sync by a test).
pub fn markdown() -> String {
    let mut out = String::new();
    heap_section(&mut out);
    cuda_driver_section(&mut out);
    cuda_runtime_section(&mut out);
    torch_allocator_section(&mut out);
    tracepoint_section(&mut out);
    phase_profiles_section(&mut out);
    out.push_str(
        "\nSymbols that are aliases of each other (same file offset, e.g. glibc 2.36's \
         `aligned_alloc` and `memalign`) get one probe, named after both in table order (`aligned_alloc/memalign`), \
         so no call is counted twice.\n",
    );
    out
}

/// "`entry` + `return`", or "`entry`" for a hook without a return probe.
fn probes(entry_program: &str, return_program: Option<&str>) -> String {
    match return_program {
        Some(ret) => format!("`{entry_program}` + `{ret}`"),
        None => format!("`{entry_program}`"),
    }
}

fn heap_section(out: &mut String) {
    out.push_str(
        "# Hooked functions\n\n\
         Generated from `tracer/src/hooks/` by `alloctrace hooks`; a test keeps this file in \
         sync.\n\n\
         | symbol | library | prototype | entry site | probes | records | class | accounting |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for h in HOOKS {
        let site = match h.site {
            Site::Entry => "entry",
            Site::AfterNullCheck => "after the NULL check (entry if none)",
        };
        let records = match h.records {
            Records::Alloc => "allocation",
            Records::Free => "free",
            _ => "call",
        };
        let _ = writeln!(
            out,
            "| `{}` | {} | `{}` | {} | {} | {} | `{}` | {} |",
            h.symbol,
            h.library.describe(),
            h.prototype,
            site,
            probes(h.entry_program, h.return_program),
            records,
            h.class.name(),
            h.accounting
        );
    }
}

fn cuda_driver_section(out: &mut String) {
    out.push_str(
        "\n## CUDA driver (`libcuda.so.1`, hooked in every traced process that maps it, also when \
         it is loaded after attach)\n\n\
         | symbol | prototype | probes | records | class |\n|---|---|---|---|---|\n",
    );
    for h in CUDA_HOOKS {
        let records = if h.records.samples_gpu() {
            format!("{}; NVML sampled right after", h.records.describe())
        } else {
            h.records.describe().to_string()
        };
        let _ = writeln!(
            out,
            "| `{}` | `{}` | {} | {records} | `{}` |",
            h.symbol,
            h.prototype,
            probes(h.entry_program, h.return_program),
            h.class.name()
        );
    }
}

fn cuda_runtime_section(out: &mut String) {
    out.push_str(
        "\n## CUDA runtime (`libcudart.so*` when shared; annotation only)\n\n\
         Never counted: the driver call they make is. A driver failure inside one is named after \
         both (`cudaMalloc → cuMemAlloc_v2`); a runtime call that fails without a driver failure \
         (no driver, no device) is a failure of its own, with its `cudaError_t` name.\n\n\
         | symbol | prototype | probes | class |\n|---|---|---|---|\n",
    );
    for h in RUNTIME_HOOKS {
        let _ = writeln!(
            out,
            "| `{}` | `{}` | `{}` + `{}` | `{}` |",
            h.symbol,
            h.prototype,
            h.entry_program,
            h.return_program.unwrap_or("-"),
            h.class.name()
        );
    }
}

fn torch_allocator_section(out: &mut String) {
    out.push_str(
        "\n## PyTorch caching allocator (`libc10_cuda.so`, symbols from `.symtab`)\n\n\
         One entry probe; no return probe. Its bytes are a view inside the device classes: \
         `torch` (live tensors, by the stack that allocated them) and `torch-cached` (reserved, \
         not allocated; by the stack that grew the segment) are never added to a device total. \
         A library with none of these symbols: the layer says so in one line, the rest works.\n\n\
         | symbol | prototype | probe | records |\n|---|---|---|---|\n",
    );
    for h in TORCH_HOOKS {
        let _ = writeln!(
            out,
            "| `{}` | `{}` | `{}` | {} |",
            h.symbol,
            h.prototype,
            h.entry_program,
            h.records.describe()
        );
    }
}

fn tracepoint_section(out: &mut String) {
    out.push_str(
        "\n## Tracepoints\n\nNo uprobe trap; filtered by process in the kernel.\n\n\
         | tracepoint | program | records |\n|---|---|---|\n",
    );
    for tp in SYSCALL_TRACEPOINTS.iter().chain(PROCESS_TRACEPOINTS) {
        let name = match tp.category {
            "syscalls" => format!("`syscalls:sys_enter_{n}` + `sys_exit_{n}`", n = tp.name),
            _ => format!("`{}:{}`", tp.category, tp.name),
        };
        let _ = writeln!(out, "| {name} | `{}` | {} |", tp.program, tp.records);
    }
}

fn phase_profiles_section(out: &mut String) {
    out.push_str(
        "\n## Phase profiles\n\nThe functions that begin each phase of the servers alloctrace \
         knows (`record --phase` rules, built in; `--no-phase-profiles` turns them off). Python \
         functions (`py:MODULE:QUALNAME`) are matched in the Python frames of stacks: no probe. \
         Native functions get an entry probe (`phase_enter`) where a traced process maps their \
         library. Checked against the releases in \
         `tracer/src/hooks/phase_profile_names.txt`.\n\n\
         | server | phase | function | releases read that have it |\n|---|---|---|---|\n",
    );
    for profile in PROFILES {
        for rule in profile.rules {
            let releases = super::phase_profiles::releases_of(profile.package, rule.site);
            let _ = writeln!(
                out,
                "| {} | `{}` | `{}` | {} |",
                profile.server,
                rule.phase,
                rule.site,
                releases.join(", ")
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docs_hooks_md_is_generated_from_the_table() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/hooks.md");
        let on_disk = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            on_disk == markdown(),
            "docs/hooks.md is out of date: run `cargo run -p tracer -- hooks > docs/hooks.md`"
        );
    }
}
