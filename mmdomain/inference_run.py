"""A trained run opened for inference (generate, serve, lmms-eval): its newest checkpoint's model and processor in
eval mode on the device the caller or the training recipe names, and the recipe's eval settings."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .device import DeviceError, resolve_device


@dataclass
class InferenceRun:
    model: Any
    processor: Any
    checkpoint: Path
    device: torch.device
    recipe: dict[str, Any]
    """The training recipe the checkpoint carries (empty for a checkpoint written without one)."""

    @property
    def name(self) -> str:
        """The run's folder name (a checkpoint's run: ``runs/x/checkpoints/step-9`` is ``x``)."""
        from .checkpoint import CHECKPOINTS

        return (self.checkpoint.parent.parent if self.checkpoint.parent.name == CHECKPOINTS else self.checkpoint).name


def recipe_of(checkpoint: Path) -> dict[str, Any]:
    """The training recipe stored beside a checkpoint's weights, or {}."""
    from .checkpoint import read_json
    from .train_state import STATE

    return (read_json(checkpoint / STATE).get("recipe") or {}) if (checkpoint / STATE).is_file() else {}


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_for_inference(path: str | Path, device: str | torch.device | None = None, dtype: str | None = None) -> InferenceRun:
    """Load a run directory or checkpoint; ``device`` None takes the training recipe's ``device`` (auto when absent).
    ``dtype`` None keeps the dtypes the run trained and evaluated with (a bf16 LLM stays bf16, so `eval` scores what
    training's own evaluation scored); fp32/bf16/fp16 casts every weight (bf16/fp16 halve a GPU model's memory)."""
    from .builder import load_pretrained
    from .checkpoint import resolve_checkpoint

    checkpoint = resolve_checkpoint(path)
    recipe = recipe_of(checkpoint)
    where = "--device" if device is not None else f"the training recipe's device ({checkpoint})"
    target = resolve_device(device if device is not None else recipe.get("device"), where)
    model, processor = load_pretrained(checkpoint)
    if dtype is not None and dtype not in DTYPES:
        raise DeviceError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    model.to(device=target, **({"dtype": DTYPES[dtype]} if dtype is not None else {})).eval()
    return InferenceRun(model, processor, checkpoint, target, recipe)
