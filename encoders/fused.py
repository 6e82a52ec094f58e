"""``fuse``: several encoders for one media kind, their tokens joined on the channel axis (Eagle) or along the sequence.

A domain encoder beside a general one (BiomedCLIP + SigLIP on chest films, a remote-sensing CLIP + DINOv2) sees the
same item. Each part gets the item at its own input size and normalisation, so the fused encoder's own transform
only resizes to the largest input size and scales to [0, 1]; the parts resample and normalise inside ``forward``.

- ``mode: channels`` concatenates the parts' tokens feature-wise (``embed_dim`` is the sum). Their token grids must
  match; square grids without prefix (CLS) tokens that differ are average-pooled to the smallest one.
- ``mode: sequence`` puts the parts' tokens one after the other (``num_tokens`` is the sum); their widths must match.
"""
from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .base import EncoderInfo, encode_slices
from .errors import EncoderError, EncoderOptionError


def _parts_of(encoders: Any) -> list[tuple[str, dict[str, Any]]]:
    if not isinstance(encoders, (list, tuple)) or len(encoders) < 2:
        raise EncoderOptionError("fuse needs encoders: a list of at least two {name, options} entries, e.g. "
                                 "[{name: 'hf:/models/biomedclip'}, {name: 'hf:/models/siglip'}]")
    parts = []
    for i, part in enumerate(encoders):
        if not isinstance(part, dict) or not isinstance(part.get("name"), str) or set(part) - {"name", "options"}:
            raise EncoderOptionError(f"fuse: encoders[{i}] must be {{name: ..., options: {{...}}}}; got {part!r}")
        if part["name"] == "fuse":
            raise EncoderOptionError(f"fuse: encoders[{i}] is itself a fuse; list its parts here instead")
        parts.append((part["name"], dict(part.get("options") or {})))
    return parts


def locate_fused(_name: str = "fuse", encoders: Any = None, mode: str = "channels", normalize: bool = True) -> None:
    """What ``build_fused`` would refuse in any part (a missing directory, an unknown option), without building."""
    from . import check_encoder

    for i, (name, options) in enumerate(_parts_of(encoders)):
        try:
            check_encoder(name, options)
        except EncoderError as exc:
            raise type(exc)(f"fuse: encoders[{i}] ({name}): {exc}") from None


def _square_side(info: EncoderInfo) -> int | None:
    """The side of an encoder's square token grid when its output is only that grid (no CLS), else None."""
    n = info.num_tokens()
    side = math.isqrt(n)
    return side if info.num_prefix_tokens == 0 and side * side == n else None


