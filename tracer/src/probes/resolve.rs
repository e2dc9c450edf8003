//! Where to attach: the allocator object a target maps, the file offsets of the hooked symbols,
//! and the cheapest correct probe site in each function.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use tracer_common::Cookie;

use crate::{
    arch,
    elf::{self, Elf, ElfError, Headers},
    hooks::{CUDA_HOOKS, HOOKS, Hook, RUNTIME_HOOKS, Records, Site, TORCH_HOOKS},
    proc::maps::{Mapping, open_path},
    session::target::TargetError,
};

/// Whether a path names a C library (glibc or musl).
pub fn is_libc_name(path: &str) -> bool {
    let base = path.rsplit('/').next().unwrap_or(path);
    base.starts_with("libc.so")
        || (base.starts_with("libc-") && base.contains(".so"))
        || base.starts_with("ld-musl-")
}

/// The object that provides the C allocator in `pid`: its C library, else (static executables)
/// the first executable mapping that defines `malloc`.
pub fn find_allocator(pid: u32, maps: &[Mapping]) -> Result<AllocatorObject, TargetError> {
    let mut candidates: Vec<&Mapping> = maps
        .iter()
        .filter(|m| m.executable && is_libc_name(&m.path))
        .collect();
    candidates.extend(
        maps.iter()
            .filter(|m| m.executable && !is_libc_name(&m.path)),
    );
    let mut seen = Vec::new();
    for m in candidates {
        if seen.contains(&m.inode) {
            continue;
        }
        seen.push(m.inode);
        let path = open_path(pid, m);
        if let Ok(points) = resolve_hooks(&path)
            && points
                .iter()
                .any(|p| p.hooks.iter().any(|h| h.symbol == "malloc"))
        {
            return Ok(AllocatorObject {
                target_path: m.path.clone(),
                open_path: path,
                points,
            });
        }
    }
    Err(TargetError::NoAllocator { pid })
}

/// The allocator object and its resolved attach points.
#[derive(Debug, Clone)]
pub struct AllocatorObject {
    pub target_path: String,
    pub open_path: PathBuf,
    pub points: Vec<AttachPoint>,
}

/// One probe location: all hooks whose symbols resolve to the same function (aliases) share it.
#[derive(Debug, Clone)]
pub struct AttachPoint {
    /// Hooks at this function, in table order; the first one's programs and cookie are used.
    pub hooks: Vec<&'static Hook>,
    /// File offset of the function's first instruction (return probes go here).
    pub function_offset: u64,
    /// File offset of the entry probe (may be past the entry, see `Site`).
    pub entry_offset: u64,
}

impl AttachPoint {
    pub fn hook(&self) -> &'static Hook {
        self.hooks[0]
    }

    /// `memalign/aligned_alloc` for aliases.
    pub fn name(&self) -> String {
        self.hooks
            .iter()
            .map(|h| h.symbol)
            .collect::<Vec<_>>()
            .join("/")
    }
}

/// The hook points of `hooks` in `elf`: (index in `hooks`, file offset) of each symbol it
/// defines, in table order.
fn cuda_points(
    elf: &Headers,
    file: &std::fs::File,
    hooks: &[crate::hooks::CudaHook],
) -> Vec<(usize, u64)> {
    let wanted: Vec<&str> = hooks.iter().map(|h| h.symbol).collect();
    let ranges = elf.function_ranges_streamed(file, &wanted);
    hooks
        .iter()
        .enumerate()
        .filter_map(|(i, h)| {
            let &(address, size) = ranges.get(h.symbol)?;
            let at = match h.records {
                Records::TorchPinnedAlloc => return_site(elf, file, address, size)?,
                _ => address,
            };
            Some((i, elf.file_offset(at)?))
        })
        .collect()
}

/// The `ret` a function ends with, probed instead of its return (no return trampoline for a
/// C++ exception to unwind into): its last byte, if that is a `ret` (0xc3) that no other
/// instruction's bytes overlap — none does when the function is a few instructions ending in
/// one, which the hooked ones are. None otherwise: the hook is left out (one line says so).
fn return_site(elf: &Headers, file: &std::fs::File, address: u64, size: u64) -> Option<u64> {
    use std::os::unix::fs::FileExt;
    let last = address.checked_add(size.checked_sub(1)?)?;
    let mut byte = [0u8];
    // One byte from the file: read through the parse it would be the whole segment.
    file.read_exact_at(&mut byte, elf.file_offset(last)?).ok()?;
    (byte == [0xc3]).then_some(last)
}

