"""``c_abstractor``: Honeybee's convolutional abstractor: ``depth`` residual conv blocks over the token grid,
adaptive average pooling to a ``grid`` x ``grid`` output, as many blocks again, then an MLP to the LLM width
(Cha et al., 2024).

Convolutions keep the locality a resampler's attention loses, and the output count is set by ``grid`` whatever the
encoder's resolution (``grid: 4`` gives 16 tokens from a 16x16 or a 24x24 grid)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._registry import register_connector
from .errors import ConnectorOptionError
from .mlp import MLPConnector
from .token_grid import square_side, to_map, to_tokens


class ResidualBlock(nn.Module):
    """Honeybee's block, a RegNet bottleneck with group width 1 (timm's ``RegStage`` defaults): 1x1 conv -> depthwise
    3x3 conv -> squeeze-excitation (a quarter of the channels) -> 1x1 conv, plus the input. About 2 C^2 weights
    a block, where a plain 3x3 ResNet block would hold 18 C^2. Norms are GroupNorm over all channels (a per-sample
    layer norm, as Honeybee's LayerNorm2d), not BatchNorm: a connector often trains on small batches."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        squeezed = max(1, dim // 4)
        self.expand = nn.Sequential(nn.Conv2d(dim, dim, 1, bias=False), nn.GroupNorm(1, dim), nn.SiLU())
        self.spatial = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False), nn.GroupNorm(1, dim), nn.SiLU())
        self.excite = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dim, squeezed, 1), nn.SiLU(), nn.Conv2d(squeezed, dim, 1), nn.Sigmoid())
        self.project = nn.Sequential(nn.Conv2d(dim, dim, 1, bias=False), nn.GroupNorm(1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.spatial(self.expand(x))
        return F.silu(x + self.project(y * self.excite(y)))


@register_connector("c_abstractor")
class CAbstractorConnector(nn.Module):
    """Needs a square grid of patch tokens (prefix tokens dropped, as the encoders do by default)."""

    def __init__(self, *, in_dim: int, out_dim: int, grid: int = 12, depth: int = 3, hidden_dim: int | None = None, mlp_depth: int = 2) -> None:
        super().__init__()
        if grid < 1 or depth < 0 or mlp_depth < 1:
            raise ConnectorOptionError(f"c_abstractor needs grid >= 1, depth >= 0 and mlp_depth >= 1; got grid={grid}, depth={depth}, mlp_depth={mlp_depth}")
        hidden = hidden_dim or in_dim
        self.in_dim, self.out_dim, self.grid = in_dim, out_dim, grid
        self.stem = nn.Conv2d(in_dim, hidden, 1) if hidden != in_dim else nn.Identity()
        self.before_pool = nn.Sequential(*(ResidualBlock(hidden) for _ in range(depth)))
        self.after_pool = nn.Sequential(*(ResidualBlock(hidden) for _ in range(depth)))
        self.readout = MLPConnector(in_dim=hidden, out_dim=out_dim, depth=mlp_depth)

    def _side(self, n: int) -> int:
        side = square_side(n, "c_abstractor")
        if self.grid > side:
            raise ConnectorOptionError(f"c_abstractor grid={self.grid} is larger than the encoder's {side}x{side} token grid; "
                             f"set grid to at most {side} (pooling cannot add tokens)")
        return side

    def num_output_tokens(self, num_input_tokens: int) -> int:
        self._side(num_input_tokens)
        return self.grid * self.grid

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.before_pool(self.stem(to_map(tokens, self._side(tokens.shape[1]))))
        x = self.after_pool(F.adaptive_avg_pool2d(x, self.grid))
        return self.readout(to_tokens(x))
