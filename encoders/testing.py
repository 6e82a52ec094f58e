"""Tiny random-init encoders for tests and the CPU demo, registered like any other encoder."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import EncoderInfo, as_pair, resolve_layer
from .errors import EncoderOptionError


def sincos_2d(grid_h: int, grid_w: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding ``[grid_h * grid_w, dim]`` at unit scale.

    Unit scale matters for a *frozen random* encoder: measured on the demo task, a learned position embedding at
    std 0.02 nearly lost position, while a patch signal and a unit-scale sin-cos position survive side by side.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    ys, xs = torch.meshgrid(torch.arange(grid_h, dtype=torch.float32), torch.arange(grid_w, dtype=torch.float32), indexing="ij")
    freqs = 1.0 / (10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4)))
    parts = [f(c.reshape(-1, 1) * freqs) for c in (ys, xs) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, dim=1)


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(attended)
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """A pre-norm ViT with a CLS token and fixed sin-cos positions; patch embedding at unit output scale."""

    def __init__(self, info: EncoderInfo, depth: int, heads: int, keep_cls: bool) -> None:
        super().__init__()
        self.info = info
        dim, (ph, pw) = info.embed_dim, info.patch_size
        self.patch_embed = nn.Conv2d(info.channels, dim, kernel_size=(ph, pw), stride=(ph, pw))
        # Scale the random patch kernel so patch features come out near unit std, like the position embedding.
        nn.init.normal_(self.patch_embed.weight, std=1.0 / math.sqrt(info.channels * ph * pw))
        nn.init.zeros_(self.patch_embed.bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        gh, gw = info.grid()
        self.register_buffer("pos_embed", sincos_2d(gh, gw, dim)[None], persistent=False)
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim) if info.extra.get("final_norm") else nn.Identity()
        self._keep_cls = keep_cls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        if x.shape[1] != self.pos_embed.shape[1]:
            raise ValueError(f"input gives {x.shape[1]} patches; this encoder is built for {self.pos_embed.shape[1]} ({self.info.input_size} px)")
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x + self.pos_embed], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return x if self._keep_cls else x[:, 1:]


def build_tiny_vit(
    *,
    image_size: int | tuple[int, int] = 64,
    patch_size: int = 8,
    dim: int = 64,
    depth: int = 2,
    heads: int = 4,
    channels: int = 3,
    layer: int = -1,
    keep_cls: bool = False,
) -> TinyViT:
    """``tiny-vit``: a ~0.1 M-parameter random ViT. Layers after ``layer`` are never built."""
    if dim % 4 or dim % heads:
        raise EncoderOptionError(f"tiny-vit: dim={dim} must be divisible by 4 (sin-cos positions) and by heads={heads}")
    block_index, is_last = resolve_layer(layer, depth, "tiny-vit")
    info = EncoderInfo(
        modality="image",
        embed_dim=dim,
        input_size=as_pair(image_size),
        patch_size=as_pair(patch_size),
        channels=channels,
        mean=(0.5,) * channels,
        std=(0.25,) * channels,
        source="tiny-vit",
        license="n/a (random init)",
        layer=layer,
        num_prefix_tokens=1 if keep_cls else 0,
        extra={"final_norm": is_last},
    )
    return TinyViT(info, depth=block_index + 1, heads=heads, keep_cls=keep_cls)
