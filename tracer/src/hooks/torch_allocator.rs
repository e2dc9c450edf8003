//! PyTorch's CUDA caching allocator (`libc10_cuda.so`): the one function every allocator event
//! goes through, `DeviceCachingAllocator::record_trace`, in each signature PyTorch has given it;
//! and the `cudaMallocAsync` backend (`PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync`), whose
//! `mallocAsync`/`freeAsync` record no trace.
//!
//! Entry probes only: these functions throw (an OOM is a C++ exception), and an exception that
//! unwinds through a return probe's trampoline terminates the process. That is why torch 2.1 is
//! not hooked: its `record_trace` is only called while memory history is recorded, and its other
//! allocation entry, `NativeCachingAllocator::malloc`, hands the block out through an
//! out-pointer that only a return probe could read.
//!
//! The library is built with hidden visibility: these symbols are only in `.symtab` (the PyPI
//! wheels are not stripped). The names are mangled; `torch_symbols.txt` beside this file lists the
//! real ones per torch version (from the PyPI wheels), and a test checks this table against it.
//! From 2.2 on the first six arguments sit in the same registers in every form (this, action,
//! addr, size, stream, device); what the forms add (pool id, context, annotation) is passed after
//! them and not read.

use tracer_common::Cookie;

use super::{CudaHook, Records};
use crate::model::Class;

const RECORD_TRACE: &str = "torch_record_trace";
/// The forms that pass the pool (`MempoolId_t`, 2.8 on): the program reads it from the stack.
const RECORD_TRACE_POOL: &str = "torch_record_trace_pool";
const ASYNC_MALLOC: &str = "torch_async_malloc";
const ASYNC_FREE: &str = "torch_async_free";
const PINNED_ALLOC: &str = "torch_pinned_alloc";
const PINNED_FREE: &str = "torch_pinned_free";

