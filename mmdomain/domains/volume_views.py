"""Which 2-D views of a volume become media items (middle, one index, k even slices, 2.5D neighbour stacks)."""
from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .base import DecodeError
from .windowing import WindowChoice, apply_window


class NiftiSlices(BaseModel):
    """Which 2-D slices of a volume become images: ``middle``, ``index``, ``even`` (``count`` evenly spaced slices,
    each its own media item) or ``neighbours`` (2.5D: slices ``index ± neighbours`` stacked as channels).

    ``orientation``: ``canonical`` (default) reorients a NIfTI to RAS+ first, so axis 0 runs towards the patient's
    right, 1 anterior, 2 superior whatever voxel order the file stored (a flipped or permuted affine no longer
    mirrors the picture); ``as_stored`` takes the voxels in file order, as before."""

    model_config = ConfigDict(extra="forbid")
    axis: int = Field(2, ge=0, le=2)
    mode: Literal["middle", "index", "even", "neighbours"] = "middle"
    index: int | None = None
    count: int = Field(3, ge=1)
    neighbours: int = Field(1, ge=1)
    orientation: Literal["canonical", "as_stored"] = "canonical"


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
    picks = [min(max(index + d, 0), n - 1) for d in range(-spec.neighbours, spec.neighbours + 1)]  # edges repeat
    return [np.stack([take(i) for i in picks], axis=-1)]


def window_view(image: np.ndarray, windows: Sequence[WindowChoice], file_window: tuple[float, float] | None) -> np.ndarray:
    if image.ndim == 3:  # neighbour stack: one window for all channels
        return apply_window(image, windows[0], file_window)
    channels = [apply_window(image, w, file_window) for w in windows]
    return channels[0] if len(channels) == 1 else np.stack(channels, axis=-1)


def slice_views(name: str, volume: np.ndarray, spec: NiftiSlices, windows: Sequence[WindowChoice],
                file_window: tuple[float, float] | None) -> list[np.ndarray]:
    """The views ``spec`` asks for, each windowed to [0, 1]."""
    return [window_view(s, windows, file_window) for s in pick_slices(name, volume, spec)]
