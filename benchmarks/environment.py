"""What every benchmark result records about the machine it ran on, and how a result is reported."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

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
           "allocator": {k: v for k, v in os.environ.items()  # a host allocator setting moves CPU step times by up to 2x
                         if k in ("PYTORCH_CUDA_ALLOC_CONF", "OMP_NUM_THREADS", "LD_PRELOAD", "GLIBC_TUNABLES")
                         or k.startswith("MALLOC_")}}
    if device == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def write_report(report: dict, out: str | Path | None) -> None:
    """Print the result as JSON and, with ``--out``, keep it in that file."""
    print(json.dumps(report, indent=2))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
