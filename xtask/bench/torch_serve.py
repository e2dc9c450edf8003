"""Benchmark workload for `cargo xtask bench`: a PyTorch CPU inference loop, the heap traffic of a
real server's CPU side (millions of small mallocs a second in the dispatcher, the allocator and
the interpreter), with a per-request leak planted in a named Python function through a
C-allocated buffer, as a C extension that forgets to free would make.

`torch_serve.py SECONDS` serves requests to a tiny randomly initialised Llama (no download) for
SECONDS after a warm-up, then prints `requests_per_s X`, `requests N` and `leaked_bytes B`.
"""
import ctypes
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

LEAK_BYTES = 16 << 10

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
kept = []


def remember_request(tokens):
    # The planted leak: a buffer per request that nothing frees.
    buffer = libc.malloc(LEAK_BYTES)
    ctypes.memset(buffer, tokens & 0xFF, LEAK_BYTES)
    kept.append(buffer)


def handle_request(model, prompt):
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    remember_request(int(out[0, -1]))
    return out


def main():
    seconds = float(sys.argv[1])
    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
    )
    model = LlamaForCausalLM(config).eval()
    prompts = [torch.randint(1, 512, (1, 8 + i % 8)) for i in range(16)]
    for prompt in prompts[:4]:  # warm-up, outside the timed loop
        handle_request(model, prompt)
    kept.clear()
    served = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        handle_request(model, prompts[served % len(prompts)])
        served += 1
    elapsed = time.perf_counter() - start
    print("requests_per_s", served / elapsed, flush=True)
    print("requests", served, flush=True)
    print("leaked_bytes", len(kept) * LEAK_BYTES, flush=True)


main()
