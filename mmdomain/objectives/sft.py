"""Supervised fine-tuning: next-token cross-entropy on the assistant answers, token-weighted across micro-batches."""
from __future__ import annotations

from typing import Any

import torch

from ..processor import IGNORE


class SFTObjective:
    name = "sft"
    examples = None  # the processor's own conversation -> row path (and packing)
    needs_reference = False

    def prepare(self, model: Any, processor: Any = None) -> None:
        pass

    def units(self, micro: list[dict[str, Any]]) -> int:
        # Every supervised token counts the same, however the micro-batches split.
        return sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro)

    def loss(self, model: Any, batch: dict[str, Any]) -> torch.Tensor:
        return model(**batch).loss_sum

    def metrics(self) -> dict[str, float]:
        return {}

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, Any] | None:
        return None
