"""Which views of a volume become media items: 2-D slices (middle, one index, k even slices, 2.5D neighbour stacks)
or the volume itself as a stack of evenly resampled slices (``volume``) for a depth-aware connector."""
from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .base import DecodeError
from .windowing import WindowChoice, apply_window


class NiftiSlices(BaseModel):
    """Which slices of a volume become media items: ``middle``, ``index``, ``even`` (``count`` evenly spaced slices,
    each its own media item), ``neighbours`` (2.5D: slices ``index ± neighbours`` stacked as channels) or ``volume``
    (one item: ``count`` slices resampled evenly from the first to the last, ``[count, H, W]``, which the encoder
    sees slice by slice and a depth-aware connector such as ``depth_pool`` joins).

    ``orientation``: ``canonical`` (default) reorients a NIfTI to RAS+ first, so axis 0 runs towards the patient's
    right, 1 anterior, 2 superior whatever voxel order the file stored (a flipped or permuted affine no longer
    mirrors the picture); ``as_stored`` takes the voxels in file order, as before."""

    model_config = ConfigDict(extra="forbid")
    axis: int = Field(2, ge=0, le=2)
    mode: Literal["middle", "index", "even", "neighbours", "volume"] = "middle"
    index: int | None = None
    count: int = Field(3, ge=1)
    neighbours: int = Field(1, ge=1)
    orientation: Literal["canonical", "as_stored"] = "canonical"

    @property
    def volume_depth(self) -> int | None:
        """Slices per item in ``volume`` mode (every item has this many, so items batch together); None otherwise."""
        return self.count if self.mode == "volume" else None


def pick_slices(name: str, volume: np.ndarray, spec: NiftiSlices) -> list[np.ndarray]:
    n = volume.shape[spec.axis]
    take = lambda i: np.take(volume, i, axis=spec.axis)  # noqa: E731
    index = spec.index if spec.index is not None else n // 2
    if spec.mode in ("index", "neighbours") and not 0 <= index < n:
        raise DecodeError(f"member {name!r}: slice {index} out of range along axis {spec.axis} ({n} slices)")
    if spec.mode == "middle":
        return [take(n // 2)]
    if spec.mode == "index":
        return [take(index)]
    if spec.mode == "even":
        return [take(int(round(i))) for i in np.linspace(0, n - 1, spec.count + 2)[1:-1]]
    if spec.mode == "volume":  # nearest slices: a thin volume repeats some rather than blending neighbours
        return [np.stack([take(int(round(i))) for i in np.linspace(0, n - 1, spec.count)])]
    picks = [min(max(index + d, 0), n - 1) for d in range(-spec.neighbours, spec.neighbours + 1)]  # edges repeat
    return [np.stack([take(i) for i in picks], axis=-1)]


def window_view(image: np.ndarray, windows: Sequence[WindowChoice], file_window: tuple[float, float] | None,
                stacked: Literal["neighbours", "volume"] | None = None) -> np.ndarray:
    """One view windowed to [0, 1]: each window becomes a channel (last axis), except for a neighbour stack, whose
    slices are its channels already. A volume's windows span all its slices (a ``file`` percentile window too)."""
    if stacked == "neighbours" or (stacked is None and image.ndim == 3):
        return apply_window(image, windows[0], file_window)
    channels = [apply_window(image, w, file_window) for w in windows]
    return channels[0] if len(channels) == 1 else np.stack(channels, axis=-1)


def slice_views(name: str, volume: np.ndarray, spec: NiftiSlices, windows: Sequence[WindowChoice],
                file_window: tuple[float, float] | None) -> list[np.ndarray]:
    """The views ``spec`` asks for, each windowed to [0, 1]: ``[H, W]`` (``[H, W, C]`` for several windows or a
    neighbour stack), or one ``[count, H, W(, C)]`` stack in ``volume`` mode."""
    stacked = spec.mode if spec.mode in ("neighbours", "volume") else None
    return [window_view(s, windows, file_window, stacked) for s in pick_slices(name, volume, spec)]


def as_volume(image: np.ndarray, depth: int) -> np.ndarray:
    """A single 2-D image as a volume of ``depth`` identical slices: what ``volume`` mode makes of a one-slice volume,
    so a radiograph and a CT can share a model (and a batch)."""
    return np.broadcast_to(image, (depth, *image.shape))
