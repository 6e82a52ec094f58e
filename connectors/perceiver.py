"""``perceiver``: Flamingo's Perceiver Resampler: ``num_queries`` learned latents cross-attend to the encoder tokens
(keys and values are the tokens and the latents together) for ``depth`` layers, then a projection to the LLM width.
The output count is ``num_queries`` whatever the input count: a CT slice stack or a large image costs the same."""
from __future__ import annotations

import torch
from torch import nn

from ._registry import register_connector
from .errors import ConnectorOptionError


class ResamplerLayer(nn.Module):
    """latents += attention(latents -> [tokens; latents]); latents += feed-forward(latents); pre-norm."""

    def __init__(self, dim: int, heads: int, ff_mult: int) -> None:
        super().__init__()
        self.norm_tokens = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ff = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Linear(ff_mult * dim, dim))

    def forward(self, latents: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        q = self.norm_latents(latents)
        kv = torch.cat([self.norm_tokens(tokens), q], dim=1)
        latents = latents + self.attention(q, kv, kv, need_weights=False)[0]
        return latents + self.ff(latents)


@register_connector("perceiver")
class PerceiverConnector(nn.Module):
    """``dim`` is the resampler's width (the encoder's by default, as Flamingo); ``heads`` must divide it."""

    def __init__(self, *, in_dim: int, out_dim: int, num_queries: int = 64, depth: int = 2, heads: int = 8, dim: int | None = None,
                 ff_mult: int = 4) -> None:
        super().__init__()
        width = dim or in_dim
        if num_queries < 1 or depth < 1:
            raise ConnectorOptionError(f"perceiver needs num_queries >= 1 and depth >= 1; got num_queries={num_queries}, depth={depth}")
        if width % heads:
            raise ConnectorOptionError(f"perceiver heads={heads} does not divide its width {width} (option dim, the encoder width by default); "
                             f"set heads to a divisor of {width}, or set dim")
        self.in_dim, self.out_dim, self.num_queries = in_dim, out_dim, num_queries
        self.input_proj = nn.Linear(in_dim, width) if width != in_dim else nn.Identity()
        self.latents = nn.Parameter(torch.randn(num_queries, width) * 0.02)
        self.layers = nn.ModuleList(ResamplerLayer(width, heads, ff_mult) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, out_dim)

    def num_output_tokens(self, num_input_tokens: int) -> int:
        return self.num_queries

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = self.input_proj(tokens)
        latents = self.latents.expand(tokens.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(latents, tokens)
        return self.proj(self.norm(latents))
