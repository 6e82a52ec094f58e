"""``qformer``: BLIP-2's querying transformer: ``num_queries`` learned queries pass ``depth`` blocks of self-attention
among themselves, cross-attention to the encoder tokens and a feed-forward, then a projection to the LLM width.

With ``window: W`` it is SALMONN's window-level Q-Former for audio: the tokens are cut into windows of W encoder
tokens (the last one padded and masked), the queries read each window alone, and the outputs follow in time order,
so the count grows with the input: ``ceil(n / W) * num_queries`` (``num_queries`` is then per window, 1 by default;
SALMONN uses 17 Whisper frames, about 0.33 s, and 1 query)."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._registry import register_connector
from .errors import ConnectorOptionError


@register_connector("qformer")
class QFormerConnector(nn.Module):
    """``dim`` is the Q-Former's width (the encoder's by default); ``heads`` must divide it. Each block is torch's
    pre-norm ``TransformerDecoderLayer`` (self-attention, cross-attention, feed-forward), no causal mask."""

    @staticmethod
    def keeps_prefix(options: dict[str, Any]) -> bool:
        """Windowed, each window is read alone and its queries follow in time order: a clip's prefix maps to a prefix."""
        return options.get("window") is not None

    def __init__(self, *, in_dim: int, out_dim: int, num_queries: int | None = None, depth: int = 2, heads: int = 8,
                 dim: int | None = None, window: int | None = None, ff_mult: int = 4) -> None:
        super().__init__()
        width = dim or in_dim
        queries = num_queries if num_queries is not None else (1 if window else 32)
        if queries < 1 or depth < 1 or (window is not None and window < 1):
            raise ConnectorOptionError(f"qformer needs num_queries >= 1, depth >= 1 and window >= 1; got num_queries={queries}, depth={depth}, window={window}")
        if width % heads:
            raise ConnectorOptionError(f"qformer heads={heads} does not divide its width {width} (option dim, the encoder width by default); "
                             f"set heads to a divisor of {width}, or set dim")
        self.in_dim, self.out_dim, self.num_queries, self.window = in_dim, out_dim, queries, window
        self.input_proj = nn.Linear(in_dim, width) if width != in_dim else nn.Identity()
        self.input_norm = nn.LayerNorm(width)
        self.queries = nn.Parameter(torch.randn(queries, width) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerDecoderLayer(width, heads, dim_feedforward=ff_mult * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, out_dim)

    def num_output_tokens(self, num_input_tokens: int) -> int:
        if self.window is None:
            return self.num_queries
        return math.ceil(num_input_tokens / self.window) * self.num_queries

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        memory = self.input_norm(self.input_proj(tokens))
        b, n, d = memory.shape
        padding = None
        if self.window is not None:  # each window becomes its own row: queries never see another window
            windows = math.ceil(n / self.window)
            pad = windows * self.window - n
            memory = F.pad(memory, (0, 0, 0, pad)).reshape(b * windows, self.window, d)
            if pad:
                padding = torch.zeros(windows, self.window, dtype=torch.bool, device=memory.device)
                padding[-1, self.window - pad:] = True
                padding = padding.repeat(b, 1)
        x = self.queries.expand(memory.shape[0], -1, -1)
        for block in self.blocks:
            x = block(x, memory, memory_key_padding_mask=padding)
        return self.proj(self.norm(x)).reshape(b, -1, self.proj.out_features)