/// The CUDA driver a process maps (`libcuda.so*`), with the file offsets of the hooked CUDA
/// symbols it defines, in `CUDA_HOOKS` order; `None` if it maps none.
/// Objects whose inode `skip` names are not read (hooked already).
pub fn find_cuda_driver(
    pid: u32,
    maps: &[Mapping],
    skip: impl Fn(u64) -> bool,
) -> Option<CudaObject> {
    find_cuda_object(pid, maps, "libcuda.so", CUDA_HOOKS, Cookie::Cuda, skip)
}

/// The CUDA runtime a process maps as a shared library (`libcudart.so*`), with `RUNTIME_HOOKS`.
pub fn find_cuda_runtime(
    pid: u32,
    maps: &[Mapping],
    skip: impl Fn(u64) -> bool,
) -> Option<CudaObject> {
    find_cuda_object(
        pid,
        maps,
        "libcudart.so",
        RUNTIME_HOOKS,
        Cookie::Runtime,
        skip,
    )
}

/// The headers of the file at `path` and a handle to stream its symbol tables from.
fn open_headers(path: &Path) -> Option<(Headers, std::fs::File)> {
    let file = std::fs::File::open(path).ok()?;
    Some((Headers::read(path, &file).ok()?, file))
}

/// PyTorch's CUDA operators library (`libtorch_cuda.so`) of a process, with the pinned host
/// caching allocator's `TORCH_HOOKS` it defines. Read on demand: it is a gigabyte.
pub fn find_torch_pinned(
    pid: u32,
    maps: &[Mapping],
    skip: impl Fn(u64) -> bool,
) -> Option<CudaObject> {
    find_cuda_object(
        pid,
        maps,
        "libtorch_cuda.so",
        TORCH_HOOKS,
        Cookie::Torch,
        skip,
    )
}

/// PyTorch's CUDA library (`libc10_cuda.so`) of a process, with the `TORCH_HOOKS` forms its
/// `.symtab` defines (none: a torch version whose allocator alloctrace does not know).
pub fn find_torch_allocator(
    pid: u32,
    maps: &[Mapping],
    skip: impl Fn(u64) -> bool,
) -> Option<CudaObject> {
    find_cuda_object(
        pid,
        maps,
        "libc10_cuda.so",
        TORCH_HOOKS,
        Cookie::Torch,
        skip,
    )
}

/// Objects of `pid` with a CUDA runtime linked in statically (executables built by nvcc, NCCL,
/// cuBLAS, llama.cpp builds): every executable mapping other than the driver, the shared runtime
/// and the C library whose symbols (.dynsym or .symtab) define runtime entry points. Objects
/// `skip` says were looked at already are not read again. Returns the runtimes found and the
/// inodes of the objects read without one.
pub fn find_static_cuda_runtimes(
    pid: u32,
    maps: &[Mapping],
    skip: impl Fn(u64) -> bool,
) -> (Vec<CudaObject>, Vec<u64>) {
    let (mut found, mut without) = (Vec::new(), Vec::new());
    let mut seen = std::collections::HashSet::new();
    for m in maps.iter().filter(|m| may_link_cuda_runtime(m)) {
        if skip(m.inode) || !seen.insert(m.inode) {
            continue;
        }
        let open_path = open_path(pid, m);
        // The headers, then the symbol tables a chunk at a time, not a whole 1 GB libtorch
        // nor its 73 MB of names.
        let points = open_headers(&open_path)
            .map(|(headers, file)| cuda_points(&headers, &file, RUNTIME_HOOKS))
            .unwrap_or_default();
        if points.is_empty() {
            without.push(m.inode);
            continue;
        }
        found.push(CudaObject {
            hooks: RUNTIME_HOOKS,
            cookie: Cookie::Runtime,
            target_path: m.path.clone(),
            inode: m.inode,
            open_path,
            points,
        });
    }
    (found, without)
}

