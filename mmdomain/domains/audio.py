"""Audio media: WAV/FLAC/OGG decoded with soundfile, length capped from the header, downmixed, resampled.

Resampling is band-limited windowed-sinc interpolation (Hann window, 6 zero crossings, cut-off at 0.99 of the lower
Nyquist frequency), applied as a polyphase convolution: exact for any integer rate pair (44.1 kHz -> 16 kHz uses
441 -> 160 phases), no aliasing above the new Nyquist, and deterministic.
"""
from __future__ import annotations

import io
import math

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .base import DecodeError, guarded, media_type

AUDIO_EXTENSIONS = ("wav", "flac", "ogg")


class AudioOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_seconds: float = Field(30.0, gt=0, description="read at most this much of each file (decided from the header)")
    sample_rate: int | None = Field(None, ge=1000, description="target rate; default the encoder's")


def resample(waveform: np.ndarray, orig: int, new: int, zero_crossings: int = 6, rolloff: float = 0.99) -> np.ndarray:
    """Windowed-sinc polyphase resampling of a 1-D float signal from ``orig`` Hz to ``new`` Hz."""
    import torch
    import torch.nn.functional as F

    if orig == new:
        return waveform.astype(np.float32)
    g = math.gcd(orig, new)
    up, down = new // g, orig // g  # output phases per block, input samples per block
    cutoff = min(up, down) * rolloff
    width = math.ceil(zero_crossings * down / cutoff)
    taps = torch.arange(-width, width + down, dtype=torch.float64)[None, :] / down
    phases = -torch.arange(up, dtype=torch.float64)[:, None] / up
    t = ((phases + taps) * cutoff).clamp(-zero_crossings, zero_crossings)
    window = torch.cos(t * math.pi / zero_crossings / 2) ** 2
    kernel = torch.where(t == 0, torch.ones_like(t), torch.sin(t * math.pi) / (t * math.pi)) * window * (cutoff / down)
    x = torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float64))[None, None]
    x = F.pad(x, (width, width + down))
    out = F.conv1d(x, kernel[:, None, :], stride=down)  # [1, up, blocks]
    out = out[0].t().reshape(-1)[: math.ceil(up * waveform.shape[0] / down)]
    return out.numpy().astype(np.float32)


class AudioDomain:
    name = "audio"
    output = "waveform"

    def __init__(self, options: AudioOptions, encoder_info: object = None) -> None:
        self.options = options
        self.rate = options.sample_rate or getattr(encoder_info, "sample_rate", None)  # None: only checking files

    def media_types(self) -> list[str]:
        return list(AUDIO_EXTENSIONS)

    def decode(self, name: str, data: bytes) -> list[np.ndarray]:

        if not self.rate:
            raise ValueError("the audio domain needs a target rate: use an audio encoder (its sample rate) or set options.sample_rate")
        mono, rate = self._read(name, data)
        return [resample(mono, rate, self.rate)]

    def _read(self, name: str, data: bytes) -> tuple[np.ndarray, int]:
        import soundfile as sf

        if media_type(name) not in AUDIO_EXTENSIONS:
            raise DecodeError(f"member {name!r}: .{media_type(name)} is not an audio type ({', '.join(AUDIO_EXTENSIONS)})")
        info = guarded(name, lambda d: sf.info(io.BytesIO(d)), data)
        if info.frames <= 0 or info.samplerate <= 0:
            raise DecodeError(f"member {name!r}: empty audio ({info.frames} frames)")
        frames = min(info.frames, int(self.options.max_seconds * info.samplerate))  # capped before anything is read
        audio, rate = guarded(name, lambda d: sf.read(io.BytesIO(d), frames=frames, dtype="float32", always_2d=True), data)
        if audio.size == 0:
            raise DecodeError(f"member {name!r}: no samples could be read")
        return audio.mean(axis=1), rate  # downmix: the mean of the channels keeps the level of a centred source

    def prepare_for_shard(self, name: str, data: bytes) -> bytes:
        self._read(name, data)  # empty or corrupt files fail at make-shards time
        return data
