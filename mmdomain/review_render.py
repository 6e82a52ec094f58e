"""Media as the review page shows them, decoded by the run's own domain so the expert sees what the model sees: a
DICOM through the recipe's window (8-bit PNG of the windowed values), NIfTI or series slices likewise (a volume item as
a strip of its slices), a GeoTIFF as a composite of three chosen bands, audio as a WAV of the decoded waveform
(at the rate the encoder hears) with a spectrogram.

Only pixels and samples leave here: PNGs are written without text chunks and WAVs by the ``wave`` module from the
decoded samples, so no header value of the source file (a DICOM's patient attributes, an audio file's tags) can
reach the page.
"""
from __future__ import annotations

import io
import wave
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image

from .domains import media_type
from .domains.remote_sensing import TIFF_TYPES
from .review_store import ReviewError

MAX_STRIP_SLICES = 16


@dataclass(frozen=True)
class View:
    """One thing the page shows for a media member: an image (PNG) or a sound (WAV, with its spectrogram PNG)."""

    kind: Literal["image", "audio"]
    label: str
    png: bytes
    wav: bytes | None = None


def to_unit(array: np.ndarray) -> np.ndarray:
    """Values as [0, 1] floats: integer images scaled by their dtype (how the model's transform reads them), floats
    taken as unit values where they are, else stretched over their range (a ``.npy`` of other units)."""
    if np.issubdtype(array.dtype, np.integer):
        return array.astype(np.float32) / float(np.iinfo(array.dtype).max)
    values = np.asarray(array, np.float32)
    finite = values[np.isfinite(values)]
    if finite.size and (finite.min() < 0 or finite.max() > 1):
        lo, hi = float(finite.min()), float(finite.max())
        values = (values - lo) / max(hi - lo, 1e-12)
    return np.nan_to_num(values, nan=0.0).clip(0, 1)


def png_bytes(unit: np.ndarray, max_side: int = 2048) -> bytes:
    """A [0, 1] ``[H, W]`` or ``[H, W, 3]`` array as an 8-bit PNG (round to nearest level), shrunk to ``max_side``."""
    image = Image.fromarray(np.round(np.clip(unit, 0, 1) * 255).astype(np.uint8))
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="PNG")  # no pnginfo: no text chunks, only the pixels
    return out.getvalue()


def image_panels(item: np.ndarray, volume: bool) -> list[tuple[str, np.ndarray]]:
    """One decoded image item as (label, ``[H, W]`` or ``[H, W, 3]``) panels: colour or three stacked windows as
    RGB, other channel counts one grey panel each, a volume as a strip of its slices side by side."""
    unit = to_unit(item)
    if volume:  # [slices, H, W(, C)]: the slices side by side, parted by a thin white line
        picks = np.linspace(0, len(unit) - 1, min(len(unit), MAX_STRIP_SLICES)).round().astype(int)
        gap = np.ones_like(unit[0][:, :2])
        strip = np.concatenate([part for i in picks for part in (unit[i], gap)][:-1], axis=1)
        return [(f"{len(unit)} slices{', ' + label if label else ''}", panel) for label, panel in image_panels(strip, volume=False)]
    if unit.ndim == 2:
        return [("", unit)]
    if unit.shape[-1] == 1:
        return [("", unit[..., 0])]
    if unit.shape[-1] in (3, 4):
        return [("", unit[..., :3])]
    return [(f"channel {c + 1}", unit[..., c]) for c in range(unit.shape[-1])]


def composite(bands: np.ndarray, valid: np.ndarray, chosen: tuple[int, int, int]) -> np.ndarray:
    """Three of the selected bands as RGB, each stretched over its 2-98 percentiles of valid pixels (nodata black)."""
    out = np.zeros((*bands.shape[:2], 3), np.float32)
    for c, band in enumerate(chosen):
        if not 0 <= band < bands.shape[-1]:
            raise ReviewError(f"--composite names band position {band}, but the run selects {bands.shape[-1]} bands (positions 0.."
                              f"{bands.shape[-1] - 1}); give three positions among the run's bands, e.g. --composite 2,1,0")
        values = bands[..., band][valid[..., band]]
        lo, hi = np.percentile(values, [2, 98]) if values.size else (0.0, 1.0)
        out[..., c] = np.clip((bands[..., band] - lo) / max(hi - lo, 1e-6), 0, 1) * valid[..., band]
    return out


