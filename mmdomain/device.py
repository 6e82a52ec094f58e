"""Where a model runs: the device a recipe or a flag names (auto|cpu|cuda), and collated batches moved onto it whole."""
from __future__ import annotations

from typing import Any

import torch

from .errors import MmdomainError
from .media import MediaBatch

DEVICE_CHOICES = ("auto", "cpu", "cuda")


class DeviceError(MmdomainError, ValueError):
    """A device that cannot be used here (cuda asked for on a machine whose torch sees no GPU, an unknown name)."""


def resolve_device(choice: str | torch.device | None, where: str = "device") -> torch.device:
    """``auto`` (or None): the GPU when torch sees one, else the CPU; ``cpu``; ``cuda`` (``cuda:N``), refused with the
    fix when torch sees no GPU. Evaluation, generation and serving take their device from here, never from the first
    parameter they meet (a feature-cache run keeps its encoder on the CPU while the LLM sits on the GPU)."""
    if isinstance(choice, torch.device):
        return choice
    choice = (choice or "auto").strip()
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda" or choice.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(f"{where}: {choice}, but torch sees no CUDA GPU here (torch.cuda.is_available() is False; torch "
                              f"{torch.__version__}); use auto or cpu, or check the driver and that torch is a CUDA build")
        return torch.device(choice)
    raise DeviceError(f"{where}: {choice!r} is not a device; use one of {', '.join(DEVICE_CHOICES)}")


def to_device(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """A collated batch with its tensors on ``device``, every media kind's batch included."""
    def move(v: Any) -> Any:
        if isinstance(v, (torch.Tensor, MediaBatch)):
            return v.to(device, non_blocking=True)
        return [move(x) for x in v] if isinstance(v, list) else v

    return {k: move(v) for k, v in batch.items()}
