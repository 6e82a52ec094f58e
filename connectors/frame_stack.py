"""``frame_stack``: concatenate every ``k`` consecutive frames, then an MLP (as Ultravox does for audio).

A 30 s Whisper clip is 1500 encoder frames; with k = 8 it costs 188 LLM tokens instead of 1500.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._registry import register_connector
from .errors import ConnectorOptionError
from .mlp import MLPConnector


@register_connector("frame_stack")
class FrameStackConnector(nn.Module):
    keeps_prefix = True  # output token j stacks input frames jk..jk+k-1 only: a clip's prefix maps to a prefix

    def __init__(self, *, in_dim: int, out_dim: int, k: int = 8, depth: int = 2) -> None:
        super().__init__()
        if k < 1 or depth < 1:
            raise ConnectorOptionError(f"frame_stack needs k >= 1 and depth >= 1, got k={k}, depth={depth}")
        self.in_dim, self.out_dim, self.k = in_dim, out_dim, k
        self.mlp = MLPConnector(in_dim=in_dim * k, out_dim=out_dim, depth=depth)

    def num_output_tokens(self, num_input_tokens: int) -> int:
        return math.ceil(num_input_tokens / self.k)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n, d = tokens.shape
        pad = self.num_output_tokens(n) * self.k - n
        if pad:  # zero frames complete the last group
            tokens = F.pad(tokens, (0, 0, 0, pad))
        return self.mlp(tokens.reshape(b, -1, self.k * d))
