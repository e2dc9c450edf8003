//! Frames as a person reads them: a stack from the first frame that is not the allocator's own
//! machinery (glibc's malloc internals, brk/sbrk, mmap wrappers, CPython's object allocator,
//! PyTorch's caching allocator), and C++ names without their argument lists and template
//! arguments. Only the text report and the flamegraph show these; the JSON and the recording
//! keep every frame and full name (`--full-names` shows them in the views too).

use crate::recording::Recorded;

/// Puts the display form of every stack in `rec` (for the text report and the flamegraph), and
/// merges the stacks that then read the same.
pub fn use_display_names(rec: &mut Recorded) {
    for stack in rec.stacks.values_mut() {
        stack.frames = display_frames(&stack.frames, false);
    }
    rec.merge_identical_stacks();
}

/// Functions of allocators, innermost first in a stack: what a leak is never in.
const ALLOCATOR_FRAMES: &[&str] = &[
    // glibc malloc and the calls it makes to get memory.
    "malloc",
    "calloc",
    "realloc",
    "free",
    "posix_memalign",
    "aligned_alloc",
    "memalign",
    "valloc",
    "pvalloc",
    "__libc_malloc",
    "__libc_calloc",
    "__libc_realloc",
    "__libc_memalign",
    "__GI___libc_malloc",
    "__GI___libc_realloc",
    "__GI___libc_free",
    "_int_malloc",
    "_int_realloc",
    "_int_memalign",
    "_mid_memalign",
    "sysmalloc",
    "sysmalloc_mmap",
    "tcache_init",
    "malloc_hook_ini",
    "new_heap",
    "alloc_new_heap",
    "arena_get2",
    "__glibc_morecore",
    "__brk",
    "__brk_call",
    "__sbrk",
    "__GI___sbrk",
    "__mmap",
    "__mmap64",
    "mmap",
    "mmap64",
    "operator new",
    "operator new[]",
    // CPython's object allocator.
    "PyObject_Malloc",
    "_PyObject_Malloc",
    "PyObject_Calloc",
    "_PyObject_Calloc",
    "PyObject_Realloc",
    "_PyObject_Realloc",
    "pymalloc_alloc",
    "pymalloc_realloc",
    "allocate_from_new_pool",
    "new_arena",
    "_PyObject_ArenaMmap",
    "PyMem_Malloc",
    "PyMem_RawMalloc",
    "_PyMem_RawMalloc",
    "PyMem_Calloc",
    "PyMem_Realloc",
    "_PyMem_RawRealloc",
];

/// Namespaces whose functions are allocator machinery (PyTorch's caching allocator).
const ALLOCATOR_NAMESPACES: &[&str] = &["c10::cuda::CUDACachingAllocator::"];

/// Whether `name` (shortened) is an allocator's own function.
fn is_allocator_frame(name: &str) -> bool {
    ALLOCATOR_FRAMES.contains(&name) || ALLOCATOR_NAMESPACES.iter().any(|ns| name.starts_with(ns))
}

/// The frames of a stack (innermost first) as the views show them: from the first frame that is
/// not allocator machinery (all of them when every frame is), names shortened; unchanged with
/// `full`.
pub fn display_frames(frames: &[String], full: bool) -> Vec<String> {
    if full {
        return frames.to_vec();
    }
    let mut short: Vec<String> = frames.iter().map(|f| short_name(f)).collect();
    let first = short
        .iter()
        .position(|f| !is_allocator_frame(f))
        .unwrap_or(0);
    short.drain(..first);
    short
}

/// A C++ name without its argument list, qualifiers and template arguments
/// (`std::vector<int>::push_back(int const&)` → `std::vector<…>::push_back`); anything else
/// (C, Python `function (file:line)`, placeholders) as it is.
pub fn short_name(name: &str) -> String {
    let without_args = strip_arguments(name);
    collapse_templates(without_args)
}

/// `name` without a trailing C++ argument list (and the qualifiers after it).
fn strip_arguments(name: &str) -> &str {
    let mut trimmed = name.trim_end();
    for qualifier in [" const", " volatile", " &&", " &", " noexcept"] {
        trimmed = trimmed.strip_suffix(qualifier).unwrap_or(trimmed);
    }
    if !trimmed.ends_with(')') {
        return name;
    }
    // The '(' that opens the final parenthesized group.
    let mut depth = 0i32;
    for (i, c) in trimmed.char_indices().rev() {
        match c {
            ')' => depth += 1,
            '(' => {
                depth -= 1;
                if depth == 0 {
                    let before = &trimmed[..i];
                    // "f (file:line)" is a Python frame, "(anonymous namespace)" no call; an
                    // operator's own parentheses ("operator()") stay.
                    let is_call = !before.is_empty()
                        && !before.ends_with(' ')
                        && !before.ends_with("::")
                        && !before.ends_with("operator");
                    return if is_call { before } else { name };
                }
            }
            _ => {}
        }
    }
    name
}

