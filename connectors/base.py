"""The connector contract: tokens [B, N, in_dim] -> tokens [B, num_output_tokens(N), out_dim]."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Connector(Protocol):
    """A trainable ``nn.Module`` between encoder and LLM.

    ``num_output_tokens(n)`` tells the processor how many placeholder tokens one media item needs, so a
    token-changing connector (pixel shuffle, resampler, Q-Former) needs no change anywhere else.

    A connector may also set ``keeps_prefix = True`` when output token ``j`` depends only on input tokens before
    ``(j + 1) * n / num_output_tokens(n)`` (per-token maps, frame stacking, windowed queries): then the first
    ``num_output_tokens(m)`` outputs for a padded input describe its first ``m`` tokens, and a short audio clip can
    cost tokens in proportion to its length (a static method ``keeps_prefix(options)`` says it when it depends on
    the options, as the windowed Q-Former's does). Connectors that mix all positions (resamplers, pooling grids)
    leave it unset and every item costs the full count.
    """

    in_dim: int
    out_dim: int

    def num_output_tokens(self, num_input_tokens: int) -> int: ...

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor: ...
