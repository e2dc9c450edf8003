// Benchmark workload for `cargo xtask bench`, native half: loaded by deep_stacks.py, which calls
// deep_run from several threads under 32 distinct Python call paths, so that malloc/free come from
// 32768 distinct deep stacks of C++ frames (and Python frames above them). The point is to load the
// tracer's stack table and kernel ledger with many long, distinct stacks, not one hot stack.
//
//   c++ -O2 -fno-omit-frame-pointer -shared -fPIC -o libdeep_stacks.so deep_stacks.cpp
//
// deep_run(path, pairs) descends 15 C++ levels; bit L of path picks step_a<L> or step_b<L> at
// level L, so the low 15 bits select one of 32768 native paths, and the leaf makes `pairs`
// malloc/free pairs. The native paths alone are distinct: ctypes releases the GIL for the call,
// and a thread without it may show no Python frames to the tracer.
#include <cstdlib>

// GCC may clone (constprop/isra) or fold (ICF) functions that noinline alone leaves alone; any of
// these would merge or rename frames and shrink the number of distinct stacks.
#if defined(__clang__)
#define STEP __attribute__((noinline))
#else
#define STEP __attribute__((noinline, noclone))
#endif

namespace {  // internal linkage: direct calls, not through the PLT; still named in .symtab

// Distinct stores in step_a and step_b keep the two variants of a level from being folded
// together, and a store after the call keeps it from becoming a tail call (which would drop
// the caller's frame from the stack).
volatile unsigned long sink_a[15];
volatile unsigned long sink_b[15];

STEP void leaf(unsigned path, unsigned pairs) {
    for (unsigned i = 0; i < pairs; i++) {
        void *p = std::malloc(32 + (i * 61 + path) % 481);  // 32..512 bytes
        // Without a use the compiler may drop the malloc/free pair altogether.
        asm volatile("" : : "r"(p) : "memory");
        std::free(p);
    }
}

template <int Level> void descend(unsigned path, unsigned pairs);

template <int Level> STEP void step_a(unsigned path, unsigned pairs) {
    descend<Level + 1>(path, pairs);
    asm volatile("" : : : "memory");
    sink_a[Level] = sink_a[Level] + 1;
}

template <int Level> STEP void step_b(unsigned path, unsigned pairs) {
    descend<Level + 1>(path, pairs);
    asm volatile("" : : : "memory");
    sink_b[Level] = sink_b[Level] + 2;
}

// Dispatch is inlined into the caller on purpose: only step_a/step_b should be frames.
template <int Level> inline __attribute__((always_inline)) void descend(unsigned path, unsigned pairs) {
    if ((path >> Level) & 1u)
        step_b<Level>(path, pairs);
    else
        step_a<Level>(path, pairs);
}

template <> inline __attribute__((always_inline)) void descend<15>(unsigned path, unsigned pairs) {
    leaf(path, pairs);
}

}  // namespace

extern "C" __attribute__((visibility("default"))) void deep_run(unsigned path, unsigned pairs) {
    descend<0>(path, pairs);
    // Keeps deep_run's own frame on the stack (no tail call into step_*<0>).
    asm volatile("" : : : "memory");
}
