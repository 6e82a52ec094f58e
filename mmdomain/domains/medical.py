"""Medical media: DICOM (modality LUT to HU, VOI windowing, MONOCHROME1, multi-frame) and NIfTI slices, plus PNG/JPEG.

Privacy: no DICOM header value is ever logged or written by mmdomain. make-shards stores a DICOM rebuilt from
an allow-list of pixel-describing attributes (plus ``phi_allow``), so names, IDs, dates, UIDs and private tags
never reach the shards; NIfTI files lose their free-text ``descrip``/``aux_file`` fields and header extensions.
Burned-in text inside the pixels is out of reach of any header rule and remains the data owner's concern.
"""
from __future__ import annotations

import gzip
import io
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .base import PIXELS_FIX, DecodeError, guarded, media_type
from .generic import GenericDomain, GenericOptions

# Window presets (center, width) in Hounsfield units.
PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "soft_tissue": (40.0, 400.0),
}

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


class Window(BaseModel):
    model_config = ConfigDict(extra="forbid")
    center: float
    width: float = Field(gt=0)


WindowChoice = Literal["file", "minmax", "lung", "mediastinum", "bone", "brain", "soft_tissue"] | Window


class NiftiSlices(BaseModel):
    """Which 2-D slices of a volume become images: ``middle``, ``index``, ``even`` (``count`` evenly spaced slices,
    each its own media item) or ``neighbours`` (2.5D: slices ``index ± neighbours`` stacked as channels)."""

    model_config = ConfigDict(extra="forbid")
    axis: int = Field(2, ge=0, le=2)
    mode: Literal["middle", "index", "even", "neighbours"] = "middle"
    index: int | None = None
    count: int = Field(3, ge=1)
    neighbours: int = Field(1, ge=1)


class MedicalOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    window: WindowChoice | list[WindowChoice] = "file"
    """``file`` (the DICOM's own VOI window; NIfTI cal_min/cal_max; else 0.5-99.5 percentiles), ``minmax``, a preset
    name, ``{center, width}``, or a list of these stacked as channels (e.g. [lung, mediastinum, bone])."""
    frame: Literal["middle"] | int = "middle"
    max_pixels: int = Field(64_000_000, ge=1, description="DICOM rows x columns x frames x samples, or PNG/JPEG/WebP/BMP width x height "
                                                           "x frames (.npy: elements), allowed; checked from the header")
    max_nifti_bytes: int = Field(1 << 31, ge=1, description="decompressed NIfTI size allowed, checked from the header")
    nifti: NiftiSlices = Field(default_factory=NiftiSlices)
    phi_allow: list[str] = Field(default_factory=list, description="extra DICOM keywords allowed into shards")

    @model_validator(mode="after")
    def _one_stacking(self) -> "MedicalOptions":
        if isinstance(self.window, list) and self.nifti.mode == "neighbours":
            raise ValueError("stack either windows (window: [...]) or neighbouring slices (nifti.mode: neighbours), not both")
        return self

    @property
    def windows(self) -> list[WindowChoice]:
        return self.window if isinstance(self.window, list) else [self.window]


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


def _first(value: object) -> float:
    return float(value[0]) if hasattr(value, "__len__") and not isinstance(value, str) else float(value)


