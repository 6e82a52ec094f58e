"""``pixel_shuffle``: merge each ``factor x factor`` block of grid tokens into one, then an MLP (InternVL / Idefics3)."""
from __future__ import annotations

import torch
from torch import nn

from ._registry import register_connector
from .errors import ConnectorOptionError
from .mlp import MLPConnector
from .token_grid import square_side


@register_connector("pixel_shuffle")
class PixelShuffleConnector(nn.Module):
    """Cuts the token count by ``factor**2`` for a square grid of tokens (prefix tokens must be dropped first)."""

    def __init__(self, *, in_dim: int, out_dim: int, factor: int = 2, depth: int = 2) -> None:
        super().__init__()
        self.in_dim, self.out_dim, self.factor = in_dim, out_dim, factor
        self.norm = nn.LayerNorm(in_dim * factor * factor)
        self.mlp = MLPConnector(in_dim=in_dim * factor * factor, out_dim=out_dim, depth=depth)

    def _side(self, n: int) -> int:
        side = square_side(n, "pixel_shuffle")
        if side % self.factor:
            raise ConnectorOptionError(f"pixel_shuffle factor={self.factor} does not divide the encoder's {side}x{side} token grid; "
                             f"use a factor that divides {side}, or change the input size")
        return side

    def num_output_tokens(self, num_input_tokens: int) -> int:
        return (self._side(num_input_tokens) // self.factor) ** 2

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n, d = tokens.shape
        s, f = self._side(n), self.factor
        x = tokens.reshape(b, s // f, f, s // f, f, d).permute(0, 1, 3, 2, 4, 5).reshape(b, (s // f) ** 2, f * f * d)
        return self.mlp(self.norm(x))