def default_composite(count: int) -> tuple[int, int, int]:
    """The first three selected bands (a composite run's own three, in its order); fewer bands repeat (one band: grey)."""
    return tuple(min(c, count - 1) for c in range(3))  # type: ignore[return-value]


def wav_bytes(waveform: np.ndarray, rate: int) -> bytes:
    """Mono 16-bit PCM WAV of samples in [-1, 1], written from the samples alone."""
    pcm = np.round(np.clip(waveform, -1, 1) * 32767).astype("<i2")
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(rate))
        w.writeframes(pcm.tobytes())
    return out.getvalue()


# A perceptually ordered dark-to-bright palette (black, purple, red-orange, yellow, white), interpolated.
_PALETTE = np.array([[0, 0, 4], [80, 18, 123], [182, 54, 121], [251, 136, 97], [252, 253, 191]], np.float32) / 255


def spectrogram(waveform: np.ndarray, rate: int, *, n_fft: int = 512, max_columns: int = 1200, floor_db: float = 80.0) -> np.ndarray:
    """``[freq, time, 3]`` colours of the log-magnitude STFT (Hann window), low frequencies at the bottom, the top
    ``floor_db`` decibels shown; the hop grows with the clip so a long clip stays at most ``max_columns`` wide."""
    n_fft = min(n_fft, max(16, len(waveform)))
    signal = np.pad(np.asarray(waveform, np.float32), (n_fft // 2, n_fft // 2))
    hop = max(n_fft // 4, int(np.ceil((len(signal) - n_fft) / max_columns)))
    starts = np.arange(0, max(len(signal) - n_fft, 0) + 1, hop)
    frames = np.stack([signal[s : s + n_fft] for s in starts]) * np.hanning(n_fft).astype(np.float32)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    db = 10 * np.log10(np.maximum(power, 1e-12))
    level = np.clip((db - (db.max() - floor_db)) / floor_db, 0, 1).T[::-1]  # [freq, time], low frequencies at the bottom
    position = level * (len(_PALETTE) - 1)
    low = np.floor(position).astype(int).clip(0, len(_PALETTE) - 2)
    frac = (position - low)[..., None]
    return _PALETTE[low] * (1 - frac) + _PALETTE[low + 1] * frac


def render_member(name: str, data: bytes, domain: Any, *, label: str, composite_bands: tuple[int, int, int] | None = None,
                  max_side: int = 2048) -> list[View]:
    """The views of one media member, decoded by ``domain`` (the run's domain for the member's media kind)."""
    if domain.name == "audio":
        (waveform,) = domain.decode(name, data)
        return [View("audio", label, png_bytes(spectrogram(waveform, domain.rate), max_side), wav_bytes(waveform, domain.rate))]
    if domain.name == "remote_sensing" and media_type(name) in TIFF_TYPES:
        bands, valid = domain.read_bands(name, data)
        chosen = composite_bands or default_composite(bands.shape[-1])
        names = domain.options.bands
        shown = ", ".join(str(names[c]) if names is not None and c < len(names) else f"band {c}" for c in chosen)
        return [View("image", f"{label} (R, G, B = {shown})", png_bytes(composite(bands, valid, chosen), max_side))]
    views = []
    items = domain.decode(name, data)
    volume = getattr(domain, "volume_depth", None) is not None
    for i, item in enumerate(items):
        part = f" ({i + 1} of {len(items)})" if len(items) > 1 else ""
        for panel_label, panel in image_panels(item, volume):
            views.append(View("image", f"{label}{part}{', ' + panel_label if panel_label else ''}", png_bytes(panel, max_side)))
    return views