/// Whether mapping `m` may hold a statically linked CUDA runtime: an executable file mapping
/// other than the driver, the shared runtime, the C library and the dynamic loader.
fn may_link_cuda_runtime(m: &Mapping) -> bool {
    let base = m.path.rsplit('/').next().unwrap_or(&m.path);
    m.executable
        && m.inode != 0
        && m.path.starts_with('/')
        && !base.starts_with("libcuda.so")
        && !base.starts_with("libcudart.so")
        && !is_libc_name(&m.path)
        && !base.starts_with("ld-linux")
}

fn find_cuda_object(
    pid: u32,
    maps: &[Mapping],
    name_prefix: &str,
    hooks: &'static [crate::hooks::CudaHook],
    cookie: fn(u32) -> Cookie,
    skip: impl Fn(u64) -> bool,
) -> Option<CudaObject> {
    let m = maps.iter().find(|m| {
        let base = m.path.rsplit('/').next().unwrap_or(&m.path);
        m.executable && base.starts_with(name_prefix)
    })?;
    // Read once: the driver is tens of megabytes (a libtorch_cuda.so a gigabyte), and this runs
    // whenever code is mapped.
    if skip(m.inode) {
        return None;
    }
    let open_path = open_path(pid, m);
    let (headers, file) = open_headers(&open_path)?;
    let points = cuda_points(&headers, &file, hooks);
    Some(CudaObject {
        hooks,
        cookie,
        target_path: m.path.clone(),
        inode: m.inode,
        open_path,
        points,
    })
}

/// The CUDA driver object of a process and its hook points: (index in `CUDA_HOOKS`, offset).
#[derive(Debug, Clone)]
pub struct CudaObject {
    /// The table `points` index into (`CUDA_HOOKS` or `RUNTIME_HOOKS`).
    pub hooks: &'static [crate::hooks::CudaHook],
    /// The cookie of `hooks[index]`: `Cookie::Cuda` or `Cookie::Runtime`.
    pub cookie: fn(u32) -> Cookie,
    pub target_path: String,
    pub inode: u64,
    pub open_path: PathBuf,
    pub points: Vec<(usize, u64)>,
}

/// Resolves every hook of the table in the ELF object at `path` (missing symbols are skipped).
pub fn resolve_hooks(path: &Path) -> Result<Vec<AttachPoint>, ElfError> {
    let data = elf::read(path)?;
    let wanted: Vec<&str> = HOOKS.iter().map(|h| h.symbol).collect();
    let offsets = Elf::parse(path, &*data)?.function_offsets(&wanted);

    let mut by_offset: BTreeMap<u64, AttachPoint> = BTreeMap::new();
    for hook in HOOKS {
        let Some(&offset) = offsets.get(hook.symbol) else {
            continue;
        };
        let point = by_offset.entry(offset).or_insert_with(|| AttachPoint {
            hooks: Vec::new(),
            function_offset: offset,
            entry_offset: offset,
        });
        point.hooks.push(hook);
    }
    let mut points: Vec<AttachPoint> = by_offset.into_values().collect();
    for p in &mut points {
        if p.hook().site == Site::AfterNullCheck {
            let code = data.get(p.function_offset as usize..).unwrap_or(&[]);
            p.entry_offset = p.function_offset + arch::after_null_check(code);
        }
    }
    points.sort_by_key(|p| p.hook().func as u32);
    Ok(points)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_this_machines_libc_with_aliases_deduplicated() {
        let maps = crate::proc::maps::read_maps(std::process::id()).unwrap();
        let alloc = find_allocator(std::process::id(), &maps).unwrap();
        let names: Vec<String> = alloc.points.iter().map(|p| p.name()).collect();
        assert!(names.contains(&"malloc".to_string()), "{names:?}");
        assert!(names.contains(&"free".to_string()), "{names:?}");
        let mut offsets: Vec<u64> = alloc.points.iter().map(|p| p.function_offset).collect();
        offsets.dedup();
        assert_eq!(offsets.len(), alloc.points.len(), "aliases share one point");
        let hooks: usize = alloc.points.iter().map(|p| p.hooks.len()).sum();
        assert_eq!(hooks, HOOKS.len(), "glibc provides every hooked function");
    }
}
