"""Generic media: 8/16-bit PNG, JPEG, WebP, BMP images via Pillow, and NumPy arrays without pickle."""
from __future__ import annotations

import io

import numpy as np
from pydantic import BaseModel, ConfigDict

from .base import DecodeError, guarded, media_type

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp")


class GenericOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


def decode_image(data: bytes) -> np.ndarray:
    """HW (grey) or HWC array in the file's own dtype: 16-bit PNGs stay 16-bit instead of being crushed to 8."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L"):
            return np.asarray(img, dtype=np.uint16)
        if img.mode not in ("L", "RGB"):
            img = img.convert("RGB")
        return np.asarray(img)


def decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


class GenericDomain:
    name = "generic"
    output = "unit"

    def __init__(self, options: GenericOptions | None = None, encoder_info: object = None) -> None:
        self.decoders = {**{ext: decode_image for ext in IMAGE_EXTENSIONS}, "npy": decode_npy}

    def media_types(self) -> list[str]:
        return sorted(self.decoders)

    def decode(self, name: str, data: bytes) -> list[np.ndarray]:
        kind = media_type(name)
        decoder = self.decoders.get(kind)
        if decoder is None:
            raise DecodeError(f"member {name!r}: .{kind} is not a media type of the {self.name} domain ({', '.join(self.media_types())})")
        return [guarded(name, decoder, data)]

    def prepare_for_shard(self, name: str, data: bytes) -> bytes:
        return data
