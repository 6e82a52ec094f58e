"""DICOM decoding (modality LUT to HU, VOI windowing, MONOCHROME1, multi-frame) and the identity-free copy for shards.

Privacy: no DICOM header value is ever logged or written by mmdomain. Shards hold a DICOM rebuilt from an
allow-list of pixel-describing attributes (plus ``phi_allow``), so names, IDs, dates, UIDs and private tags never
reach them. Burned-in text inside the pixels is out of reach of any header rule and remains the data owner's concern.
"""
from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np

from .base import PIXELS_FIX, DecodeError, guarded
from .windowing import apply_window

if TYPE_CHECKING:
    from .medical import MedicalOptions

# Attributes a decoder needs and that identify nobody. Everything else is dropped from shards.
PIXEL_KEYWORDS = (
    "SOPClassUID", "Modality", "SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated",
    "BitsStored", "HighBit", "PixelRepresentation", "PlanarConfiguration", "NumberOfFrames", "PixelSpacing",
    "SliceThickness", "RescaleSlope", "RescaleIntercept", "RescaleType", "ModalityLUTSequence", "WindowCenter",
    "WindowWidth", "VOILUTFunction", "VOILUTSequence", "RedPaletteColorLookupTableDescriptor",
    "GreenPaletteColorLookupTableDescriptor", "BluePaletteColorLookupTableDescriptor", "RedPaletteColorLookupTableData",
    "GreenPaletteColorLookupTableData", "BluePaletteColorLookupTableData", "PixelPaddingValue", "PixelData",
    "FloatPixelData", "DoubleFloatPixelData",
)
CODEC_HINT = "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle (or: pip install 'mmdomain[dicom-codecs]')"


def _first(value: object) -> float:
    return float(value[0]) if hasattr(value, "__len__") and not isinstance(value, str) else float(value)


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


def decode_dicom(name: str, data: bytes, options: "MedicalOptions") -> np.ndarray:
    """One DICOM -> an ``[H, W]`` (or ``[H, W, C]`` for stacked windows or colour) float32 image in [0, 1]."""
    from pydicom import dcmread
    from pydicom.pixels import apply_modality_lut

    dicom_header(name, data, options.max_pixels)
    ds = guarded(name, lambda d: dcmread(io.BytesIO(d)), data)
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - pydicom raises RuntimeError/NotImplementedError for missing codecs
        what = f"{syntax.name} ({syntax})" if syntax is not None else "unknown transfer syntax"
        raise DecodeError(f"member {name!r}: pixel data in {what} cannot be decoded here ({type(exc).__name__}); {CODEC_HINT}") from None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        index = frames // 2 if options.frame == "middle" else options.frame
        if not 0 <= index < frames:
            raise DecodeError(f"member {name!r}: frame {index} out of range (the file has {frames})")
        pixels = pixels[index]
    if int(ds.get("SamplesPerPixel", 1) or 1) > 1:  # colour (RGB after pydicom's YBR conversion)
        return (pixels.astype(np.float32) / float((1 << int(ds.BitsStored)) - 1)).clip(0, 1)
    values = apply_modality_lut(pixels, ds).astype(np.float32)  # stored values -> HU (or the modality's units)
    file_window = None
    if "WindowCenter" in ds and "WindowWidth" in ds:
        file_window = (_first(ds.WindowCenter), _first(ds.WindowWidth))
    channels = [apply_window(values, w, file_window) for w in options.windows]
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":  # low values are bright: invert after windowing
        channels = [1.0 - c for c in channels]
    return channels[0] if len(channels) == 1 else np.stack(channels, axis=-1)


def strip_dicom(name: str, data: bytes, options: "MedicalOptions") -> bytes:
    """The file rebuilt from ``PIXEL_KEYWORDS`` (plus ``options.phi_allow``) under a fresh, meaningless instance UID."""
    from pydicom import dcmread
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import generate_uid

    dicom_header(name, data, options.max_pixels)
    source = guarded(name, lambda d: dcmread(io.BytesIO(d)), data)
    kept = Dataset()
    for keyword in (*PIXEL_KEYWORDS, *options.phi_allow):
        if keyword in source:
            kept[keyword] = source[keyword]
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
