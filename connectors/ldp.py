"""``ldp``: MobileVLM's lightweight downsample projector: a per-token MLP to the LLM width, then two depthwise-
separable conv blocks over the token grid, the second with stride 2, so a side-S grid leaves ceil(S/2)^2 tokens
(576 -> 144 for CLIP-L/14-336). Chu et al., 2023."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._registry import register_connector
from .mlp import MLPConnector
from .token_grid import square_side, to_map, to_tokens


class DepthwiseBlock(nn.Module):
    """Depthwise 3x3 conv (``stride``) -> norm -> hardswish -> pointwise conv -> norm, with a skip at stride 1
    (MobileNetV2's inverted residual at expansion 1, as MobileVLM uses). GroupNorm over all channels instead of
    BatchNorm: small training batches and eval then behave alike."""

    def __init__(self, dim: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.depthwise = nn.Conv2d(dim, dim, 3, stride=stride, padding=1, groups=dim, bias=False)
        self.norm1 = nn.GroupNorm(1, dim)
        self.pointwise = nn.Conv2d(dim, dim, 1, bias=False)
        self.norm2 = nn.GroupNorm(1, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm2(self.pointwise(F.hardswish(self.norm1(self.depthwise(x)))))
        return x + out if self.stride == 1 else out


@register_connector("ldp")
class LDPConnector(nn.Module):
    """Needs a square grid of patch tokens (prefix tokens dropped, as the encoders do by default)."""

    def __init__(self, *, in_dim: int, out_dim: int, depth: int = 2) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.mlp = MLPConnector(in_dim=in_dim, out_dim=out_dim, depth=depth)
        self.blocks = nn.Sequential(DepthwiseBlock(out_dim, stride=1), DepthwiseBlock(out_dim, stride=2))

    def num_output_tokens(self, num_input_tokens: int) -> int:
        return math.ceil(square_side(num_input_tokens, "ldp") / 2) ** 2

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        side = square_side(tokens.shape[1], "ldp")
        return to_tokens(self.blocks(to_map(self.mlp(tokens), side)))
