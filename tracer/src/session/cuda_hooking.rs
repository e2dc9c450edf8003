//! Hooking the CUDA libraries of traced processes: the driver, the shared runtime, runtimes
//! linked statically into other objects and PyTorch's caching allocator, as they appear (they are
//! usually dlopen'ed late).

use std::collections::HashSet;

use crate::{
    hooks::Records,
    probes::{Probes, resolve},
    proc::maps::Mapping,
};

/// CUDA objects hooked so far, and objects known to hold no CUDA runtime.
#[derive(Default)]
pub struct CudaHooked {
    /// (pid, inode) of the objects hooked in each process.
    hooked: HashSet<(u32, u64)>,
    /// Inodes of objects read for a static runtime and found without one.
    without_runtime: HashSet<u64>,
    /// Inodes of PyTorch libraries without the caching allocator's known hook (said once).
    unknown_torch: HashSet<u64>,
    /// Inodes of PyTorch libraries without any known hook (not read again).
    no_torch_hooks: HashSet<u64>,
    /// Hook PyTorch's caching allocator (`record --no-torch-allocator` turns it off).
    torch_allocator: bool,
}

impl CudaHooked {
    pub fn new(torch_allocator: bool) -> CudaHooked {
        CudaHooked {
            torch_allocator,
            ..CudaHooked::default()
        }
    }
}

/// Hooks the CUDA driver of `pid`, its shared runtime and the runtimes linked statically into its
/// other objects, for those not hooked yet in it (at attach, and each second after: CUDA
/// libraries are usually dlopen'ed later), as `maps` (its mappings now) show them. Says so on
/// stderr.
pub fn hook_cuda(pid: u32, maps: &[Mapping], probes: &mut Probes, done: &mut CudaHooked) {
    // The runtime is hooked before the driver is loaded (it loads the driver inside its first
    // call), and fails by itself without one.
    let mut objects: Vec<(&str, resolve::CudaObject)> = Vec::new();
    // PyTorch's allocator first: one probe, and the layer a PyTorch server is debugged at; the
    // driver's dozens of probes take a tenth of a second each to go live.
    let known =
        |inode: u64| done.hooked.contains(&(pid, inode)) || done.no_torch_hooks.contains(&inode);
    let (torch, pinned) = if done.torch_allocator {
        let torch = resolve::find_torch_allocator(pid, maps, known);
        (torch, resolve::find_torch_pinned(pid, maps, known))
    } else {
        (None, None)
    };
    if let Some(torch) = torch {
        if torch.points.is_empty() {
            done.no_torch_hooks.insert(torch.inode);
        }
        let caching = crate::hooks::has_record_trace(torch.points.iter().map(|&(i, _)| i));
        if !caching && done.unknown_torch.insert(torch.inode) {
            // The cudaMallocAsync backend's hooks, if any, are still attached.
            eprintln!(
                "torch allocator layer: not available for torch {} (no known hook symbols in {})",
                torch_version(pid, &torch.target_path)
                    .as_deref()
                    .map_or("(version unknown)", |v| v),
                crate::escape::for_terminal(&torch.target_path)
            );
        }
        let what = if caching {
            "PyTorch caching allocator"
        } else {
            "PyTorch cudaMallocAsync backend"
        };
        objects.push((what, torch));
    }
    if let Some(pinned) = pinned {
        let has =
            |records| (pinned.points.iter()).any(|&(i, _)| pinned.hooks[i].records == records);
        if has(Records::TorchPinnedAlloc) {
            objects.push(("PyTorch pinned host allocator", pinned));
        } else {
            done.no_torch_hooks.insert(pinned.inode);
            if has(Records::TorchPinnedFree) {
                eprintln!(
                    "torch pinned host allocator: not available in {} (its allocate does not end \
                     in a ret alloctrace can probe)",
                    crate::escape::for_terminal(&pinned.target_path)
                );
            }
        }
    }
    let hooked = |inode: u64| done.hooked.contains(&(pid, inode));
    objects.extend(resolve::find_cuda_driver(pid, maps, hooked).map(|d| ("CUDA driver", d)));
    objects.extend(resolve::find_cuda_runtime(pid, maps, hooked).map(|rt| ("CUDA runtime", rt)));
    let (statics, without) = resolve::find_static_cuda_runtimes(pid, maps, |inode| {
        done.without_runtime.contains(&inode) || done.hooked.contains(&(pid, inode))
    });
    done.without_runtime.extend(without);
    objects.extend(statics.into_iter().map(|rt| ("static CUDA runtime", rt)));
    for (what, object) in objects {
        if object.points.is_empty() || done.hooked.contains(&(pid, object.inode)) {
            continue;
        }
        match probes.attach_cuda(pid, &object) {
            Ok(()) => {
                done.hooked.insert((pid, object.inode));
                eprintln!(
                    "hooked {} in PID {pid}: {} {what} probes",
                    crate::escape::for_terminal(&object.target_path),
                    object.points.len()
                );
            }
            Err(e) => log::warn!("PID {pid}: {what} not hooked: {e}"),
        }
    }
}

/// The version of the torch package a `torch/lib/libc10_cuda.so` belongs to, from its
/// `torch/version.py` (`__version__ = '2.11.0+cu130'`), escaped for the terminal.
fn torch_version(pid: u32, library: &str) -> Option<String> {
    // The path as the target sees it, read through its root (its mount namespace).
    let lib_dir = std::path::Path::new(library).parent()?;
    let version_py = lib_dir.parent()?.join("version.py");
    let text = std::fs::read_to_string(format!("/proc/{pid}/root{}", version_py.display())).ok()?;
    let line = text.lines().find(|l| l.starts_with("__version__"))?;
    let version = line.split(['\'', '"']).nth(1)?;
    Some(crate::escape::for_terminal(version).into_owned())
}
