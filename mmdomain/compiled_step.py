"""`optim.compile: true`: torch.compile of the parts a training step runs (each encoder and connector, the LLM's
decoder), and telling which steps paid for compiling.

The compiled callables are kept beside the model (``MultimodalLM.compiled``), not put into it: parameter names,
checkpoints and exports stay those of the eager model, and evaluation and generation (model.eval(), other shapes,
a KV cache) run eagerly instead of compiling graphs for every decoding length. The loss (chunked cross-entropy, a
custom autograd function) also stays eager.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)


def compile_model(model: Any) -> list[str]:
    """Compile, for training, what ``model``'s forward runs; returns the names of the compiled parts. Sequence
    lengths change from batch to batch, so shapes are dynamic (one graph for all lengths, not one per length)."""
    parts = {"decoder": model.causal_lm.get_decoder()}
    for kind, (encoder, connector, _) in enumerate(model.kind_parts()):
        parts[f"encoder[{kind}]"], parts[f"connector[{kind}]"] = encoder, connector
    model.compiled = {id(module): torch.compile(module, dynamic=True) for module in parts.values()}
    log.info("optim.compile: compiling %s for training on first use (the first step includes compile time)", ", ".join(parts))
    return list(parts)


class CompileWatch:
    """How many graphs torch.compile has built so far: a step after which the count grew spent time compiling, and
    that time is reported on its own, not averaged into samples/s."""

    @staticmethod
    def graphs() -> int:
        try:
            from torch._dynamo.utils import counters
        except ImportError:  # the counter is internal; without it every step counts as a training step
            return 0
        return int(counters["stats"].get("unique_graphs", 0))
