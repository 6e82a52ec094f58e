"""The frozen reference policy of DPO and GRPO: the model as the stage starts (the stage-2 weights it was given).

Two ways to run it, both without a second copy of the frozen encoder and LLM:
- only fresh LLM LoRA adapters train (every ``lora_B`` still zero, so the adapters are the identity): the reference is
  the same model with its adapters switched off (peft's ``disable_adapter()``), free;
- otherwise a snapshot of the trained parameters only (the connector, LoRA adapters carried over from stage 2, or the
  whole LLM with ``trainable.llm: full``): swapped in under ``no_grad`` for the reference's forward and swapped back.
The snapshot is taken before a resumed run loads its own weights, so the reference stays the stage-2 model.
The swap changes parameters in place: run the reference's forward before the policy's (the policy's autograd graph
must not span it), and not under FSDP, which owns its parameters' storage.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import torch

log = logging.getLogger(__name__)


class FrozenReference:
    """Built from the model with ``requires_grad`` set as the recipe trains it and the start weights loaded."""

    def __init__(self, model: torch.nn.Module) -> None:
        trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        fresh_adapters = bool(trained) and all(name.startswith("llm.") and "lora_" in name for name, _ in trained) and all(
            not p.any() for name, p in trained if "lora_B" in name) and hasattr(model.llm, "disable_adapter")
        self.adapters_off = fresh_adapters
        self._params: list[torch.nn.Parameter] = []
        self._values: list[torch.Tensor] = []
        if not fresh_adapters:
            self._params = [p for _, p in trained]
            self._values = [p.detach().clone() for p in self._params]
        log.info("reference model: %s", "the LLM with its (fresh) LoRA adapters switched off" if fresh_adapters else
                 f"the start values of the {sum(v.numel() for v in self._values):,} trained parameters, swapped in")

    @contextlib.contextmanager
    def active(self, model: Any) -> Iterator[None]:
        """Within the block, ``model`` computes as the reference did (no gradients)."""
        with torch.no_grad():
            if self.adapters_off:
                with model.llm.disable_adapter():
                    yield
                return
            current = [p.data for p in self._params]
            for i, (p, value) in enumerate(zip(self._params, self._values)):
                if value.device != p.device or value.dtype != p.dtype:  # the model moved to its device after the snapshot
                    value = self._values[i] = value.to(device=p.device, dtype=p.dtype)
                p.data = value
            try:
                yield
            finally:
                for p, value in zip(self._params, current):
                    p.data = value
