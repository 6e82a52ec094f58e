"""The connector contract: tokens [B, N, in_dim] -> tokens [B, num_output_tokens(N), out_dim]."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Connector(Protocol):
    """A trainable ``nn.Module`` between encoder and LLM.

    ``num_output_tokens(n)`` tells the processor how many placeholder tokens one media item needs, so a
    token-changing connector (pixel shuffle, resampler, Q-Former) needs no change anywhere else.
    """

    in_dim: int
    out_dim: int

    def num_output_tokens(self, num_input_tokens: int) -> int: ...

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor: ...
