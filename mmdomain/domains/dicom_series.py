"""A DICOM series as one media item: its files checked to be one series, ordered by position, stripped, and decoded
as an HU volume whose views (middle, index, even k, 2.5D neighbours) are chosen by the same ``nifti`` slice options.

make-shards hands the files over as a bundle (``bundle.py``, media type ``dcm.tar``). ``prepare_series`` stores them
re-packed in slice order under anonymous names (``000000.dcm``, ...), each stripped like a single DICOM (geometry kept),
so ``decode_series`` reads slices in stored order.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from .base import PIXELS_FIX, DecodeError
from .bundle import pack_bundle, unpack_bundle
from .dicom import dicom_header, file_voi, modality_values, read_pixels, strip_dicom
from .dicom_attributes import frame_view
from .volume_views import slice_views
from .windowing import Window

if TYPE_CHECKING:
    from .medical import MedicalOptions

# Two slices closer than this along the normal (mm) sit at the same place: a repeated file or two series mixed.
SAME_POSITION_MM = 1e-3
# apply_window maps [0, 1] onto itself through this window: used for a volume the file's own VOI already displayed.
UNCHANGED = Window(center=1.0, width=2.0)


def _in_file(name: str, member: str, call: Callable[..., Any], *args: Any) -> Any:
    """``call`` on one file of the bundle; its error names the bundle and the file."""
    try:
        return call(member, *args)
    except DecodeError as exc:
        raise DecodeError(f"member {name!r}: file {str(exc).removeprefix('member ')}") from None


def check_series(name: str, heads: list[tuple[str, Any]]) -> None:
    """Every file of the first file's series. Runs before stripping, which drops the SeriesInstanceUID; the error
    names the files, never the UIDs."""
    first, head = heads[0]
    for member, ds in heads:
        if ds.get("SeriesInstanceUID") is None:
            raise DecodeError(f"member {name!r}: file {member!r} has no SeriesInstanceUID, so it cannot be checked to belong to the series")
        if ds.SeriesInstanceUID != head.SeriesInstanceUID:
            raise DecodeError(f"member {name!r}: file {member!r} belongs to another series than {first!r} (SeriesInstanceUID "
                              "differs); one media item takes one series: split the list or folder")


def check_slices(name: str, heads: list[tuple[str, Any]], options: "MedicalOptions") -> None:
    """Every file a single-frame greyscale image of the first file's size, and the volume within ``max_pixels``."""
    first, head = heads[0]
    for member, ds in heads:
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise DecodeError(f"member {name!r}: file {member!r} is multi-frame (a volume by itself); give it as its own media item")
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1 or ds.get("PhotometricInterpretation") not in ("MONOCHROME1", "MONOCHROME2"):
            raise DecodeError(f"member {name!r}: file {member!r} is not a greyscale image; a series volume takes MONOCHROME1/2 slices")
        if (ds.Rows, ds.Columns) != (head.Rows, head.Columns) or ds.PhotometricInterpretation != head.PhotometricInterpretation:
            raise DecodeError(f"member {name!r}: file {member!r} differs from {first!r} in size or photometric interpretation; "
                              "a series volume needs equal slices")
    total = int(head.Rows) * int(head.Columns) * len(heads)
    if total > options.max_pixels:
        raise DecodeError(f"member {name!r}: {head.Rows} x {head.Columns} x {len(heads)} slices exceeds max_pixels="
                          f"{options.max_pixels}; rejected before decoding; {PIXELS_FIX}")


def slice_order(name: str, heads: list[tuple[str, Any]]) -> list[int]:
    """Indices of ``heads`` from first to last slice. The rule: by ImagePositionPatient projected on the normal of
    ImageOrientationPatient when every file has both; else by InstanceNumber when every file has one; else refused.
    Two files at one position (or with one instance number) are refused, naming both."""
    if all("ImagePositionPatient" in ds and "ImageOrientationPatient" in ds for _, ds in heads):
        orientation = np.asarray(heads[0][1].ImageOrientationPatient, dtype=np.float64)
        normal = np.cross(orientation[:3], orientation[3:])
        keys = [float(np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=np.float64))) for _, ds in heads]
        what = "position"
    elif all(ds.get("InstanceNumber") is not None for _, ds in heads):
        keys = [float(ds.InstanceNumber) for _, ds in heads]
        what = "instance number"
    else:
        no_position = next(m for m, ds in heads if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds)
        no_number = next(m for m, ds in heads if ds.get("InstanceNumber") is None)
        raise DecodeError(f"member {name!r}: the slices cannot be ordered: file {no_position!r} lacks ImagePositionPatient or "
                          f"ImageOrientationPatient, and file {no_number!r} lacks InstanceNumber")
    order = sorted(range(len(heads)), key=lambda i: keys[i])
    for a, b in zip(order, order[1:]):
        if keys[b] - keys[a] < SAME_POSITION_MM:
            raise DecodeError(f"member {name!r}: files {heads[a][0]!r} and {heads[b][0]!r} have the same slice {what}; "
                              "remove the repeated file (or split two series)")
    return order


def prepare_series(name: str, data: bytes, options: "MedicalOptions") -> bytes:
    """The series checked, ordered, each file stripped, and re-packed as ``000000.dcm``, ``000001.dcm``, ..."""
    parts = unpack_bundle(name, data, max_members=options.max_slices)
    heads = [(member, _in_file(name, member, dicom_header, raw, options.max_pixels)) for member, raw in parts]
    check_series(name, heads)
    check_slices(name, heads, options)
    order = slice_order(name, heads)
    return pack_bundle([(f"{rank:06d}.dcm", _in_file(name, parts[i][0], strip_dicom, parts[i][1], options))
                        for rank, i in enumerate(order)])


def decode_series(name: str, data: bytes, options: "MedicalOptions") -> list[np.ndarray]:
    """A stored series -> the views ``options.nifti`` asks for of its ``[rows, cols, slices]`` modality volume, one
    [0, 1] channel per window (``file``: the middle slice's VOI LUT or window, applied by pydicom to the volume)."""
    parts = unpack_bundle(name, data, max_members=options.max_slices)
    heads = [(member, _in_file(name, member, dicom_header, raw, options.max_pixels)) for member, raw in parts]
    check_slices(name, heads, options)
    slices, views = [], []
    for member, raw in parts:
        ds, pixels = _in_file(name, member, read_pixels, raw, options.max_pixels)
        views.append(frame_view(ds, 0))
        slices.append(_in_file(name, member, modality_values, pixels, views[-1]).astype(np.float32))  # exact for HU; half of float64
    volume = np.stack(slices, axis=2)
    middle = views[len(views) // 2]
    per_window = []
    for window in options.windows:
        shown = file_voi(name, volume, middle) if window == "file" else None
        if shown is not None:
            per_window.append(slice_views(name, shown, options.nifti, [UNCHANGED], None))
        else:
            per_window.append(slice_views(name, volume, options.nifti, [window], None))
    images = [channels[0] if len(channels) == 1 else np.stack(channels, axis=-1) for channels in zip(*per_window)]
    if middle.get("PhotometricInterpretation") == "MONOCHROME1":  # low values are bright: invert after windowing
        images = [1.0 - image for image in images]
    return images

