"""Tiny random-init encoders for tests and the CPU demo (``tiny-vit`` for images, ``tiny-audio`` for sound), registered
like any other encoder. Both are initialised at unit scale so that, frozen and random, their output still carries
the input: transformers' default init (std 0.02) would leave little but the position signal."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import EncoderInfo, as_pair, resolve_layers
from .errors import EncoderOptionError


def sincos_1d(length: int, dim: int) -> torch.Tensor:
    """Fixed 1-D sin-cos position embedding ``[length, dim]`` at unit scale (see ``sincos_2d`` for why unit scale)."""
    if dim % 2:
        raise ValueError(f"sin-cos position embedding needs an even dim, got {dim}")
    freqs = 1.0 / (10000 ** (torch.arange(dim // 2, dtype=torch.float32) / (dim // 2)))
    angles = torch.arange(length, dtype=torch.float32)[:, None] * freqs
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


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


def fuse_taps(blocks: nn.ModuleList, x: torch.Tensor, final_norm: nn.Module, taps: list[int]) -> torch.Tensor:
    """Run ``blocks``; return the outputs of blocks ``taps`` concatenated on the channel axis (one tap: that output).
    ``final_norm`` (an Identity unless the tower's last block is built) applies to the last block's output only."""
    outputs = []
    for block in blocks:
        x = block(x)
        outputs.append(x)
    outputs[-1] = final_norm(outputs[-1])
    return torch.cat([outputs[i] for i in taps], dim=-1) if len(taps) > 1 else outputs[taps[0]]


class TinyViT(nn.Module):
    """A pre-norm ViT with a CLS token and fixed sin-cos positions; patch embedding at unit output scale."""

    def __init__(self, info: EncoderInfo, dim: int, taps: list[int], heads: int, keep_cls: bool) -> None:
        super().__init__()
        self.info = info
        self._taps = taps  # blocks whose outputs are returned, concatenated on the channel axis
        ph, pw = info.patch_size
        self.patch_embed = nn.Conv2d(info.channels, dim, kernel_size=(ph, pw), stride=(ph, pw))
        # Scale the random patch kernel so patch features come out near unit std, like the position embedding.
        nn.init.normal_(self.patch_embed.weight, std=1.0 / math.sqrt(info.channels * ph * pw))
        nn.init.zeros_(self.patch_embed.bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        gh, gw = info.grid()
        self.register_buffer("pos_embed", sincos_2d(gh, gw, dim)[None], persistent=False)
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(max(taps) + 1))  # later blocks are never built
        self.norm = nn.LayerNorm(dim) if info.extra.get("final_norm") else nn.Identity()
        self._keep_cls = keep_cls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        if x.shape[1] != self.pos_embed.shape[1]:
            raise ValueError(f"input gives {x.shape[1]} patches; this encoder is built for {self.pos_embed.shape[1]} ({self.info.input_size} px)")
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x + self.pos_embed], dim=1)
        x = fuse_taps(self.blocks, x, self.norm, self._taps)
        return x if self._keep_cls else x[:, 1:]

    def layer_blocks(self) -> list[nn.Module]:
        """The transformer blocks ``forward`` runs, input to output."""
        return list(self.blocks)

    def output_norm(self) -> nn.Module | None:
        return None if isinstance(self.norm, nn.Identity) else self.norm


def build_tiny_vit(
    *,
    image_size: int | tuple[int, int] = 64,
    patch_size: int = 8,
    dim: int = 64,
    depth: int = 2,
    heads: int = 4,
    channels: int = 3,
    layer: int = -1,
    layers: list[int] | None = None,
    keep_cls: bool = False,
) -> TinyViT:
    """``tiny-vit``: a ~0.1 M-parameter random ViT. Layers after ``layer`` (the deepest of ``layers``) are never built."""
    if dim % 4 or dim % heads:
        raise EncoderOptionError(f"tiny-vit: dim={dim} must be divisible by 4 (sin-cos positions) and by heads={heads}")
    taps, deepest = resolve_layers(layer, layers, depth, "tiny-vit")
    info = EncoderInfo(
        modality="image",
        embed_dim=dim * len(taps),
        input_size=as_pair(image_size),
        patch_size=as_pair(patch_size),
        channels=channels,
        mean=(0.5,) * channels,
        std=(0.25,) * channels,
        source="tiny-vit",
        license="n/a (random init)",
        layer=deepest,
        layers=tuple(layers) if layers is not None else None,
        num_prefix_tokens=1 if keep_cls else 0,
        extra={"final_norm": max(taps) == depth - 1},
    )
    return TinyViT(info, dim=dim, taps=taps, heads=heads, keep_cls=keep_cls)


def mel_filters(n_mels: int, n_fft: int, sample_rate: int) -> torch.Tensor:
    """Triangular filters ``[n_mels, n_fft // 2 + 1]`` evenly spaced on the HTK mel scale from 0 Hz to Nyquist."""
    to_mel = lambda f: 2595.0 * torch.log10(1.0 + f / 700.0)  # noqa: E731
    to_hz = lambda m: 700.0 * (10.0 ** (m / 2595.0) - 1.0)  # noqa: E731
    freqs = torch.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = to_hz(torch.linspace(0.0, float(to_mel(torch.tensor(sample_rate / 2))), n_mels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising, falling = (freqs - lower) / (centre - lower), (upper - freqs) / (upper - centre)
    return torch.minimum(rising, falling).clamp(min=0.0)


class TinyAudio(nn.Module):
    """Log-mel (25 ms window every 10 ms), standardised per clip, then a stride-2 conv (two frames per token, 50
    tokens/s at the defaults, as Whisper), fixed sin-cos positions and pre-norm transformer blocks.

    Takes mono waveforms ``[B, samples]`` at ``info.sample_rate``, padded or cropped to ``info.input_size``: what the
    audio domain decodes and ``audio_transform`` fits. The conv is initialised so its output has about unit std,
    like the positions, so frozen at random init the tokens still differ with the sound (Whisper's std 0.02 convs
    under unit-scale positions make every clip look nearly alike)."""

    def __init__(self, info: EncoderInfo, n_mels: int, hop: int, dim: int, taps: list[int], heads: int) -> None:
        super().__init__()
        self.info, self.hop, self.n_fft, self._taps = info, hop, int(2.5 * hop), taps
        self.register_buffer("filters", mel_filters(n_mels, self.n_fft, int(info.sample_rate)), persistent=False)
        self.register_buffer("window", torch.hann_window(self.n_fft), persistent=False)
        self.conv = nn.Conv1d(n_mels, dim, kernel_size=3, stride=2, padding=1)
        nn.init.normal_(self.conv.weight, std=1.0 / math.sqrt(n_mels * 3))  # standardised mels in -> unit-std tokens out
        nn.init.zeros_(self.conv.bias)
        self.register_buffer("pos_embed", sincos_1d(int(info.exact_tokens), dim)[None], persistent=False)
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(max(taps) + 1))  # later blocks are never built
        self.norm = nn.LayerNorm(dim) if info.extra.get("final_norm") else nn.Identity()

    def log_mel(self, waveform: torch.Tensor) -> torch.Tensor:
        """``[B, samples]`` -> ``[B, n_mels, frames]`` log-mel, zero mean and unit std per clip (loudness removed,
        the shape of the spectrum over time kept). Silence gives zeros."""
        spec = torch.stft(waveform.float(), self.n_fft, self.hop, window=self.window, return_complex=True)
        mel = (self.filters @ spec[..., :-1].abs().pow(2)).clamp(min=1e-10).log10()
        mel = torch.maximum(mel, mel.amax(dim=(-2, -1), keepdim=True) - 8.0)  # an 80 dB floor, as Whisper
        mean, std = mel.mean(dim=(-2, -1), keepdim=True), mel.std(dim=(-2, -1), keepdim=True)
        return (mel - mean) / (std + 1e-5)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        n = self.info.input_size[0]
        if waveform.shape[-1] != n:  # the processor already fits clips; direct callers get the same rule
            waveform = F.pad(waveform, (0, n - waveform.shape[-1])) if waveform.shape[-1] < n else waveform[..., :n]
        x = self.conv(self.log_mel(waveform).to(self.conv.weight.dtype)).transpose(1, 2) + self.pos_embed
        return fuse_taps(self.blocks, x, self.norm, self._taps)

    def layer_blocks(self) -> list[nn.Module]:
        """The transformer blocks ``forward`` runs, input to output."""
        return list(self.blocks)

    def output_norm(self) -> nn.Module | None:
        return None if isinstance(self.norm, nn.Identity) else self.norm


def build_tiny_audio(
    *,
    sample_rate: int = 16000,
    clip_seconds: float = 1.0,
    n_mels: int = 40,
    dim: int = 64,
    depth: int = 2,
    heads: int = 4,
    layer: int = -1,
    layers: list[int] | None = None,
) -> TinyAudio:
    """``tiny-audio``: a ~0.1 M-parameter random audio encoder (log-mel + conv + transformer), 50 tokens per second
    at 16 kHz; use it with the ``audio`` domain and, to cut tokens, the ``frame_stack`` connector."""
    if dim % 2 or dim % heads:
        raise EncoderOptionError(f"tiny-audio: dim={dim} must be even (sin-cos positions) and divisible by heads={heads}")
    if sample_rate < 1000 or sample_rate % 100:
        raise EncoderOptionError(f"tiny-audio: sample_rate={sample_rate} must be a multiple of 100 Hz (10 ms hops), at least 1000")
    hop = sample_rate // 100
    samples = round(clip_seconds * sample_rate)
    if samples < 2 * hop:
        raise EncoderOptionError(f"tiny-audio: clip_seconds={clip_seconds} is shorter than one token (20 ms)")
    taps, deepest = resolve_layers(layer, layers, depth, "tiny-audio")
    tokens = (samples // hop + 1) // 2  # frames (one per hop, the centred STFT's last dropped), halved by the stride-2 conv
    info = EncoderInfo(
        modality="audio",
        embed_dim=dim * len(taps),
        input_size=(samples,),
        patch_size=(2 * hop,),
        channels=1,
        mean=(0.0,),
        std=(1.0,),
        source="tiny-audio",
        license="n/a (random init)",
        layer=deepest,
        layers=tuple(layers) if layers is not None else None,
        sample_rate=sample_rate,
        exact_tokens=tokens,
        extra={"final_norm": max(taps) == depth - 1},
        time_ordered=True,
    )
    return TinyAudio(info, n_mels=n_mels, hop=hop, dim=dim, taps=taps, heads=heads)