/// `record_trace` in each form, newest first; `prototype` names the torch versions. Torch 2.1's
/// form is left out on purpose: it has no device argument (the sixth register holds the
/// context's address) and its callers only call it while memory history is recorded.
pub const TORCH_HOOKS: &[CudaHook] = &[
    CudaHook {
        symbol: "_ZN3c104cuda20CUDACachingAllocator6Native22DeviceCachingAllocator12record_traceENS_22CachingDeviceAllocator10TraceEntry6ActionEmmP11CUstream_staSt4pairIyyESt10shared_ptrINS_15GatheredContextEESt8optionalINSt7__cxx1112basic_stringIcSt11char_traitsIcESaIcEEEE",
        prototype: "torch 2.14–2.15: void record_trace(c10::CachingDeviceAllocator::TraceEntry::Action, size_t addr, size_t size, cudaStream_t, c10::DeviceIndex, MempoolId_t, std::shared_ptr<GatheredContext>, std::optional<std::string> compile_context)",
        entry_program: RECORD_TRACE_POOL,
        return_program: None,
        records: Records::TorchTrace,
        class: Class::Torch,
    },
    CudaHook {
        symbol: "_ZN3c104cuda20CUDACachingAllocator6Native22DeviceCachingAllocator12record_traceENS_22CachingDeviceAllocator10TraceEntry6ActionEmmP11CUstream_staSt4pairIyyESt10shared_ptrINS_15GatheredContextEE",
        prototype: "torch 2.11–2.13: void record_trace(c10::CachingDeviceAllocator::TraceEntry::Action, size_t addr, size_t size, cudaStream_t, c10::DeviceIndex, MempoolId_t, std::shared_ptr<GatheredContext>)",
        entry_program: RECORD_TRACE_POOL,
        return_program: None,
        records: Records::TorchTrace,
        class: Class::Torch,
    },
    CudaHook {
        symbol: "_ZN3c104cuda20CUDACachingAllocator6Native22DeviceCachingAllocator12record_traceENS1_10TraceEntry6ActionEmmP11CUstream_staSt4pairIyyESt10shared_ptrINS_15GatheredContextEE",
        prototype: "torch 2.8–2.10: void record_trace(TraceEntry::Action, size_t addr, size_t size, cudaStream_t, c10::DeviceIndex, MempoolId_t, std::shared_ptr<GatheredContext>)",
        entry_program: RECORD_TRACE_POOL,
        return_program: None,
        records: Records::TorchTrace,
        class: Class::Torch,
    },
    CudaHook {
        symbol: "_ZN3c104cuda20CUDACachingAllocator6Native22DeviceCachingAllocator12record_traceENS1_10TraceEntry6ActionEmmP11CUstream_staSt10shared_ptrINS_15GatheredContextEE",
        prototype: "torch 2.4–2.7: void record_trace(TraceEntry::Action, size_t addr, size_t size, cudaStream_t, c10::DeviceIndex, std::shared_ptr<GatheredContext>)",
        entry_program: RECORD_TRACE,
        return_program: None,
        records: Records::TorchTrace,
        class: Class::Torch,
    },
    CudaHook {
        symbol: "_ZN3c104cuda20CUDACachingAllocator6Native22DeviceCachingAllocator12record_traceENS1_10TraceEntry6ActionElmP11CUstream_staSt10shared_ptrINS_15GatheredContextEE",
        prototype: "torch 2.3: void record_trace(TraceEntry::Action, int64_t addr, size_t size, cudaStream_t, c10::DeviceIndex, std::shared_ptr<GatheredContext>)",
        entry_program: RECORD_TRACE,
        return_program: None,
        records: Records::TorchTrace,
        class: Class::Torch,
    },
    CudaHook {
        symbol: "_ZN3c104cuda20CUDACachingAllocator6Native22DeviceCachingAllocator12record_traceENS1_10TraceEntry6ActionElmP11CUstream_stiSt10shared_ptrINS_15GatheredContextEE",
        prototype: "torch 2.2: void record_trace(TraceEntry::Action, int64_t addr, size_t size, cudaStream_t, int device, std::shared_ptr<GatheredContext>)",
        entry_program: RECORD_TRACE,
        return_program: None,
        records: Records::TorchTrace,
        class: Class::Torch,
    },
    CudaHook {
        symbol: "_ZN3c104cuda20CUDACachingAllocator15CudaMallocAsync12_GLOBAL__N_111mallocAsyncEPPvamP11CUstream_st",
        prototype: "torch 2.3–2.15, cudaMallocAsync backend: void mallocAsync(void** devPtr, c10::DeviceIndex, size_t size, cudaStream_t)",
        entry_program: ASYNC_MALLOC,
        return_program: None,
        records: Records::TorchAsyncMalloc,
        class: Class::Torch,
    },
    CudaHook {
        symbol: "_ZN3c104cuda20CUDACachingAllocator15CudaMallocAsync12_GLOBAL__N_111mallocAsyncEPPvimP11CUstream_st",
        prototype: "torch 2.1–2.2, cudaMallocAsync backend: void mallocAsync(void** devPtr, int device, size_t size, cudaStream_t)",
        entry_program: ASYNC_MALLOC,
        return_program: None,
        records: Records::TorchAsyncMalloc,
        class: Class::Torch,
    },
    CudaHook {
        symbol: "_ZN3c104cuda20CUDACachingAllocator15CudaMallocAsync12_GLOBAL__N_19freeAsyncEPv",
        prototype: "torch 2.1–2.15, cudaMallocAsync backend: void freeAsync(void* ptr)",
        entry_program: ASYNC_FREE,
        return_program: None,
        records: Records::TorchAsyncFree,
        class: Class::Torch,
    },
    // The pinned host caching allocator, in libtorch_cuda.so (HostBlock's size at +0x28 and
    // its memory at +0x30 in 2.4–2.15; torch 2.1–2.3 had another allocator, not followed).
    CudaHook {
        symbol: "_ZN2at29CachingHostAllocatorInterfaceINS_4cuda12_GLOBAL__N_128CUDACachingHostAllocatorImplEXadL_ZNS2_17raw_local_deleterEPvEEE8allocateEm",
        prototype: "torch 2.8–2.15, libtorch_cuda.so: at::DataPtr at::CachingHostAllocatorInterface<CUDACachingHostAllocatorImpl, &raw_local_deleter>::allocate(size_t)",
        entry_program: PINNED_ALLOC,
        return_program: None,
        records: Records::TorchPinnedAlloc,
        class: Class::TorchPinned,
    },
    CudaHook {
        symbol: "_ZN2at4cuda12_GLOBAL__N_124CUDACachingHostAllocator8allocateEm",
        prototype: "torch 2.4–2.7, libtorch_cuda.so: at::DataPtr at::cuda::CUDACachingHostAllocator::allocate(size_t)",
        entry_program: PINNED_ALLOC,
        return_program: None,
        records: Records::TorchPinnedAlloc,
        class: Class::TorchPinned,
    },
    CudaHook {
        symbol: "_ZN2at4cuda12_GLOBAL__N_117raw_local_deleterEPv",
        prototype: "torch 2.4–2.15, libtorch_cuda.so: void at::cuda::raw_local_deleter(void* ctx)",
        entry_program: PINNED_FREE,
        return_program: None,
        records: Records::TorchPinnedFree,
        class: Class::TorchPinned,
    },
];

/// Whether a library's hooks (indices into `TORCH_HOOKS`) include the caching allocator's
/// `record_trace`: without it only the `cudaMallocAsync` backend is followed.
pub fn has_record_trace(hooks: impl IntoIterator<Item = usize>) -> bool {
    hooks.into_iter().any(|i| {
        TORCH_HOOKS
            .get(i)
            .is_some_and(|h| h.records == Records::TorchTrace)
    })
}

