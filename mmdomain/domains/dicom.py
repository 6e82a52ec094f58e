"""DICOM decoding (modality LUT to HU, VOI LUT/window, MONOCHROME1, palette colour, multi-frame) and the identity-free
copy for shards. The display chain is pydicom's (apply_modality_lut, apply_voi_lut, apply_color_lut), fed the
attributes of the chosen frame (``dicom_attributes.frame_view``: enhanced objects keep them in functional groups).

Privacy: no DICOM header value is ever logged or written by mmdomain. Shards hold a DICOM rebuilt from an
allow-list of pixel-describing attributes (``dicom_attributes``, plus ``phi_allow``), so names, IDs, dates, UIDs and
private tags never reach them. Burned-in text inside the pixels is out of reach of any header rule and remains the
data owner's concern.
"""
from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np

from .base import PIXELS_FIX, DecodeError, guarded
from .dicom_attributes import PIXEL_KEYWORDS, allowed_copy, frame_view
from .windowing import apply_window

if TYPE_CHECKING:
    from .medical import MedicalOptions

CODEC_HINT = "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle (or: pip install 'mmdomain[dicom-codecs]')"


def dicom_header(name: str, data: bytes, max_pixels: int):
    """The header without pixels, refused before decoding when it declares more than ``max_pixels``."""
    from pydicom import dcmread

    head = guarded(name, lambda d: dcmread(io.BytesIO(d), stop_before_pixels=True), data)
    rows, cols = int(head.get("Rows", 0) or 0), int(head.get("Columns", 0) or 0)
    frames, samples = int(head.get("NumberOfFrames", 1) or 1), int(head.get("SamplesPerPixel", 1) or 1)
    if rows * cols * frames * samples > max_pixels:
        raise DecodeError(
            f"member {name!r}: {rows} x {cols} x {frames} frames x {samples} samples exceeds max_pixels="
            f"{max_pixels}; rejected before decoding; {PIXELS_FIX}"
        )
    if not rows or not cols:
        raise DecodeError(f"member {name!r}: DICOM without Rows/Columns has no image to decode")
    return head


def read_pixels(name: str, data: bytes, max_pixels: int):
    """The dataset and its stored pixel array (all frames), after the header's size check."""
    from pydicom import dcmread

    dicom_header(name, data, max_pixels)
    ds = guarded(name, lambda d: dcmread(io.BytesIO(d)), data)
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - pydicom raises RuntimeError/NotImplementedError for missing codecs
        what = f"{syntax.name} ({syntax})" if syntax is not None else "unknown transfer syntax"
        raise DecodeError(f"member {name!r}: pixel data in {what} cannot be decoded here ({type(exc).__name__}); {CODEC_HINT}") from None
    return ds, pixels


def modality_values(name: str, pixels: np.ndarray, view) -> np.ndarray:
    """Stored values -> HU (or the modality's units) with the frame's Modality LUT or rescale, via pydicom."""
    from pydicom.pixels import apply_modality_lut

    return guarded(name, lambda p: apply_modality_lut(p, view), pixels).astype(np.float64)


def _pydicom_voi(name: str, values: np.ndarray, view) -> np.ndarray:
    from pydicom.pixels import apply_voi_lut

    try:
        return apply_voi_lut(values, view)
    except Exception as exc:  # noqa: BLE001 - pydicom's messages can quote header values, so only the type is named
        raise DecodeError(f"member {name!r}: the file's own VOI LUT or window is invalid ({type(exc).__name__}); set window to a preset "
                          f"or {{center, width}} instead of file") from None


