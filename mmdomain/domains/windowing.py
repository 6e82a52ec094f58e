"""Windowing: map modality values (HU for CT) to [0, 1] with a preset, an explicit window, the file's own or min-max."""
from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

# Window presets (center, width) in Hounsfield units.
PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "soft_tissue": (40.0, 400.0),
}


class Window(BaseModel):
    model_config = ConfigDict(extra="forbid")
    center: float
    width: float = Field(gt=0)


WindowChoice = Literal["file", "minmax", "lung", "mediastinum", "bone", "brain", "soft_tissue"] | Window


def apply_window(values: np.ndarray, window: WindowChoice, file_window: tuple[float, float] | None = None) -> np.ndarray:
    """Map values to [0, 1] with the DICOM linear VOI function (PS3.3 C.11.2.1.2)."""
    if window == "file" and file_window is None:
        lo, hi = np.percentile(values, [0.5, 99.5]) if values.size else (0.0, 1.0)
        return np.clip((values - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32)
    if window == "minmax":
        lo, hi = float(values.min()), float(values.max())
        return ((values - lo) / max(hi - lo, 1e-6)).astype(np.float32)
    if window == "file":
        center, width = file_window
    elif isinstance(window, Window):
        center, width = window.center, window.width
    else:
        center, width = PRESETS[window]
    width = max(width, 1.0)
    return np.clip((values - (center - 0.5)) / max(width - 1, 1e-6) + 0.5, 0, 1).astype(np.float32)
