"""Log-probabilities of the supervised (response) tokens of a batch, per token and per row: what DPO and GRPO score."""
from __future__ import annotations

from typing import Any

import torch

from ..processor import IGNORE


def response_logprobs(model: Any, batch: dict[str, Any], *, position_ids: torch.Tensor | None = None,
                      full: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(token_logp [N], rows [N], logp_all [N, V] or None)`` over the N supervised tokens of ``batch`` (labels other
    than -100), in row-major order: the prompt and the media never count. The LM head runs at those positions only."""
    hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"], batch["media"], position_ids)
    targets = batch["labels"][:, 1:]
    supervised = targets != IGNORE
    logp_all = torch.log_softmax(model.logits(hidden[:, :-1][supervised]).float(), dim=-1)
    token = logp_all.gather(1, targets[supervised].unsqueeze(1)).squeeze(1)
    return token, supervised.nonzero()[:, 0], logp_all if full else None


def per_row(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Sum of per-token ``values`` per row ``[n_rows]``."""
    return torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add(0, rows, values)


def tokens_per_row(rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    return torch.bincount(rows, minlength=n_rows)
