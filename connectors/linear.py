"""``linear``: one projection per token (LLaVA-1.0's projector)."""
from __future__ import annotations

import torch
from torch import nn

from ._registry import register_connector


@register_connector("linear")
class LinearConnector(nn.Module):
    keeps_prefix = True  # output token j is a function of input token j only: a clip's prefix maps to a prefix

    def __init__(self, *, in_dim: int, out_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.proj = nn.Linear(in_dim, out_dim, bias=bias)

    def num_output_tokens(self, num_input_tokens: int) -> int:
        return num_input_tokens

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(tokens)
