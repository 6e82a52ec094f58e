"""The accelerators `mmdomain plan` sizes a run for: memory and dense peak FLOP/s by precision (vendor datasheets)."""
from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import MmdomainError

MiB = 1024**2


@dataclass(frozen=True)
class Gpu:
    name: str
    description: str
    memory_bytes: int
    """What the device reports as total memory (nvidia-smi / torch.cuda.get_device_properties)."""
    peak_flops: dict[str, float]
    """Dense (no sparsity) tensor-core peak by compute precision; fp32 is plain FP32 (mmdomain leaves TF32 off, PyTorch's default)."""
    usable_fraction: float = 0.92
    """Share of the total a run can allocate: the CUDA context, cuBLAS/NCCL workspaces and allocator fragmentation
    take the rest (a few GiB on an 80 GiB card)."""

    @property
    def usable_bytes(self) -> int:
        return int(self.memory_bytes * self.usable_fraction)


GPUS = {
    "h100-80g": Gpu("h100-80g", "NVIDIA H100 SXM 80GB", 81559 * MiB, {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    "a100-80g": Gpu("a100-80g", "NVIDIA A100 80GB", 81920 * MiB, {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
    "a100-40g": Gpu("a100-40g", "NVIDIA A100 40GB", 40960 * MiB, {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
    "l4-24g": Gpu("l4-24g", "NVIDIA L4 24GB", 23034 * MiB, {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12}),
}


def cpu_gpu() -> Gpu:
    """This machine's CPU as a 'device': its physical memory, and a nominal peak of 1 TFLOP/s per 16 cores (AVX-512
    FMA at ~2 GHz: a rough figure; CPU runs are for trying recipes, not for sizing clusters)."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cores = os.cpu_count() or 1
    peak = cores / 16 * 1e12
    return Gpu("cpu", f"this machine's CPU ({cores} cores)", memory, {"bf16": peak, "fp16": peak, "fp32": peak}, usable_fraction=0.8)


def find_gpu(name: str) -> Gpu:
    if name == "cpu":
        return cpu_gpu()
    if name not in GPUS:
        raise MmdomainError(f"--gpu {name!r} is not in the table; choose one of {', '.join([*GPUS, 'cpu'])}")
    return GPUS[name]