class MedicalDomain:
    name = "medical"
    output = "unit"

    def __init__(self, options: MedicalOptions, encoder_info: object = None) -> None:
        self.options = options
        self.generic = GenericDomain(GenericOptions(max_pixels=options.max_pixels))  # one cap for every file type of the domain

    def media_types(self) -> list[str]:
        return sorted({"dcm", "nii", "nii.gz", *self.generic.media_types()})

    # -- decoding -----------------------------------------------------------------------------------------------

    def decode(self, name: str, data: bytes) -> list[np.ndarray]:
        kind = media_type(name)
        if kind == "dcm":
            return [self._dicom(name, data)]
        if kind in ("nii", "nii.gz"):
            return self._nifti(name, data, kind == "nii.gz")
        return self.generic.decode(name, data)

    def _dicom_header(self, name: str, data: bytes):
        from pydicom import dcmread

        head = guarded(name, lambda d: dcmread(io.BytesIO(d), stop_before_pixels=True), data)
        rows, cols = int(head.get("Rows", 0) or 0), int(head.get("Columns", 0) or 0)
        frames, samples = int(head.get("NumberOfFrames", 1) or 1), int(head.get("SamplesPerPixel", 1) or 1)
        if rows * cols * frames * samples > self.options.max_pixels:
            raise DecodeError(
                f"member {name!r}: {rows} x {cols} x {frames} frames x {samples} samples exceeds max_pixels="
                f"{self.options.max_pixels}; rejected before decoding; {PIXELS_FIX}"
            )
        if not rows or not cols:
            raise DecodeError(f"member {name!r}: DICOM without Rows/Columns has no image to decode")
        return head

    def _dicom(self, name: str, data: bytes) -> np.ndarray:
        from pydicom import dcmread
        from pydicom.pixels import apply_modality_lut

        self._dicom_header(name, data)
        ds = guarded(name, lambda d: dcmread(io.BytesIO(d)), data)
        syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        try:
            pixels = ds.pixel_array
        except Exception as exc:  # noqa: BLE001 - pydicom raises RuntimeError/NotImplementedError for missing codecs
            what = f"{syntax.name} ({syntax})" if syntax is not None else "unknown transfer syntax"
            raise DecodeError(f"member {name!r}: pixel data in {what} cannot be decoded here ({type(exc).__name__}); {CODEC_HINT}") from None
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames > 1:
            index = frames // 2 if self.options.frame == "middle" else self.options.frame
            if not 0 <= index < frames:
                raise DecodeError(f"member {name!r}: frame {index} out of range (the file has {frames})")
            pixels = pixels[index]
        if int(ds.get("SamplesPerPixel", 1) or 1) > 1:  # colour (RGB after pydicom's YBR conversion)
            return (pixels.astype(np.float32) / float((1 << int(ds.BitsStored)) - 1)).clip(0, 1)
        values = apply_modality_lut(pixels, ds).astype(np.float32)  # stored values -> HU (or the modality's units)
        file_window = None
        if "WindowCenter" in ds and "WindowWidth" in ds:
            file_window = (_first(ds.WindowCenter), _first(ds.WindowWidth))
        channels = [apply_window(values, w, file_window) for w in self.options.windows]
        if ds.get("PhotometricInterpretation") == "MONOCHROME1":  # low values are bright: invert after windowing
            channels = [1.0 - c for c in channels]
        return channels[0] if len(channels) == 1 else np.stack(channels, axis=-1)

    def _nifti(self, name: str, data: bytes, compressed: bool) -> list[np.ndarray]:
        import nibabel as nib

        raw = data
        if compressed:
            head = guarded(name, lambda d: gzip.GzipFile(fileobj=io.BytesIO(d)).read(540), data)
            header_cls = self._nifti_header_class(name, head)
            header = guarded(name, lambda h: header_cls.from_fileobj(io.BytesIO(h)), head)
            expected = int(header.get_data_offset()) + int(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize
            if expected > self.options.max_nifti_bytes:
                raise DecodeError(f"member {name!r}: volume of {expected} bytes exceeds max_nifti_bytes={self.options.max_nifti_bytes}; rejected before decompressing")
            raw = guarded(name, lambda d: gzip.GzipFile(fileobj=io.BytesIO(d)).read(self.options.max_nifti_bytes + 1), data)
            if len(raw) > self.options.max_nifti_bytes:
                raise DecodeError(f"member {name!r}: decompresses past max_nifti_bytes={self.options.max_nifti_bytes} (its header understates it)")
        image_cls = nib.Nifti2Image if self._nifti_header_class(name, raw[:4]) is nib.Nifti2Header else nib.Nifti1Image
        img = guarded(name, image_cls.from_bytes, raw)
        volume = np.asarray(img.dataobj, dtype=np.float32)  # applies scl_slope / scl_inter
        while volume.ndim > 3:
            volume = volume[..., 0]  # first time point / component
        if volume.ndim == 2:
            volume = volume[..., None]
        cal = (float(img.header["cal_min"]), float(img.header["cal_max"]))
        file_window = ((cal[0] + cal[1]) / 2, cal[1] - cal[0]) if cal[1] > cal[0] else None
        return [self._window_slice(s, file_window) for s in self._slices(name, volume)]

    @staticmethod
    def _nifti_header_class(name: str, head: bytes):
        import nibabel as nib

        size = int.from_bytes(head[:4], "little")
        if size not in (348, 540):
            size = int.from_bytes(head[:4], "big")
        if size == 348:
            return nib.Nifti1Header
        if size == 540:
            return nib.Nifti2Header
        raise DecodeError(f"member {name!r}: not a NIfTI-1/2 file (header size {size})")

    def _slices(self, name: str, volume: np.ndarray) -> list[np.ndarray]:
        spec = self.options.nifti
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

    def _window_slice(self, image: np.ndarray, file_window: tuple[float, float] | None) -> np.ndarray:
        if image.ndim == 3:  # neighbour stack: one window for all channels
            return apply_window(image, self.options.windows[0], file_window)
        channels = [apply_window(image, w, file_window) for w in self.options.windows]
        return channels[0] if len(channels) == 1 else np.stack(channels, axis=-1)

    # -- shards -------------------------------------------------------------------------------------------------

    def prepare_for_shard(self, name: str, data: bytes) -> bytes:
        kind = media_type(name)
        if kind == "dcm":
            return self._strip_dicom(name, data)
        if kind in ("nii", "nii.gz"):
            return self._strip_nifti(name, data, kind == "nii.gz")
        return self.generic.prepare_for_shard(name, data)

    def _strip_dicom(self, name: str, data: bytes) -> bytes:
        from pydicom import dcmread
        from pydicom.dataset import Dataset, FileMetaDataset
        from pydicom.uid import generate_uid

        self._dicom_header(name, data)
        source = guarded(name, lambda d: dcmread(io.BytesIO(d)), data)
        kept = Dataset()
        for keyword in (*PIXEL_KEYWORDS, *self.options.phi_allow):
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

    def _strip_nifti(self, name: str, data: bytes, compressed: bool) -> bytes:
        import nibabel as nib

        raw = gzip.decompress(data) if compressed else data
        image_cls = nib.Nifti2Image if self._nifti_header_class(name, raw[:4]) is nib.Nifti2Header else nib.Nifti1Image
        img = guarded(name, image_cls.from_bytes, raw)
        img.header["descrip"] = b""
        img.header["aux_file"] = b""
        img.header.extensions.clear()
        out = img.to_bytes()
        return gzip.compress(out, mtime=0) if compressed else out
