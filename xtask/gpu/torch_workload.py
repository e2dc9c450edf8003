"""PyTorch workload for `cargo xtask gpu-check`: the allocation patterns of an inference server
on a real GPU, with PyTorch's own figures written to the file named by argv[1] at the end.

- weights: 4 x 64 MiB tensors from the caching allocator (cudaMalloc, or cuMemCreate/cuMemMap
  with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True);
- activations: 50 steps of transient tensors (churn; nothing live after);
- a captured CUDA graph (private memory pool, graph instantiation);
- pinned host memory: a 64 MiB page-locked staging tensor.
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


def pin_staging():
    return torch.empty(64 << 20, dtype=torch.uint8).pin_memory()


def main():
    device = torch.device("cuda")
    torch.cuda.init()
    weights = load_weights(device)
    run_steps(weights, device)
    graph = capture_graph(device)
    staging = pin_staging()
    torch.cuda.synchronize()
    figures = {
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "device": torch.cuda.get_device_name(0),
        "memory_reserved": torch.cuda.memory_reserved(),
        "memory_allocated": torch.cuda.memory_allocated(),
        "pinned_bytes": staging.numel() * staging.element_size(),
        "mem_get_info_free": torch.cuda.mem_get_info()[0],
        "mem_get_info_total": torch.cuda.mem_get_info()[1],
    }
    with open(sys.argv[1], "w") as f:
        json.dump(figures, f)
    # Let the recorder take its last NVML sample with everything live.
    time.sleep(2.5)
    del graph, weights, staging


if __name__ == "__main__":
    main()
