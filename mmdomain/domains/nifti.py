"""NIfTI-1/2 decoding (size checked from the header before decompressing, scl_slope applied, reoriented to RAS+)
and the copy for shards.

Shards keep the voxels and the geometry (the affine, so the stored orientation travels with the file); the free-text
``descrip``/``aux_file`` fields and header extensions, which can hold anything a scanner or a person wrote, are dropped.
"""
from __future__ import annotations

import gzip
import io
from typing import TYPE_CHECKING, Any

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


def fixed_header(name: str, head: bytes):
    """The fixed 348/540-byte header alone. Header extensions (any length, between the header and the voxels) are not
    parsed here: only the fixed part says how large the volume is."""
    header_cls = nifti_header_class(name, head)
    size = header_cls.template_dtype.itemsize
    if len(head) < size:
        raise DecodeError(f"member {name!r}: NIfTI file ends inside its {size}-byte header ({len(head)} bytes)")
    return guarded(name, lambda h: header_cls(h[:size]), head)


def read_nifti(name: str, data: bytes, compressed: bool, max_bytes: int):
    """The nibabel image of one NIfTI file; a ``.nii.gz`` is refused before decompressing when its header declares
    more than ``max_bytes``, and while decompressing when it holds more than its header says."""
    import nibabel as nib

    raw = data
    if compressed:
        head = guarded(name, lambda d: gzip.GzipFile(fileobj=io.BytesIO(d)).read(540), data)
        header = fixed_header(name, head)
        expected = int(header.get_data_offset()) + int(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize
        if expected > max_bytes:
            raise DecodeError(f"member {name!r}: volume of {expected} bytes exceeds max_nifti_bytes={max_bytes}; rejected before decompressing")
        raw = guarded(name, lambda d: gzip.GzipFile(fileobj=io.BytesIO(d)).read(max_bytes + 1), data)
        if len(raw) > max_bytes:
            raise DecodeError(f"member {name!r}: decompresses past max_nifti_bytes={max_bytes} (its header understates it)")
    image_cls = nib.Nifti2Image if nifti_header_class(name, raw[:4]) is nib.Nifti2Header else nib.Nifti1Image
    return guarded(name, image_cls.from_bytes, raw)


def canonical(name: str, img):
    """``img`` with its voxels reordered and flipped to RAS+ (axis 0 towards the patient's right, 1 anterior, 2 superior)
    by nibabel's ``as_closest_canonical``, so a side in a report is the same side of the array whatever order the file
    stored. An affine that names no orientation (a zero column) is refused with the way out."""
    import nibabel as nib

    try:
        return nib.as_closest_canonical(img)
    except Exception as exc:  # noqa: BLE001 - nibabel raises several kinds for degenerate affines
        raise DecodeError(f"member {name!r}: its affine gives no orientation to reorient by ({type(exc).__name__}); fix the file's "
                          "qform/sform, or set the domain option nifti.orientation: as_stored to use the voxels as stored") from None


def decode_nifti(name: str, data: bytes, compressed: bool, options: "MedicalOptions") -> list[np.ndarray]:
    """One NIfTI -> the images ``options.nifti`` asks for, windowed to [0, 1]."""
    img = read_nifti(name, data, compressed, options.max_nifti_bytes)
    if options.nifti.orientation == "canonical":
        img = canonical(name, img)
    volume = np.asarray(img.dataobj, dtype=np.float32)  # applies scl_slope / scl_inter
    while volume.ndim > 3:
        volume = volume[..., 0]  # first time point / component
    if volume.ndim == 2:
        volume = volume[..., None]
    cal = (float(img.header["cal_min"]), float(img.header["cal_max"]))
    file_window = ((cal[0] + cal[1]) / 2, cal[1] - cal[0]) if cal[1] > cal[0] else None
    return slice_views(name, volume, options.nifti, options.windows, file_window)


def nifti_facts(name: str, data: bytes, compressed: bool) -> dict[str, Any]:
    """The stored voxel order as axis codes (nibabel's ``aff2axcodes``: ``RAS``, ``LAS``, ...) and the voxel size in mm,
    from the fixed header alone (the affine and voxel sizes live there), so the voxels are not decompressed again."""
    import nibabel as nib

    head = guarded(name, lambda d: gzip.GzipFile(fileobj=io.BytesIO(d)).read(540), data) if compressed else data[:540]
    header = fixed_header(name, head)
    codes = nib.aff2axcodes(header.get_best_affine())
    return {"orientation": "".join(c or "?" for c in codes), "voxel_mm": [round(float(z), 4) for z in header.get_zooms()[:3]]}


def strip_nifti(name: str, data: bytes, compressed: bool, max_bytes: int) -> bytes:
    """The file without free text or extensions; voxels, geometry and stored orientation unchanged."""
    img = read_nifti(name, data, compressed, max_bytes)
    img.header["descrip"] = b""
    img.header["aux_file"] = b""
    img.header.extensions.clear()
    out = img.to_bytes()
    return gzip.compress(out, mtime=0) if compressed else out
