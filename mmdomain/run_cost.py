"""What a finished stage cost (wall time, peak memory, device-hours), recorded beside what `mmdomain plan` estimated."""
from __future__ import annotations

import logging
import os
import resource
import sys
from typing import Any

import torch

log = logging.getLogger(__name__)

# torch.cuda.get_device_name() prefixes -> the plan's GPU table
_GPU_NAMES = (("H100", "h100-80g"), ("A100-SXM4-80GB", "a100-80g"), ("A100 80GB", "a100-80g"), ("A100-PCIE-80GB", "a100-80g"),
              ("A100", "a100-40g"), ("L4", "l4-24g"))


def start_measuring(device: torch.device) -> None:
    """Start this session's peak-memory count (CUDA: the allocator's; on CPU the process peak RSS cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def plan_gpu_name(device: torch.device) -> str | None:
    """The plan's name for the device this run uses, or None for a GPU the table does not hold."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    return next((key for prefix, key in _GPU_NAMES if prefix in name), None)


def estimated_cost(model: Any, recipe: Any, device: torch.device) -> dict[str, Any] | None:
    """The plan's estimate for this model (its trainable set applied) on this device, at the recipe's max_length.
    An estimate that cannot be made is logged and recorded as missing: it must never cost the run."""
    from .gpus import find_gpu
    from .plan import estimate

    name = plan_gpu_name(device)
    if name is None:
        return {"skipped": f"{torch.cuda.get_device_name(device)} is not in the plan's GPU table"}
    try:
        plan = estimate(model, recipe, find_gpu(name), gpus=int(os.environ.get("WORLD_SIZE", "1")))
    except Exception as exc:  # noqa: BLE001 - an estimate is a comment on the run, never a reason to stop it
        log.warning("the cost estimate failed (%s: %s); the run goes on without it", type(exc).__name__, exc)
        return {"skipped": f"{type(exc).__name__}: {exc}"}
    return {"gpu": name, "peak_memory_gib": plan["memory_gib"]["total_per_gpu"], "seq_len": plan["shape"]["seq_len"],
            "flops_per_sample": plan["flops_per_sample"], "seconds_per_1k_samples": plan["seconds_per_1k_samples"], "mfu": plan["mfu"]}


def measured_cost(device: torch.device, seconds: float, samples: int, resumed: bool) -> dict[str, Any]:
    """Wall time of the whole stage (earlier sessions included), this session's peak memory, device-hours."""
    devices = int(os.environ.get("WORLD_SIZE", "1"))
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    else:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        peak, kind = rss * (1 if sys.platform == "darwin" else 1024), "process peak RSS"
    out = {"wall_seconds": round(seconds, 2), "peak_memory_gib": round(peak / 1024**3, 4), "peak_memory_kind": kind,
           "devices": devices, "device_hours": round(seconds * devices / 3600, 6), "samples": samples,
           "seconds_per_1k_samples": round(1000 * seconds / samples, 3) if samples else None}
    if resumed:
        out["peak_memory_note"] = "this session's peak (the run was resumed); wall time and device-hours cover every session"
    return out
