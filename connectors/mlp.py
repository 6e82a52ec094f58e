"""``mlp``: Linear -> (GELU -> Linear) x (depth - 1) per token; depth 2 is LLaVA-1.5's ``mlp2x_gelu``."""
from __future__ import annotations

import torch
from torch import nn

from ._registry import register_connector
from .errors import ConnectorOptionError


@register_connector("mlp")
class MLPConnector(nn.Module):
    keeps_prefix = True  # output token j is a function of input token j only: a clip's prefix maps to a prefix

    def __init__(self, *, in_dim: int, out_dim: int, depth: int = 2, hidden_dim: int | None = None, bias: bool = True) -> None:
        super().__init__()
        if depth < 1:
            raise ConnectorOptionError(f"mlp connector depth must be >= 1, got {depth}")
        self.in_dim, self.out_dim = in_dim, out_dim
        hidden = hidden_dim or out_dim
        dims = [in_dim] + [hidden] * (depth - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            if i:
                layers.append(nn.GELU())
            layers.append(nn.Linear(a, b, bias=bias))
        self.layers = nn.Sequential(*layers)

    def num_output_tokens(self, num_input_tokens: int) -> int:
        return num_input_tokens

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.layers(tokens)
