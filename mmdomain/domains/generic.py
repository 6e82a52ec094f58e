"""Generic media: 8/16-bit PNG, JPEG, WebP, BMP images via Pillow, and NumPy arrays without pickle, capped from the header.

Every file is checked from its header before a pixel is decoded, both when make-shards stores it and when training
reads it (shards written by other tools, or by an older mmdomain, can hold anything): the bytes must really be an
allowed format, and width x height x frames (or a .npy array's element count) must fit ``max_pixels``.
"""
from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .base import PIXELS_FIX, DecodeError, guarded, media_type

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp")
# Extension -> the format its bytes must hold, and format -> the extension to rename a mismatched file to.
FORMAT_OF = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP", "bmp": "BMP"}
EXTENSION_OF = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "BMP": "bmp"}
# File signatures of the allowed formats (the same tests Pillow's plugins make); nothing else reaches a decoder.
_MAGIC = (("PNG", 0, b"\x89PNG\r\n\x1a\n"), ("JPEG", 0, b"\xff\xd8\xff"), ("BMP", 0, b"BM"))
NPY_KINDS = "biuf"  # bool, signed and unsigned integers, floats: what an image or feature array is made of


class GenericOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_pixels: int = Field(64_000_000, ge=1, description="width x height x frames of an image, or elements of a .npy array, "
                                                           "allowed; checked from the header before anything is decoded")


