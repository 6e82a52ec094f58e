"""NIfTI-1/2 decoding (size checked from the header before decompressing, scl_slope applied) and the copy for shards.

Shards keep the voxels and the geometry; the free-text ``descrip``/``aux_file`` fields and header extensions,
which can hold anything a scanner or a person wrote, are dropped.
"""
from __future__ import annotations

import gzip
import io
from typing import TYPE_CHECKING

import numpy as np

from .base import DecodeError, guarded
from .volume_views import slice_views

if TYPE_CHECKING:
    from .medical import MedicalOptions


def nifti_header_class(name: str, head: bytes):
    import nibabel as nib

    size = int.from_bytes(head[:4], "little")
    if size not in (348, 540):
        size = int.from_bytes(head[:4], "big")
    if size == 348:
        return nib.Nifti1Header
    if size == 540:
        return nib.Nifti2Header
    raise DecodeError(f"member {name!r}: not a NIfTI-1/2 file (header size {size})")


def decode_nifti(name: str, data: bytes, compressed: bool, options: "MedicalOptions") -> list[np.ndarray]:
    """One NIfTI -> the images ``options.nifti`` asks for, windowed to [0, 1]."""
    import nibabel as nib

    raw = data
    if compressed:
        head = guarded(name, lambda d: gzip.GzipFile(fileobj=io.BytesIO(d)).read(540), data)
        header_cls = nifti_header_class(name, head)
        header = guarded(name, lambda h: header_cls.from_fileobj(io.BytesIO(h)), head)
        expected = int(header.get_data_offset()) + int(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize
        if expected > options.max_nifti_bytes:
            raise DecodeError(f"member {name!r}: volume of {expected} bytes exceeds max_nifti_bytes={options.max_nifti_bytes}; rejected before decompressing")
        raw = guarded(name, lambda d: gzip.GzipFile(fileobj=io.BytesIO(d)).read(options.max_nifti_bytes + 1), data)
        if len(raw) > options.max_nifti_bytes:
            raise DecodeError(f"member {name!r}: decompresses past max_nifti_bytes={options.max_nifti_bytes} (its header understates it)")
    image_cls = nib.Nifti2Image if nifti_header_class(name, raw[:4]) is nib.Nifti2Header else nib.Nifti1Image
    img = guarded(name, image_cls.from_bytes, raw)
    volume = np.asarray(img.dataobj, dtype=np.float32)  # applies scl_slope / scl_inter
    while volume.ndim > 3:
        volume = volume[..., 0]  # first time point / component
    if volume.ndim == 2:
        volume = volume[..., None]
    cal = (float(img.header["cal_min"]), float(img.header["cal_max"]))
    file_window = ((cal[0] + cal[1]) / 2, cal[1] - cal[0]) if cal[1] > cal[0] else None
    return slice_views(name, volume, options.nifti, options.windows, file_window)


def strip_nifti(name: str, data: bytes, compressed: bool) -> bytes:
    import nibabel as nib

    raw = gzip.decompress(data) if compressed else data
    image_cls = nib.Nifti2Image if nifti_header_class(name, raw[:4]) is nib.Nifti2Header else nib.Nifti1Image
    img = guarded(name, image_cls.from_bytes, raw)
    img.header["descrip"] = b""
    img.header["aux_file"] = b""
    img.header.extensions.clear()
    out = img.to_bytes()
    return gzip.compress(out, mtime=0) if compressed else out
