//! The libc heap functions (malloc and friends), in `HeapFn` order: a hook's index is its
//! attach cookie.

use tracer_common::HeapFn;

use super::{Hook, Library, Records, Site};
use crate::model::Class;

const RET: Option<&str> = Some("heap_return");

pub const HOOKS: &[Hook] = &[
    Hook {
        symbol: "malloc",
        library: Library::Libc,
        prototype: "void *malloc(size_t size)",
        entry_program: "heap_enter",
        return_program: RET,
        site: Site::Entry,
        records: Records::Alloc,
        class: Class::Heap,
        func: HeapFn::Malloc,
        accounting: "`size` bytes live at the returned block; NULL is a failure",
    },
    Hook {
        symbol: "calloc",
        library: Library::Libc,
        prototype: "void *calloc(size_t nmemb, size_t size)",
        entry_program: "heap_enter",
        return_program: RET,
        site: Site::Entry,
        records: Records::Alloc,
        class: Class::Heap,
        func: HeapFn::Calloc,
        accounting: "`nmemb * size` bytes (saturated on overflow); NULL is a failure",
    },
    Hook {
        symbol: "realloc",
        library: Library::Libc,
        prototype: "void *realloc(void *ptr, size_t size)",
        entry_program: "heap_enter",
        return_program: RET,
        site: Site::Entry,
        records: Records::Alloc,
        class: Class::Heap,
        func: HeapFn::Realloc,
        accounting: "frees `ptr` and allocates `size` at the realloc's stack (also in place); \
                     `realloc(p, 0)` returning NULL frees `p`; other NULL results are failures \
                     and leave `ptr` live",
    },
    Hook {
        symbol: "reallocarray",
        library: Library::Libc,
        prototype: "void *reallocarray(void *ptr, size_t nmemb, size_t size)",
        entry_program: "heap_enter",
        return_program: RET,
        site: Site::Entry,
        records: Records::Alloc,
        class: Class::Heap,
        func: HeapFn::Reallocarray,
        accounting: "as realloc with `nmemb * size` bytes",
    },
    Hook {
        symbol: "free",
        library: Library::Libc,
        prototype: "void free(void *ptr)",
        entry_program: "heap_free",
        return_program: None,
        site: Site::AfterNullCheck,
        records: Records::Free,
        class: Class::Heap,
        func: HeapFn::Free,
        accounting: "the block at `ptr` is no longer live; unknown blocks count as unmatched frees",
    },
    Hook {
        symbol: "posix_memalign",
        library: Library::Libc,
        prototype: "int posix_memalign(void **memptr, size_t alignment, size_t size)",
        entry_program: "heap_enter",
        return_program: RET,
        site: Site::Entry,
        records: Records::Alloc,
        class: Class::Heap,
        func: HeapFn::PosixMemalign,
        accounting: "`size` bytes at `*memptr` when it returns 0; a non-zero result is a failure \
                     with that errno",
    },
    Hook {
        symbol: "aligned_alloc",
        library: Library::Libc,
        prototype: "void *aligned_alloc(size_t alignment, size_t size)",
        entry_program: "heap_enter",
        return_program: RET,
        site: Site::Entry,
        records: Records::Alloc,
        class: Class::Heap,
        func: HeapFn::AlignedAlloc,
        accounting: "`size` bytes; NULL is a failure",
    },
    Hook {
        symbol: "memalign",
        library: Library::Libc,
        prototype: "void *memalign(size_t alignment, size_t size)",
        entry_program: "heap_enter",
        return_program: RET,
        site: Site::Entry,
        records: Records::Alloc,
        class: Class::Heap,
        func: HeapFn::Memalign,
        accounting: "`size` bytes; NULL is a failure",
    },
    Hook {
        symbol: "valloc",
        library: Library::Libc,
        prototype: "void *valloc(size_t size)",
        entry_program: "heap_enter",
        return_program: RET,
        site: Site::Entry,
        records: Records::Alloc,
        class: Class::Heap,
        func: HeapFn::Valloc,
        accounting: "`size` bytes (the request, not the page-rounded block); NULL is a failure",
    },
    Hook {
        symbol: "pvalloc",
        library: Library::Libc,
        prototype: "void *pvalloc(size_t size)",
        entry_program: "heap_enter",
        return_program: RET,
        site: Site::Entry,
        records: Records::Alloc,
        class: Class::Heap,
        func: HeapFn::Pvalloc,
        accounting: "`size` bytes (the request, not the page-rounded block); NULL is a failure",
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_heap_function_has_exactly_one_hook_in_cookie_order() {
        assert_eq!(HOOKS.len(), HeapFn::ALL.len());
        for (i, h) in HOOKS.iter().enumerate() {
            assert_eq!(h.func as usize, i, "{} out of order", h.symbol);
            assert_eq!(h.func.name(), h.symbol);
            assert_eq!(h.records == Records::Free, h.return_program.is_none());
        }
    }
}
