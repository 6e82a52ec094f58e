"""What every benchmark result records about the machine it ran on."""
from __future__ import annotations

import os
import platform

import torch


def environment(device: str = "cpu") -> dict:
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "threads": torch.get_num_threads(), "cpu": cpu, "cpu_count": os.cpu_count(), "device": device,
           "allocator": {k: os.environ.get(k) for k in ("PYTORCH_CUDA_ALLOC_CONF", "MALLOC_ARENA_MAX", "OMP_NUM_THREADS") if os.environ.get(k)}}
    if device == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env
