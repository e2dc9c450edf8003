"""Benchmark workload for `cargo xtask bench`: malloc/free pairs from at least 20,000 distinct deep
call stacks of C++ and Python frames, from several threads at once, timed by itself.

    python3 deep_stacks.py LIB THREADS PAIRS_PER_CALL CALLS_PER_THREAD

LIB is libdeep_stacks.so built from deep_stacks.cpp. Each call picks a 15-bit path: bits 10..14
choose one of 32 routes through five levels of Python functions (py0a/py0b ... py4a/py4b), and all
15 bits one of 32768 routes through fifteen C++ levels in LIB, whose leaf makes PAIRS_PER_CALL
malloc/free pairs: 32768 distinct stacks (the native frames alone tell them apart: ctypes
releases the GIL for the call, and a thread without it may show no Python frames), so the
tracer's stack table and kernel ledger are measured under many long stacks rather than one hot
one.

Prints "ns_per_pair X" (wall time of the timed phase, all threads together, per pair) and
"distinct_stacks N" (distinct Python route x native route combinations the timed phase made).
"""
import ctypes
import sys
import threading
import time

PATHS = 1 << 15
# Odd, so coprime with PATHS: any PATHS consecutive calls of a thread visit every path once.
STRIDE = 7919

if len(sys.argv) != 5:
    sys.exit("usage: deep_stacks.py LIB THREADS PAIRS_PER_CALL CALLS_PER_THREAD")
lib_path = sys.argv[1]
threads, pairs, calls = (int(a) for a in sys.argv[2:])

lib = ctypes.CDLL(lib_path)
# ctypes drops the GIL around the foreign call, so the threads' mallocs really run in parallel.
deep_run = lib.deep_run
deep_run.argtypes = (ctypes.c_uint, ctypes.c_uint)
deep_run.restype = None


# Written out rather than generated so that every Python frame has a real file and line. Level L
# is chosen by bit 10 + L of the path; a and b have identical bodies on purpose: only the frame
# (code object) differs, which is what makes the stacks distinct.
def py4a(path, pairs):
    deep_run(path, pairs)


def py4b(path, pairs):
    deep_run(path, pairs)


def py3a(path, pairs):
    (py4b if path >> 14 & 1 else py4a)(path, pairs)


def py3b(path, pairs):
    (py4b if path >> 14 & 1 else py4a)(path, pairs)


def py2a(path, pairs):
    (py3b if path >> 13 & 1 else py3a)(path, pairs)


def py2b(path, pairs):
    (py3b if path >> 13 & 1 else py3a)(path, pairs)


def py1a(path, pairs):
    (py2b if path >> 12 & 1 else py2a)(path, pairs)


def py1b(path, pairs):
    (py2b if path >> 12 & 1 else py2a)(path, pairs)


def py0a(path, pairs):
    (py1b if path >> 11 & 1 else py1a)(path, pairs)


def py0b(path, pairs):
    (py1b if path >> 11 & 1 else py1a)(path, pairs)


def path_of(thread_index, i):
    # The per-thread offset keeps threads on different stacks at the same moment.
    return (i * STRIDE + thread_index * (PATHS // max(threads, 1))) % PATHS


def worker(thread_index, n):
    for i in range(n):
        path = path_of(thread_index, i)
        (py0b if path >> 10 & 1 else py0a)(path, pairs)


def run_round(n):
    ts = [threading.Thread(target=worker, args=(t, n)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


# Warm-up: first-touch of the heap, lazy binding of malloc/free, the specialising interpreter.
run_round(max(1, calls // 10))

start = time.perf_counter_ns()
run_round(calls)
elapsed = time.perf_counter_ns() - start

print("ns_per_pair", elapsed / (threads * calls * pairs), flush=True)
# Counted after the timed phase, from the same formula, to keep the bookkeeping out of the figure.
distinct = len({path_of(t, i) for t in range(threads) for i in range(min(calls, PATHS))})
print("distinct_stacks", distinct, flush=True)
