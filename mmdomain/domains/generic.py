"""Generic media: 8/16-bit PNG, JPEG, WebP, BMP images via Pillow, and NumPy arrays without pickle."""
from __future__ import annotations

import io

import numpy as np

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp")


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