/// The torch hook behind an event's function code (`Cookie::Torch(index)`), if it is one.
pub fn torch_hook(func: u32) -> Option<&'static CudaHook> {
    match Cookie::decode(func)? {
        Cookie::Torch(index) => TORCH_HOOKS.get(index as usize),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (version, symbol) of `torch_symbols.txt`: the real names, from the PyPI wheels.
    fn real_symbols() -> Vec<(&'static str, &'static str)> {
        include_str!("torch_symbols.txt")
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| l.split_once('\t').expect("VERSION<TAB>SYMBOL"))
            .collect()
    }

    /// (version, symbol, last byte) of `torch_pinned_symbols.txt`: libtorch_cuda.so's.
    fn real_pinned_symbols() -> Vec<(&'static str, &'static str, &'static str)> {
        include_str!("torch_pinned_symbols.txt")
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                assert_eq!(f.len(), 3, "VERSION<TAB>SYMBOL<TAB>LAST_BYTE: {l}");
                (f[0], f[1], f[2])
            })
            .collect()
    }

    /// Every hooked form is a real symbol; every real `record_trace` from 2.2 on and the
    /// `cudaMallocAsync` backend's `mallocAsync` and `freeAsync` of every version are hooked.
    #[test]
    fn the_hook_table_matches_the_real_symbols_of_each_torch_version() {
        let real = real_symbols();
        let pinned = real_pinned_symbols();
        for hook in TORCH_HOOKS {
            assert!(
                real.iter().any(|(_, s)| *s == hook.symbol)
                    || pinned.iter().any(|(_, s, _)| *s == hook.symbol),
                "{} is in no torch version's library",
                hook.prototype
            );
        }
        let record_trace = real
            .iter()
            .filter(|(_, s)| s.contains("DeviceCachingAllocator12record_trace"));
        for (version, symbol) in record_trace {
            let hooked = TORCH_HOOKS.iter().any(|h| h.symbol == *symbol);
            assert_eq!(hooked, *version != "2.1.2", "torch {version}: {symbol}");
        }
        let versions: std::collections::BTreeSet<&str> = real.iter().map(|(v, _)| *v).collect();
        for version in &versions {
            let hooked = |name: &str| {
                real.iter().any(|(v, s)| {
                    v == version && s.contains(name) && TORCH_HOOKS.iter().any(|h| h.symbol == *s)
                })
            };
            assert!(hooked("11mallocAsync"), "torch {version}: mallocAsync");
            assert!(hooked("9freeAsync"), "torch {version}: freeAsync");
        }
        assert!(versions.contains("2.15.0"), "{versions:?}");
    }

    /// The pinned host allocator of every torch from 2.4 on has the blocks' deleter and one
    /// allocate override, hooked; the override ends in a `ret` everywhere but in 2.5.1.
    #[test]
    fn the_pinned_host_allocator_of_each_torch_version_is_hooked() {
        let pinned = real_pinned_symbols();
        let versions: std::collections::BTreeSet<&str> = pinned.iter().map(|r| r.0).collect();
        assert_eq!(versions.len(), 12, "{versions:?}");
        for version in versions {
            let of = |records| {
                let hooked = |s: &str| {
                    TORCH_HOOKS
                        .iter()
                        .any(|h| h.symbol == s && h.records == records)
                };
                (pinned.iter())
                    .filter(|(v, s, _)| *v == version && hooked(s))
                    .collect::<Vec<_>>()
            };
            assert_eq!(of(Records::TorchPinnedFree).len(), 1, "torch {version}");
            let alloc = of(Records::TorchPinnedAlloc);
            assert_eq!(alloc.len(), 1, "torch {version}");
            assert_eq!(alloc[0].2 == "c3", version != "2.5.1", "torch {version}");
        }
    }

    /// No torch hook has a return probe: an exception through its trampoline kills the target.
    #[test]
    fn no_torch_hook_has_a_return_probe() {
        for hook in TORCH_HOOKS {
            assert_eq!(hook.return_program, None, "{}", hook.prototype);
        }
    }

    #[test]
    fn only_a_record_trace_form_makes_the_caching_allocator_layer() {
        let index = |records| {
            TORCH_HOOKS
                .iter()
                .position(|h| h.records == records)
                .unwrap()
        };
        assert!(has_record_trace([index(Records::TorchAsyncFree), 0]));
        let async_only = [
            index(Records::TorchAsyncMalloc),
            index(Records::TorchAsyncFree),
        ];
        assert!(!has_record_trace(async_only));
    }

    /// The forms whose signature has the pool (`MempoolId_t` = `std::pair<ull, ull>`) read it.
    #[test]
    fn forms_with_a_pool_argument_read_it() {
        for hook in TORCH_HOOKS
            .iter()
            .filter(|h| h.records == Records::TorchTrace)
        {
            let has_pool = hook.symbol.contains("St4pairIyyE");
            assert_eq!(
                hook.entry_program == RECORD_TRACE_POOL,
                has_pool,
                "{}",
                hook.prototype
            );
        }
    }

    #[test]
    fn torch_cookies_find_their_hook() {
        for (i, hook) in TORCH_HOOKS.iter().enumerate() {
            let func = Cookie::Torch(i as u32).encode();
            assert_eq!(torch_hook(func).map(|h| h.symbol), Some(hook.symbol));
        }
        assert!(torch_hook(Cookie::Runtime(0).encode()).is_none());
    }
}