def file_voi(name: str, values: np.ndarray, view) -> np.ndarray | None:
    """The file's own VOI (VOI LUT Sequence, else window with its VOI LUT Function: LINEAR, LINEAR_EXACT, SIGMOID)
    applied by pydicom and scaled to [0, 1]; None when the file carries neither."""
    lut = (view.get("VOILUTSequence") or [None])[0]
    if lut is not None and lut.get("LUTDescriptor") is not None and lut.get("LUTData") is not None:  # pydicom's own test of a usable LUT
        # LUT inputs are integers: the floor is what pydicom's own truncation of (value - first mapped) does, minus its float warning.
        shown = _pydicom_voi(name, np.floor(values).astype(np.int64), view)
        top = float((1 << int(lut.LUTDescriptor[2])) - 1)  # the LUT's output range is 0 .. 2^bits - 1
        return np.clip(shown / top, 0, 1).astype(np.float32)
    if "WindowCenter" not in view or "WindowWidth" not in view:
        return None
    shown = _pydicom_voi(name, values, view)
    # pydicom's output range depends on bits, sign and rescale; ask it for the images of -inf and +inf rather than restate its rule.
    low, high = _pydicom_voi(name, np.array([-np.inf, np.inf]), view)
    return np.clip((shown - low) / max(high - low, 1e-12), 0, 1).astype(np.float32)


def grey_display(name: str, values: np.ndarray, view, windows: list) -> np.ndarray:
    """Modality values -> one [0, 1] channel per window; ``file`` is the file's own VOI (else 0.5-99.5 percentiles)."""
    channels = []
    for window in windows:
        shown = file_voi(name, values, view) if window == "file" else None
        channels.append(shown if shown is not None else apply_window(values.astype(np.float32), window, None))
    if view.get("PhotometricInterpretation") == "MONOCHROME1":  # low values are bright: invert after windowing
        channels = [1.0 - c for c in channels]
    return channels[0] if len(channels) == 1 else np.stack(channels, axis=-1)


def decode_dicom(name: str, data: bytes, options: "MedicalOptions") -> np.ndarray:
    """One DICOM -> an ``[H, W]`` (or ``[H, W, C]`` for stacked windows or colour) float32 image in [0, 1]."""
    from pydicom.pixels import apply_color_lut

    ds, pixels = read_pixels(name, data, options.max_pixels)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    index = 0
    if frames > 1:
        index = frames // 2 if options.frame == "middle" else options.frame
        if not 0 <= index < frames:
            raise DecodeError(f"member {name!r}: frame {index} out of range (the file has {frames})")
        pixels = pixels[index]
    if ds.get("PhotometricInterpretation") == "PALETTE COLOR":  # stored indices into the file's colour tables
        rgb = guarded(name, lambda p: apply_color_lut(p, ds), pixels)[..., :3]
        return (rgb.astype(np.float32) / float(np.iinfo(rgb.dtype).max)).clip(0, 1)
    if int(ds.get("SamplesPerPixel", 1) or 1) > 1:  # colour (RGB after pydicom's YBR conversion)
        return (pixels.astype(np.float32) / float((1 << int(ds.BitsStored)) - 1)).clip(0, 1)
    view = frame_view(ds, index)
    return grey_display(name, modality_values(name, pixels, view), view, options.windows)


def strip_dicom(name: str, data: bytes, options: "MedicalOptions") -> bytes:
    """The file rebuilt from ``PIXEL_KEYWORDS`` (plus ``options.phi_allow``) under a fresh, meaningless instance UID;
    functional groups keep only their pixel-describing sub-sequences (see ``dicom_attributes``)."""
    from pydicom import dcmread
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import generate_uid

    dicom_header(name, data, options.max_pixels)
    source = guarded(name, lambda d: dcmread(io.BytesIO(d)), data)
    kept = allowed_copy(source, (*PIXEL_KEYWORDS, *options.phi_allow))
    # A fresh instance UID: the original links back to the study, the new one to nothing.
    kept.SOPInstanceUID = generate_uid()
    kept.SOPClassUID = source.get("SOPClassUID", "1.2.840.10008.5.1.4.1.1.7")
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = source.file_meta.TransferSyntaxUID
    meta.MediaStorageSOPClassUID = kept.SOPClassUID
    meta.MediaStorageSOPInstanceUID = kept.SOPInstanceUID
    kept.file_meta = meta
    out = io.BytesIO()
    kept.save_as(out, enforce_file_format=True)
    return out.getvalue()
