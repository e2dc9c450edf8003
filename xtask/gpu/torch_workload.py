"""PyTorch workload for `cargo xtask gpu-check`: the allocation patterns of an inference server
on a real GPU, with PyTorch's own figures written to the file named by argv[1] at the end.

- weights: 4 x 64 MiB tensors from the caching allocator (cudaMalloc, or cuMemCreate/cuMemMap
  with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True);
- activations: 50 steps of transient tensors (churn; nothing live after);
- a captured CUDA graph (private memory pool, graph instantiation);
- pinned host memory: a 64 MiB page-locked staging tensor;
- the same with PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync (each tensor a driver allocation
  from the device's CUDA memory pool; no segments, no snapshot);
- a planted per-request leak: after the cache is warm, `handle_request` keeps a 16 MiB tensor per
  request (served from cached segments: no driver call), which the allocator layer must find
  under that Python function.
PyTorch's own view at the end (memory_stats, the _snapshot() block list) goes into the figures.
"""

import json
import sys
import time

import torch


def load_weights(device):
    return [torch.empty(64 << 20, dtype=torch.uint8, device=device) for _ in range(4)]


def run_steps(weights, device):
    for _ in range(50):
        x = torch.randn(1024, 1024, device=device)
        y = x @ x
        del x, y
    torch.cuda.synchronize()


def capture_graph(device):
    static_in = torch.randn(512, 512, device=device)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up, as torch.cuda.graphs requires
            static_out = static_in @ static_in
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = static_in @ static_in
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    return graph, static_in, static_out


KEPT = []


def warm_cache(device):
    tensors = []
    for _ in range(8):
        tensors.append(torch.empty(16 << 20, dtype=torch.uint8, device=device))
    del tensors


def handle_request(device):
    KEPT.append(torch.empty(16 << 20, dtype=torch.uint8, device=device))  # the leak
    tmp = torch.empty(1 << 20, dtype=torch.uint8, device=device)
    del tmp


def serve(device):
    warm_cache(device)
    for _ in range(5):
        handle_request(device)


def snapshot_figures():
    """The live and free blocks of PyTorch's own snapshot of its allocator (the
    cudaMallocAsync backend has none)."""
    active_count = active_bytes = free_bytes = largest_free = 0
    if backend() == "cudaMallocAsync":
        return {}
    for segment in torch.cuda.memory._snapshot()["segments"]:
        for block in segment["blocks"]:
            if block["state"] == "active_allocated":
                active_count += 1
                active_bytes += block.get("requested_size", block["size"])
            elif block["state"] == "inactive":
                free_bytes += block["size"]
                largest_free = max(largest_free, block["size"])
    return {
        "snapshot_active_blocks": active_count,
        "snapshot_active_requested": active_bytes,
        "snapshot_free_bytes": free_bytes,
        "snapshot_largest_free": largest_free,
    }


def backend():
    return torch.cuda.get_allocator_backend()


def pin_staging():
    return torch.empty(64 << 20, dtype=torch.uint8).pin_memory()


def main():
    device = torch.device("cuda")
    torch.cuda.init()
    weights = load_weights(device)
    run_steps(weights, device)
    graph = capture_graph(device)
    staging = pin_staging()
    serve(device)
    torch.cuda.synchronize()
    stats = torch.cuda.memory_stats()
    figures = {
        "torch_version": torch.__version__,
        "backend": backend(),
        "cuda_version": torch.version.cuda,
        "device": torch.cuda.get_device_name(0),
        "memory_reserved": torch.cuda.memory_reserved(),
        "memory_allocated": torch.cuda.memory_allocated(),
        "pinned_bytes": staging.numel() * staging.element_size(),
        "mem_get_info_free": torch.cuda.mem_get_info()[0],
        "mem_get_info_total": torch.cuda.mem_get_info()[1],
        "requested_bytes": stats.get("requested_bytes.all.current", 0),
        "leak_bytes": sum(t.numel() for t in KEPT),
        **snapshot_figures(),
    }
    with open(sys.argv[1], "w") as f:
        json.dump(figures, f)
    # Let the recorder take its last NVML sample with everything live.
    time.sleep(2.5)
    del graph, weights, staging


if __name__ == "__main__":
    main()
