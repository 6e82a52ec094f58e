"""Training objectives: what one micro-batch's loss is (SFT, DPO, GRPO). The loop in train.py stays one; it asks the
recipe's objective for the examples a record makes, the loss of a batch, and the metrics to log.

An objective provides:
- ``examples``: None (one supervised conversation per row, the processor's own path) or an object with
  ``build(processor, record)`` (may raise ``SampleError``, counted against the budget) and
  ``collate(processor, items)`` — it runs in DataLoader workers, so it is picklable and holds no model;
- ``prepare(model)``: called with the start weights loaded and before a resumed run loads its own (the reference);
- ``units(micro)``: what the summed losses of a step's micro-batches are divided by, summed over ranks (SFT: supervised
  tokens, so the loss is token-weighted; DPO: pairs; GRPO: sampled answers);
- ``loss(model, batch)``: the summed loss of one micro-batch (a tensor to backpropagate);
- ``metrics()``: the means of its own statistics since the last call (written to metrics.jsonl with the loss);
- ``evaluate(model, processor, patterns, layout, recipe)``: extra held-out metrics for the eval report, or None.
"""
from __future__ import annotations

from typing import Any


def make_objective(recipe: Any) -> Any:
    """The objective the recipe names (``objective: sft | dpo | grpo``)."""
    if recipe.objective == "dpo":
        from .dpo import DPOObjective

        return DPOObjective(recipe.dpo)
    if recipe.objective == "grpo":
        from .grpo import GRPOObjective

        return GRPOObjective(recipe.grpo, max_length=recipe.model.max_length)
    from .sft import SFTObjective

    return SFTObjective()
