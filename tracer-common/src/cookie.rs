//! Which hook fired: the attach cookie of every uprobe, and the calls a CUDA allocation was made
//! inside. User space attaches each program with `Cookie::encode` of its hook; the programs pass
//! the value on in events (`func`), and user space decodes it to find the hook in its tables.

/// Heap functions, in the order of user space's hook table. Carried as the uprobe cookie.
#[repr(u32)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum HeapFn {
    Malloc = 0,
    Calloc = 1,
    Realloc = 2,
    Reallocarray = 3,
    Free = 4,
    PosixMemalign = 5,
    AlignedAlloc = 6,
    Memalign = 7,
    Valloc = 8,
    Pvalloc = 9,
}

impl HeapFn {
    pub const ALL: [HeapFn; 10] = [
        HeapFn::Malloc,
        HeapFn::Calloc,
        HeapFn::Realloc,
        HeapFn::Reallocarray,
        HeapFn::Free,
        HeapFn::PosixMemalign,
        HeapFn::AlignedAlloc,
        HeapFn::Memalign,
        HeapFn::Valloc,
        HeapFn::Pvalloc,
    ];

    pub fn from_u32(v: u32) -> Option<HeapFn> {
        Self::ALL.get(v as usize).copied()
    }

    pub fn name(self) -> &'static str {
        match self {
            HeapFn::Malloc => "malloc",
            HeapFn::Calloc => "calloc",
            HeapFn::Realloc => "realloc",
            HeapFn::Reallocarray => "reallocarray",
            HeapFn::Free => "free",
            HeapFn::PosixMemalign => "posix_memalign",
            HeapFn::AlignedAlloc => "aligned_alloc",
            HeapFn::Memalign => "memalign",
            HeapFn::Valloc => "valloc",
            HeapFn::Pvalloc => "pvalloc",
        }
    }
}

/// The attach cookie of a uprobe: the hook behind it, in one of user space's four hook
/// tables. Encoded as one `u32` in disjoint ranges, so that an event's `func` says both.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Cookie {
    /// A C allocator function.
    Heap(HeapFn),
    /// A CUDA driver hook: its index in `CUDA_HOOKS`.
    Cuda(u32),
    /// A CUDA runtime hook: its index in `RUNTIME_HOOKS`.
    Runtime(u32),
    /// A PyTorch caching-allocator hook: its index in `TORCH_HOOKS`.
    Torch(u32),
}

impl Cookie {
    /// Where the CUDA driver range starts; heap functions lie below it.
    const CUDA_BASE: u32 = 100;
    /// Where the CUDA runtime range starts.
    const RUNTIME_BASE: u32 = 200;
    /// Where the PyTorch allocator range starts; it has no end.
    const TORCH_BASE: u32 = 1000;
    /// Hooks a table may have to stay inside its range (the driver's is the bounded one).
    pub const TABLE_MAX: u32 = Self::RUNTIME_BASE - Self::CUDA_BASE;

    /// The cookie's value. A CUDA index must be below `TABLE_MAX` (user space's tables are
    /// checked by a test).
    pub const fn encode(self) -> u32 {
        match self {
            Cookie::Heap(func) => func as u32,
            Cookie::Cuda(index) => Self::CUDA_BASE + index,
            Cookie::Runtime(index) => Self::RUNTIME_BASE + index,
            Cookie::Torch(index) => Self::TORCH_BASE + index,
        }
    }

    /// The cookie behind `value`, `None` for a heap code that names no `HeapFn`.
    pub fn decode(value: u32) -> Option<Cookie> {
        if value >= Self::TORCH_BASE {
            Some(Cookie::Torch(value - Self::TORCH_BASE))
        } else if value >= Self::RUNTIME_BASE {
            Some(Cookie::Runtime(value - Self::RUNTIME_BASE))
        } else if value >= Self::CUDA_BASE {
            Some(Cookie::Cuda(value - Self::CUDA_BASE))
        } else {
            HeapFn::from_u32(value).map(Cookie::Heap)
        }
    }
}

/// The calls a CUDA driver allocation was made inside, as encoded cookies (0: none; no CUDA
/// cookie is 0): the runtime call (cudaMalloc around cuMemAlloc_v2), so that a failure is named
/// after both, and the non-allocating driver call in flight on the thread (a graph
/// instantiation), so that what it allocates belongs to it. Packed into `AllocEvent::origin`.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct EnclosingCalls {
    pub runtime: u32,
    pub driver: u32,
}

impl EnclosingCalls {
    /// The runtime call in the low 32 bits, the driver call in the high ones.
    pub const fn pack(self) -> u64 {
        self.runtime as u64 | (self.driver as u64) << 32
    }

    pub const fn unpack(value: u64) -> EnclosingCalls {
        EnclosingCalls {
            runtime: value as u32,
            driver: (value >> 32) as u32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_decode_to_what_they_encode() {
        let cookies = HeapFn::ALL
            .map(Cookie::Heap)
            .into_iter()
            .chain([Cookie::Cuda(0), Cookie::Cuda(Cookie::TABLE_MAX - 1)])
            .chain([Cookie::Runtime(0), Cookie::Runtime(500)])
            .chain([Cookie::Torch(0), Cookie::Torch(7)]);
        for cookie in cookies {
            assert_eq!(Cookie::decode(cookie.encode()), Some(cookie));
        }
        // The ranges as they were: heap below 100, driver from 100, runtime from 200.
        assert_eq!(Cookie::Cuda(3).encode(), 103);
        assert_eq!(Cookie::Runtime(3).encode(), 203);
        assert_eq!(Cookie::Torch(3).encode(), 1003);
        assert_eq!(Cookie::decode(10), None);
    }

    #[test]
    fn enclosing_calls_pack_into_one_word() {
        let calls = EnclosingCalls {
            runtime: 201,
            driver: 150,
        };
        assert_eq!(calls.pack(), 201 | 150 << 32);
        assert_eq!(EnclosingCalls::unpack(calls.pack()), calls);
        assert_eq!(EnclosingCalls::unpack(0), EnclosingCalls::default());
    }
}
