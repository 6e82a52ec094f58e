"""Gradient checkpointing (``optim.gradient_checkpointing``): activations of the LLM's blocks, and of the encoder's
blocks when the encoder trains, are recomputed in backward instead of kept, for about a third more compute.

Non-reentrant checkpointing (``use_reentrant=False``) throughout: it works when a block's inputs need no gradient
(a frozen LLM under LoRA, whose input embeddings are frozen), with DDP and FSDP2, and gives the same gradients.
"""
from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import MmdomainError

log = logging.getLogger(__name__)


class GradientCheckpointingError(MmdomainError, ValueError):
    """A model part that cannot recompute its activations."""


def enable_gradient_checkpointing(model: nn.Module) -> list[str]:
    """Turn it on for the LLM, and for each encoder with a trained parameter; returns the parts it covers."""
    causal_lm = model.causal_lm
    if not getattr(causal_lm, "supports_gradient_checkpointing", False):
        raise GradientCheckpointingError(f"{type(causal_lm).__name__} does not support gradient checkpointing in transformers; set "
                                         "optim.gradient_checkpointing: false (or use LoRA / a smaller micro-batch to save memory)")
    # transformers 5 renamed it activation_checkpointing_enable (the old name warns); 4.x has only the old one.
    enable = getattr(causal_lm, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    covered = ["llm"]
    for i, (encoder, _, _) in enumerate(model.kind_parts()):
        if not any(p.requires_grad for p in encoder.parameters()):
            continue  # a frozen encoder keeps no activations for backward: nothing to save
        blocks = encoder.layer_blocks() if hasattr(encoder, "layer_blocks") else []
        if not blocks:
            log.warning("encoder %s lists no blocks (layer_blocks), so its activations are kept; the LLM's are recomputed",
                        type(encoder).__name__)
            continue
        for block in blocks:
            checkpoint_block(block)
        covered.append("encoder" if i == 0 else f"extra_kinds.{i - 1}.encoder")
    return covered


def checkpoint_block(block: nn.Module) -> None:
    """Recompute ``block``'s forward in backward while gradients are recorded (evaluation, under no_grad, runs it plainly)."""
    if getattr(block, "_mmdomain_checkpointed", False):
        return
    original = block.forward

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            return checkpoint(original, *args, use_reentrant=False, **kwargs)
        return original(*args, **kwargs)

    block.forward = forward
    block._mmdomain_checkpointed = True
