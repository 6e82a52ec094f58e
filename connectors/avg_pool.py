"""``avg_pool``: 2-D average pooling of the token grid, to a fixed output ``grid`` or by a ``factor``, then an MLP
(the cheap token cut LLaVA-OneVision applies to video frames and several high-resolution LLaVA variants use)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._registry import register_connector
from .errors import ConnectorOptionError
from .mlp import MLPConnector
from .token_grid import square_side, to_map, to_tokens


@register_connector("avg_pool")
class AvgPoolConnector(nn.Module):
    """``grid: G`` pools any square grid to G x G tokens (adaptive pooling); ``factor: F`` (the default, 2) averages
    each F x F block, so the grid's side must divide by F. Give one of the two."""

    def __init__(self, *, in_dim: int, out_dim: int, grid: int | None = None, factor: int | None = None, depth: int = 2) -> None:
        super().__init__()
        if grid is not None and factor is not None:
            raise ConnectorOptionError(f"avg_pool takes grid (output side) or factor (pooling window), not both; got grid={grid}, factor={factor}")
        if factor is None and grid is None:
            factor = 2
        if (grid is not None and grid < 1) or (factor is not None and factor < 1):
            raise ConnectorOptionError(f"avg_pool needs grid >= 1 or factor >= 1; got grid={grid}, factor={factor}")
        self.in_dim, self.out_dim, self.grid, self.factor = in_dim, out_dim, grid, factor
        self.mlp = MLPConnector(in_dim=in_dim, out_dim=out_dim, depth=depth)

    def _output_side(self, n: int) -> int:
        side = square_side(n, "avg_pool")
        if self.grid is not None:
            if self.grid > side:
                raise ConnectorOptionError(f"avg_pool grid={self.grid} is larger than the encoder's {side}x{side} token grid; "
                                 f"set grid to at most {side} (pooling cannot add tokens)")
            return self.grid
        if side % self.factor:
            raise ConnectorOptionError(f"avg_pool factor={self.factor} does not divide the encoder's {side}x{side} token grid; "
                             f"use a factor that divides {side}, or grid: G for a fixed output grid")
        return side // self.factor

    def num_output_tokens(self, num_input_tokens: int) -> int:
        return self._output_side(num_input_tokens) ** 2

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self._output_side(tokens.shape[1])
        pooled = F.adaptive_avg_pool2d(to_map(tokens, square_side(tokens.shape[1], "avg_pool")), out)
        return self.mlp(to_tokens(pooled))
