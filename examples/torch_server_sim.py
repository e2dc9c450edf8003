"""A simulated PyTorch inference server for the alloctrace demo, without a GPU: PyTorch's CUDA
caching allocator is the stub `libc10_cuda.so` of the tests (tests/fixtures/stub_c10_cuda.cpp,
the real hidden symbol names, segments from the stub CUDA driver), driven through ctypes as
torch's own Python reaches it.

    python3 torch_server_sim.py LIBC10_CUDA LIBCUDA [REQUESTS]

It loads "weights", profiles a forward pass (activations freed: the cache keeps their segments),
then serves requests. `remember_request` keeps each request's 16 MiB hidden state (the leak):
served from cached segments, it makes no driver call, so only the allocator layer sees it.
"""

import ctypes
import sys
import time

MiB = 1 << 20

lib = ctypes.CDLL(sys.argv[1])
lib.torch_stub_init.argtypes = [ctypes.c_char_p, ctypes.c_ulonglong, ctypes.c_int]
lib.torch_stub_malloc.argtypes = [ctypes.c_size_t, ctypes.c_void_p]
lib.torch_stub_malloc.restype = ctypes.c_void_p
lib.torch_stub_free.argtypes = [ctypes.c_void_p]
lib.torch_stub_reserved.restype = ctypes.c_ulonglong
lib.torch_stub_allocated.restype = ctypes.c_ulonglong
lib.torch_stub_init(sys.argv[2].encode(), 0, 0)
requests = int(sys.argv[3]) if len(sys.argv) > 3 else 20

history = []


def load_weights():
    layers = []
    for _ in range(8):
        layers.append(lib.torch_stub_malloc(64 * MiB, None))
    return layers


def profile_run():
    activations = []
    for _ in range(24):
        activations.append(lib.torch_stub_malloc(16 * MiB, None))
    for a in activations:
        lib.torch_stub_free(a)


def forward(tokens):
    scratch = lib.torch_stub_malloc(tokens * 4096, None)
    lib.torch_stub_free(scratch)


def remember_request(state):
    history.append(state)  # the leak: never trimmed


def handle_request(i):
    hidden = lib.torch_stub_malloc(16 * MiB, None)
    forward(128 + i)
    remember_request(hidden)


def serve():
    for i in range(requests):
        handle_request(i)
        time.sleep(0.05)


# Importing torch and loading a model takes a while; the recorder hooks the allocator meanwhile.
time.sleep(2.0)
weights = load_weights()
profile_run()
serve()
print(
    f"torch_server_sim: {requests} requests; reserved {lib.torch_stub_reserved() // MiB} MiB, "
    f"allocated {lib.torch_stub_allocated() // MiB} MiB"
)
