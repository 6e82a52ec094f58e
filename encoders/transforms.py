"""Image preprocessing derived from an encoder's EncoderInfo, so normalisation constants are never written twice."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .base import EncoderInfo


@dataclass(frozen=True)
class ImageTransform:
    """Callable: image (PIL, HWC/HW array or CHW tensor) -> normalised ``[C, H, W]`` float tensor.

    ``resize``: ``"squash"`` (stretch to the input size, as LLaVA-1.5 does without padding) or ``"pad"`` (keep the
    aspect ratio and pad with the mean colour, LLaVA-1.5's ``pad`` mode). Integer inputs are scaled by their dtype's
    maximum (255 for uint8, 65535 for uint16) to [0, 1]; float inputs are taken as already in [0, 1].
    """

    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int
    resize: str = "squash"
    normalize: bool = True
    """False when the input is already standardised per channel (e.g. multispectral bands with dataset statistics)."""

    def __call__(self, image: Any) -> torch.Tensor:
        x = _to_chw_float(image)
        if x.shape[0] != self.channels:
            if x.shape[0] == 1:
                x = x.expand(self.channels, -1, -1)
            elif x.shape[0] == 4 and self.channels == 3:  # RGBA: drop alpha
                x = x[:3]
            else:
                raise ValueError(f"image has {x.shape[0]} channels; the encoder expects {self.channels}")
        mean = torch.tensor(self.mean if self.normalize else (0.0,) * self.channels, dtype=x.dtype).view(-1, 1, 1)
        std = torch.tensor(self.std if self.normalize else (1.0,) * self.channels, dtype=x.dtype).view(-1, 1, 1)
        if self.resize == "pad":
            x = _pad_to_square(x, mean)
        elif self.resize != "squash":
            raise ValueError(f"resize={self.resize!r}: choose 'squash' or 'pad'")
        if tuple(x.shape[-2:]) != tuple(self.size):
            x = F.interpolate(x[None], size=self.size, mode="bicubic", align_corners=False, antialias=True)[0]
        return (x - mean) / std


def image_transform(info: EncoderInfo, resize: str = "squash", normalize: bool = True) -> ImageTransform:
    if info.modality != "image":
        raise ValueError(f"{info.source} is a {info.modality} encoder; image_transform needs an image encoder")
    return ImageTransform(tuple(info.input_size), tuple(info.mean), tuple(info.std), info.channels, resize, normalize)


@dataclass(frozen=True)
class VolumeTransform:
    """Callable: a stack of ``depth`` slices (``[D, H, W]`` or ``[D, H, W, C]`` array, or a ``[D, ...]`` tensor) ->
    ``[D, C, H, W]``, each slice fitted by ``slice_transform``. The model runs the 2-D encoder on every slice
    (``encode_slices``) and a depth-aware connector joins them."""

    slice_transform: ImageTransform
    depth: int

    def __call__(self, volume: Any) -> torch.Tensor:
        slices = volume if isinstance(volume, torch.Tensor) else np.asarray(volume)
        if slices.ndim not in (3, 4) or slices.shape[0] != self.depth:
            raise ValueError(f"a volume item must be a stack of {self.depth} slices ([D, H, W] or [D, H, W, C]); got shape "
                             f"{tuple(slices.shape)}")
        return torch.stack([self.slice_transform(s) for s in slices])


def volume_transform(info: EncoderInfo, depth: int, resize: str = "squash", normalize: bool = True) -> VolumeTransform:
    return VolumeTransform(image_transform(info, resize, normalize), depth)


@dataclass(frozen=True)
class AudioTransform:
    """Callable: mono waveform (array or tensor) at the encoder's rate -> float tensor of exactly ``num_samples``
    (zero-padded at the end, or cropped)."""

    num_samples: int

    def __call__(self, waveform: Any) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(waveform, dtype=np.float32) if not isinstance(waveform, torch.Tensor) else waveform).float()
        if x.ndim != 1:
            raise ValueError(f"audio must be a mono 1-D waveform, got shape {tuple(x.shape)}")
        if len(x) >= self.num_samples:
            return x[: self.num_samples]
        return F.pad(x, (0, self.num_samples - len(x)))


def audio_transform(info: EncoderInfo) -> AudioTransform:
    if info.modality != "audio":
        raise ValueError(f"{info.source} is a {info.modality} encoder; audio_transform needs an audio encoder")
    return AudioTransform(int(info.input_size[0]))


def _to_chw_float(image: Any) -> torch.Tensor:
    if isinstance(image, torch.Tensor):
        x = image
        if x.ndim == 2:
            x = x[None]
    else:
        if hasattr(image, "mode"):  # PIL image
            if image.mode not in ("L", "RGB", "RGBA", "I;16", "I", "F"):
                image = image.convert("RGB")
        arr = np.asarray(image)
        x = torch.from_numpy(np.require(arr, requirements=["C", "W"]))  # PIL arrays are read-only: copy only then
        if x.ndim == 2:
            x = x[None]
        elif x.ndim == 3:
            x = x.permute(2, 0, 1)
        else:
            raise ValueError(f"image array has shape {tuple(arr.shape)}; expected HW or HWC")
    if not x.is_floating_point():
        if x.dtype == torch.uint8:
            scale = 255.0
        elif x.dtype in (torch.int16, torch.uint16, torch.int32):
            scale = 65535.0
        else:
            raise ValueError(f"image dtype {x.dtype} is not supported; give uint8, uint16 or float in [0, 1]")
        x = x.to(torch.float32) / scale
    return x.to(torch.float32)


def _pad_to_square(x: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    c, h, w = x.shape
    side = max(h, w)
    out = fill.expand(c, side, side).clone()
    top, left = (side - h) // 2, (side - w) // 2
    out[:, top : top + h, left : left + w] = x
    return out
