"""Medical media: DICOM (``dicom.py``; a series as one item: ``dicom_series.py``) and NIfTI (``nifti.py``) decoded as a
radiologist would see them, plus PNG/JPEG.

Privacy: no DICOM header value is ever logged or written by mmdomain; shards hold identity-free copies (see the
DICOM and NIfTI modules for what each keeps).
"""
from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .base import media_type
from .dicom import decode_dicom, strip_dicom
from .dicom_series import decode_series, prepare_series
from .generic import GenericDomain, GenericOptions
from .nifti import decode_nifti, nifti_facts, strip_nifti
from .volume_views import NiftiSlices, as_volume
from .windowing import PRESETS, Window, WindowChoice, apply_window

__all__ = ["PRESETS", "Window", "WindowChoice", "apply_window", "NiftiSlices", "MedicalOptions", "MedicalDomain"]


class MedicalOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    window: WindowChoice | list[WindowChoice] = "file"
    """``file`` (the DICOM's own VOI window; NIfTI cal_min/cal_max; else 0.5-99.5 percentiles), ``minmax``, a preset
    name, ``{center, width}``, or a list of these stacked as channels (e.g. [lung, mediastinum, bone])."""
    frame: Literal["middle"] | int = "middle"
    max_pixels: int = Field(64_000_000, ge=1, description="DICOM rows x columns x frames x samples, or PNG/JPEG/WebP/BMP width x height "
                                                           "x frames (.npy: elements), allowed; checked from the header")
    max_slices: int = Field(2048, ge=1, description="files allowed in one DICOM series item (a list of files or a folder)")
    max_nifti_bytes: int = Field(1 << 31, ge=1, description="decompressed NIfTI size allowed, checked from the header")
    nifti: NiftiSlices = Field(default_factory=NiftiSlices)
    """Which views of a volume become images: of a NIfTI, and of a DICOM series (slices along axis 2, in position order)."""
    phi_allow: list[str] = Field(default_factory=list, description="extra DICOM keywords allowed into shards")

    @model_validator(mode="after")
    def _one_stacking(self) -> "MedicalOptions":
        if isinstance(self.window, list) and self.nifti.mode == "neighbours":
            raise ValueError("stack either windows (window: [...]) or neighbouring slices (nifti.mode: neighbours), not both")
        return self

    @property
    def windows(self) -> list[WindowChoice]:
        return self.window if isinstance(self.window, list) else [self.window]


class MedicalDomain:
    name = "medical"
    output = "unit"

    def __init__(self, options: MedicalOptions, encoder_info: object = None) -> None:
        self.options = options
        self.generic = GenericDomain(GenericOptions(max_pixels=options.max_pixels))  # one cap for every file type of the domain

    def media_types(self) -> list[str]:
        return sorted({"dcm", "dcm.tar", "nii", "nii.gz", *self.generic.media_types()})

    @property
    def volume_depth(self) -> int | None:
        """Slices in every item (``nifti.mode: volume``), or None when items are 2-D images."""
        return self.options.nifti.volume_depth

    def decode(self, name: str, data: bytes) -> list[np.ndarray]:
        kind = media_type(name)
        if kind == "dcm.tar":  # a series given as a list of files or a folder (a bundle); volume mode gives one stack
            return decode_series(name, data, self.options)
        if kind in ("nii", "nii.gz"):
            return decode_nifti(name, data, kind == "nii.gz", self.options)
        images = [decode_dicom(name, data, self.options)] if kind == "dcm" else self.generic.decode(name, data)
        if self.volume_depth is not None:  # a 2-D image is a one-slice volume, resampled to the same depth as the rest
            return [as_volume(image, self.volume_depth) for image in images]
        return images

    def describe_for_shard(self, name: str, stored: bytes) -> dict[str, Any] | None:
        """A NIfTI's stored voxel order (``LAS``: axis 0 towards the left, ...) and voxel size, recorded in the sample's
        metadata: decoding reorients to RAS+, so the file's own order would otherwise be known only from its affine."""
        kind = media_type(name)
        if kind not in ("nii", "nii.gz"):
            return None
        return nifti_facts(name, stored, kind == "nii.gz")

    def prepare_for_shard(self, name: str, data: bytes) -> bytes:
        kind = media_type(name)
        if kind == "dcm":
            return strip_dicom(name, data, self.options)
        if kind == "dcm.tar":
            return prepare_series(name, data, self.options)
        if kind in ("nii", "nii.gz"):
            return strip_nifti(name, data, kind == "nii.gz", self.options.max_nifti_bytes)
        return self.generic.prepare_for_shard(name, data)