/// Template arguments replaced by `…`, outside `operator<`, `operator<<`, `operator->` and the
/// like.
fn collapse_templates(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut depth = 0usize;
    for c in name.chars() {
        match c {
            '<' if depth == 0 && (out.ends_with("operator") || out.ends_with("operator<")) => {
                out.push(c)
            }
            '>' if depth == 0 && (out.ends_with("operator") || out.ends_with("operator-")) => {
                out.push(c)
            }
            '<' => {
                if depth == 0 {
                    out.push_str("<…");
                }
                depth += 1;
            }
            '>' if depth > 0 => {
                depth -= 1;
                if depth == 0 {
                    out.push('>');
                }
            }
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    if depth > 0 {
        // Unbalanced (a truncated name): leave it whole.
        return name.to_string();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    /// Two call sites whose stacks differ only in C++ argument lists read the same once
    /// shortened: one row, their figures summed.
    #[test]
    fn stacks_that_read_the_same_once_shortened_merge() {
        let mut rec = crate::views::fixture::recorded();
        let mut indices = rec.stacks.keys().copied();
        let (a, b) = (indices.next().unwrap(), indices.next().unwrap());
        rec.stacks.get_mut(&a).unwrap().frames = frames(&["f(int)", "main"]);
        rec.stacks.get_mut(&b).unwrap().frames = frames(&["f(long)", "main"]);
        let live = |rec: &Recorded| -> u64 {
            rec.state
                .cells
                .iter()
                .filter(|(k, _)| k.stack == Some(a) || k.stack == Some(b))
                .map(|(_, c)| c.live_bytes)
                .sum()
        };
        let before = live(&rec);
        use_display_names(&mut rec);
        assert_eq!(rec.stacks[&a].frames, frames(&["f", "main"]));
        assert!(!rec.stacks.contains_key(&b));
        assert_eq!(live(&rec), before);
    }

    #[test]
    fn cxx_names_lose_arguments_and_template_arguments() {
        let cases = [
            (
                "c10::cuda::CUDACachingAllocator::Native::NativeCachingAllocator::malloc(void**, signed char, unsigned long, CUstream_st*)",
                "c10::cuda::CUDACachingAllocator::Native::NativeCachingAllocator::malloc",
            ),
            (
                "std::vector<std::pair<int, long>, std::allocator<std::pair<int, long> > >::push_back(std::pair<int, long> const&)",
                "std::vector<…>::push_back",
            ),
            ("at::Tensor::sizes() const", "at::Tensor::sizes"),
            ("foo::operator()(int)", "foo::operator()"),
            ("bar::operator<<(std::ostream&)", "bar::operator<<"),
            ("baz::operator->() const", "baz::operator->"),
            (
                "(anonymous namespace)::worker",
                "(anonymous namespace)::worker",
            ),
            (
                "handle_request (server.py:10)",
                "handle_request (server.py:10)",
            ),
            (
                "[unknown] libffi.so.8+0x6f79",
                "[unknown] libffi.so.8+0x6f79",
            ),
            ("leak_malloc", "leak_malloc"),
            ("broken<name", "broken<name"),
        ];
        for (full, short) in cases {
            assert_eq!(short_name(full), short, "{full}");
        }
    }

    /// A Python server's per-request leak recorded in default mode: the brk machinery first,
    /// then the frame that explains it.
    #[test]
    fn stacks_start_at_the_first_frame_outside_the_allocator() {
        let stack = frames(&[
            "__brk_call",
            "__brk",
            "__GI___sbrk",
            "__glibc_morecore",
            "sysmalloc",
            "_int_malloc",
            "__GI___libc_malloc",
            "_PyObject_Malloc",
            "PyBytes_FromStringAndSize",
            "remember_request (server.py:10)",
        ]);
        assert_eq!(
            display_frames(&stack, false),
            frames(&[
                "PyBytes_FromStringAndSize",
                "remember_request (server.py:10)"
            ])
        );
        assert_eq!(display_frames(&stack, true), stack);
        let torch = frames(&[
            "c10::cuda::CUDACachingAllocator::Native::DeviceCachingAllocator::alloc_found_block(AllocParams&)",
            "c10::cuda::CUDACachingAllocator::Native::NativeCachingAllocator::malloc(void**, signed char, unsigned long, CUstream_st*)",
            "at::detail::empty_cuda(c10::ArrayRef<long>, c10::ScalarType)",
            "handle_request (server.py:20)",
        ]);
        assert_eq!(
            display_frames(&torch, false),
            frames(&["at::detail::empty_cuda", "handle_request (server.py:20)"])
        );
        // Nothing but allocator frames: all of them, so that the row still says something.
        let only = frames(&["malloc", "_int_malloc"]);
        assert_eq!(display_frames(&only, false), only);
    }
}
