"""Benchmark workload for Python frames: `py_churn.py N` makes N allocations of 600-byte bytearrays
(over pymalloc's 512-byte limit: a malloc and a free each) three calls deep in Python code, timed
by itself; prints "ns_per_pair X"."""
import sys
import time


def churn(n):
    for _ in range(n):
        bytearray(600)


def layer(n):
    churn(n)


def serve(n):
    layer(n)


n = int(sys.argv[1])
serve(n // 10)  # warm-up
start = time.perf_counter_ns()
serve(n)
print("ns_per_pair", (time.perf_counter_ns() - start) / n, flush=True)