def sniff_format(data: bytes) -> str | None:
    """PNG, JPEG, WEBP or BMP from the first bytes, or None for anything else."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for fmt, at, magic in _MAGIC if data[at : at + len(magic)] == magic), None)


def _webp_size(data: bytes) -> tuple[int, int] | None:
    """Canvas size from a WebP's first chunk (VP8X, VP8L or VP8), or None if it cannot be read.

    Read here because Pillow's WebP reader allocates two canvas buffers (8 bytes a pixel) while opening the file,
    before anyone could compare the size against a limit."""
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    return None


def _plugins() -> dict[str, Any]:
    from PIL import BmpImagePlugin, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

    return {"PNG": PngImagePlugin.PngImageFile, "JPEG": JpegImagePlugin.JpegImageFile,
            "WEBP": WebPImagePlugin.WebPImageFile, "BMP": BmpImagePlugin.BmpImageFile}


def _too_many(name: str, size: str, pixels: int, max_pixels: int) -> DecodeError:
    return DecodeError(f"member {name!r}: {size} = {pixels} pixels exceeds max_pixels={max_pixels}; rejected before decoding; {PIXELS_FIX}")


def open_image(name: str, data: bytes, max_pixels: int, extension: str | None = None) -> Any:
    """A lazily opened Pillow image (header read, no pixels decoded) whose format is allowed and size within ``max_pixels``.

    With ``extension``, the format must also be the one that extension names. The image is opened through the four
    allowed format readers directly rather than ``Image.open``: that keeps every other Pillow format (and its
    attack surface) out, and replaces Pillow's process-wide decompression-bomb check (only a warning between ~89 M
    and ~179 M pixels, an error past that) with this domain's ``max_pixels``: one option decides, and what Pillow
    would merely warn about is refused."""
    fmt = sniff_format(data)
    if fmt is None:
        raise DecodeError(f"member {name!r}: not a PNG, JPEG, WebP or BMP image (its first bytes match none of them); "
                          "convert it to one of these formats")
    if extension is not None and FORMAT_OF.get(extension) != fmt:
        raise DecodeError(f"member {name!r}: holds a {fmt} image but is named .{extension}; rename it to "
                          f".{EXTENSION_OF[fmt]} (and its JSONL entry) so the stored member says what it is")
    if fmt == "WEBP":
        size = _webp_size(data)
        if size is None:
            raise DecodeError(f"member {name!r}: WebP without a readable VP8/VP8L/VP8X header")
        if size[0] * size[1] > max_pixels:
            raise _too_many(name, f"{size[0]} x {size[1]}", size[0] * size[1], max_pixels)
    img = guarded(name, lambda d: _plugins()[fmt](io.BytesIO(d)), data)
    width, height = img.size
    frames = int(getattr(img, "n_frames", 1) or 1)  # APNG and animated WebP say how many frames their header holds
    pixels = width * height * frames
    if pixels > max_pixels:
        img.close()
        raise _too_many(name, f"{width} x {height}" + (f" x {frames} frames" if frames > 1 else ""), pixels, max_pixels)
    return img


def decode_image(name: str, data: bytes, max_pixels: int) -> np.ndarray:
    """HW (grey) or HWC array in the file's own dtype: 16-bit PNGs stay 16-bit instead of being crushed to 8.
    Only the first frame of an animated file is decoded."""
    with open_image(name, data, max_pixels) as img:
        guarded(name, lambda im: im.load(), img)
        return guarded(name, image_array, img)


def image_array(img: Any) -> np.ndarray:
    """A loaded PIL image as ``decode_image`` gives it: 16-bit grey as uint16, grey and RGB as they are, any other
    mode (palette, RGBA, CMYK, ...) converted to RGB. Images that arrive as PIL objects (lmms-eval's) take this too."""
    if img.mode in ("I;16", "I;16B", "I;16L"):
        return np.asarray(img, dtype=np.uint16)
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    return np.asarray(img)


def read_npy_header(name: str, data: bytes, max_pixels: int) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of a .npy file, from its header only; refuses pickled, non-numeric, oversized
    or truncated arrays."""
    from numpy.lib import format as npy

    fp = io.BytesIO(data)
    version = guarded(name, npy.read_magic, fp)
    readers = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}
    if version not in readers:  # 3.0 exists only for structured dtypes with non-Latin-1 field names: not media
        raise DecodeError(f"member {name!r}: .npy format version {version[0]}.{version[1]} is not read here (1.0 and 2.0 are); "
                          "save a plain numeric array with np.save")
    shape, _, dtype = guarded(name, readers[version], fp)
    if dtype.hasobject:
        raise DecodeError(f"member {name!r}: .npy with dtype {dtype} holds pickled Python objects, and unpickling can run code; "
                          "save a numeric array instead (e.g. np.save(path, array.astype(np.float32)))")
    if dtype.kind not in NPY_KINDS:
        raise DecodeError(f"member {name!r}: .npy dtype {dtype} is not numeric (bool, int, uint or float); save a numeric array")
    count = math.prod(shape)
    if count > max_pixels:
        raise DecodeError(f"member {name!r}: .npy array of shape {tuple(shape)} has {count} elements, over max_pixels={max_pixels}; "
                          f"rejected before reading; {PIXELS_FIX}")
    offset = fp.tell()
    if len(data) < offset + count * dtype.itemsize:
        raise DecodeError(f"member {name!r}: truncated .npy: the header promises {count * dtype.itemsize} bytes of data, "
                          f"the file holds {len(data) - offset}")
    return tuple(shape), dtype, offset


def decode_npy(name: str, data: bytes, max_pixels: int) -> np.ndarray:
    read_npy_header(name, data, max_pixels)
    return guarded(name, lambda d: np.load(io.BytesIO(d), allow_pickle=False), data)


class GenericDomain:
    name = "generic"
    output = "unit"

    def __init__(self, options: GenericOptions | None = None, encoder_info: object = None) -> None:
        self.options = options or GenericOptions()

    def media_types(self) -> list[str]:
        return sorted((*IMAGE_EXTENSIONS, "npy"))

    def _check_type(self, name: str) -> str:
        kind = media_type(name)
        if kind not in (*IMAGE_EXTENSIONS, "npy"):
            raise DecodeError(f"member {name!r}: .{kind} is not a media type of the {self.name} domain ({', '.join(self.media_types())})")
        return kind

    def decode(self, name: str, data: bytes) -> list[np.ndarray]:
        """The checks of ``prepare_for_shard`` except the format-extension match: other tools' shards often call a
        PNG ``.jpg``, and decoding goes by the bytes, which must still be an allowed format within ``max_pixels``."""
        if self._check_type(name) == "npy":
            return [decode_npy(name, data, self.options.max_pixels)]
        return [decode_image(name, data, self.options.max_pixels)]

    def prepare_for_shard(self, name: str, data: bytes) -> bytes:
        """The file's bytes, unchanged, once its header shows an allowed format matching its extension within
        ``max_pixels`` (a .npy: numeric, within the cap, and exactly as long as its header says). No pixels are decoded."""
        kind = self._check_type(name)
        if kind == "npy":
            shape, dtype, offset = read_npy_header(name, data, self.options.max_pixels)
            expected = offset + math.prod(shape) * dtype.itemsize
            if len(data) != expected:
                raise DecodeError(f"member {name!r}: .npy holds {len(data) - expected} bytes after its array; "
                                  "only the array would be read, so save it again with np.save")
        else:
            open_image(name, data, self.options.max_pixels, extension=kind).close()
        return data