class FusedEncoder(nn.Module):
    def __init__(self, parts: list[nn.Module], info: EncoderInfo, mode: str, normalize: bool, side: int | None) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.info, self._mode, self._normalize, self._side = info, mode, normalize, side

    @property
    def takes_lengths(self) -> bool:
        return any(getattr(p, "takes_lengths", False) for p in self.parts)

    def _fit(self, x: torch.Tensor, part: nn.Module) -> torch.Tensor:
        """The fused input as ``part`` expects it: its size, and (images) its mean and std."""
        info = part.info
        if info.modality == "audio":
            n = info.input_size[0]
            return x[..., :n] if x.shape[-1] >= n else F.pad(x, (0, n - x.shape[-1]))
        if tuple(x.shape[-2:]) != tuple(info.input_size):
            x = F.interpolate(x, size=tuple(info.input_size), mode="bilinear", antialias=True, align_corners=False)
        if self._normalize:
            mean = torch.tensor(info.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            std = torch.tensor(info.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            x = (x - mean) / std
        return x

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        outs = []
        for part in self.parts:
            fitted = self._fit(x, part)
            out = encode_slices(part, fitted, lengths)
            if self._side is not None and out.shape[1] != self._side**2:  # a finer grid pooled to the common one
                b, n, d = out.shape
                grid = out.transpose(1, 2).reshape(b, d, math.isqrt(n), math.isqrt(n))
                out = F.adaptive_avg_pool2d(grid, self._side).flatten(2).transpose(1, 2)
            outs.append(out)
        return torch.cat(outs, dim=-1 if self._mode == "channels" else 1)

    def layer_blocks(self) -> list[nn.Module]:
        """Every part's blocks, part by part (LoRA adapts them all; ``last_blocks`` counts from the last part's end)."""
        return [block for part in self.parts for block in part.layer_blocks()]

    def output_norm(self) -> nn.Module | None:
        return self.parts[-1].output_norm() if hasattr(self.parts[-1], "output_norm") else None


def build_fused(encoders: Any = None, mode: Literal["channels", "sequence"] = "channels", normalize: bool = True) -> FusedEncoder:
    """``fuse`` with ``encoders: [{name, options}, ...]`` (built with ``create_encoder``), ``mode`` (``channels`` or
    ``sequence``), and ``normalize: false`` when the domain's items are standardised already (multispectral bands
    with dataset statistics)."""
    from . import create_encoder

    if mode not in ("channels", "sequence"):
        raise EncoderOptionError(f"fuse: mode must be 'channels' or 'sequence', got {mode!r}")
    specs = _parts_of(encoders)
    parts = []
    for i, (name, options) in enumerate(specs):
        try:
            parts.append(create_encoder(name, **options))
        except EncoderError as exc:
            raise type(exc)(f"fuse: encoders[{i}] ({name}): {exc}") from None
    return fuse_parts(parts, mode, normalize)


def fuse_parts(parts: list[nn.Module], mode: str = "channels", normalize: bool = True) -> FusedEncoder:
    """The fused encoder over parts already built (``build_fused``; ``encoders.skeleton`` for planning)."""
    if mode not in ("channels", "sequence"):
        raise EncoderOptionError(f"fuse: mode must be 'channels' or 'sequence', got {mode!r}")
    infos = [p.info for p in parts]
    named = ", ".join(f"{i.source}" for i in infos)
    for field in ("modality", "channels", "sample_rate"):
        if len({getattr(i, field) for i in infos}) > 1:
            raise EncoderOptionError(f"fuse: the parts differ in {field} ({', '.join(str(getattr(i, field)) for i in infos)}: {named}); "
                                     "fused encoders must take the same media")
    counts = [i.num_tokens() for i in infos]
    side = None
    if mode == "sequence":
        if len({i.embed_dim for i in infos}) > 1:
            raise EncoderOptionError(f"fuse: mode sequence joins tokens of one width, but the parts give {[i.embed_dim for i in infos]} "
                                     f"({named}); use mode: channels")
        embed_dim, tokens = infos[0].embed_dim, sum(counts)
    else:
        if len(set(counts)) > 1:
            if infos[0].modality == "audio":  # frames in time: no grid to pool, and shorter windows hear less
                raise EncoderOptionError(f"fuse: mode channels joins frames one to one, but the audio parts give {counts} frames ({named}); "
                                         "give the parts the same clip length (clip_seconds) and frame rate, or use mode: sequence")
            sides = [_square_side(i) for i in infos]
            if any(s is None for s in sides):
                raise EncoderOptionError(f"fuse: mode channels needs one token grid, but the parts give {counts} tokens ({named}); "
                                         "drop CLS tokens (keep_cls: false) so square grids can be pooled to the smallest, "
                                         "or use mode: sequence")
            side = min(sides)
        embed_dim, tokens = sum(i.embed_dim for i in infos), min(counts)
    first = infos[0]
    input_size = tuple(max(sizes) for sizes in zip(*(i.input_size for i in infos)))
    grid = (side, side) if side is not None else None
    info = EncoderInfo(
        modality=first.modality, embed_dim=embed_dim, input_size=input_size,
        patch_size=tuple(s // g for s, g in zip(input_size, grid)) if grid else first.patch_size,
        channels=first.channels, mean=(0.0,) * first.channels if normalize else first.mean,
        std=(1.0,) * first.channels if normalize else first.std, source=f"fuse({named})",
        license=" + ".join(i.license for i in infos), layer=first.layer, sample_rate=first.sample_rate, exact_tokens=tokens,
        extra={"mode": mode, "parts": [i.to_dict() for i in infos]},
        time_ordered=mode == "channels" and all(i.time_ordered for i in infos) and len(set(counts)) == 1,
    )
    return FusedEncoder(parts, info, mode, normalize, side)
