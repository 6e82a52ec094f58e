"""Band sets: one media item made of single-band GeoTIFFs at different resolutions (a Sentinel-2 product stores B02,
B03, B04, B08 at 10 m, B05-B07, B8A, B11, B12 at 20 m, B01, B09, B10 at 60 m), resampled onto the finest grid.

Each file's band is named by its file name (``..._B8A_20m.tif``, ``B01.tif``, ``..._SCL_20m.tif``) or else by its GeoTIFF band description;
bands come out in Sentinel-2 order (B01 ... B08, B8A, B09 ... B12), then any others (SCL, ...) in stored order.
Resampling (torch ``interpolate``, pixel centres aligned as GDAL does with ``align_corners=False``): bilinear for
measurements, nearest for categorical bands (``nearest_bands``, default SCL: a class map must not blend classes).
Nodata stays out of the blend: the band times its valid mask and the mask are both resampled and divided, and a pixel
is valid where the nearest source pixel was.
"""
from __future__ import annotations

import re

import numpy as np

from .base import PIXELS_FIX, DecodeError
from .bundle import unpack_bundle

S2_ORDER = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"]
# Band names in Sentinel-2 file names (L1C/L2A: ..._B8A_20m.jp2, ..._SCL_20m.jp2), whole words only.
_S2_NAME = re.compile(r"(?:^|[^A-Za-z0-9])(B(?:0[1-9]|1[0-2]|8A)|SCL|AOT|WVP)(?:[^A-Za-z0-9]|$)", re.IGNORECASE)


def band_name(file_name: str, description: list[str] | None) -> str | None:
    """``T32TQM_20210501_B8A_20m.tif`` -> ``B8A``; else the file's band description; else None."""
    stem = file_name.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    found = _S2_NAME.findall(stem)
    if len(found) == 1:
        return found[0].upper()
    return description[0] if description else None


def read_band_set(name: str, data: bytes, read_file, nearest_bands: list[str],
                  max_pixels: int) -> tuple[np.ndarray, np.ndarray, list[str], np.dtype]:
    """Bands ``[H, W, C]`` float32 on the finest grid, their valid mask, their names and the files' dtype.

    ``read_file(member, bytes)`` gives one file's ``(array [h, w, 1], valid [h, w, 1], descriptions, dtype)``."""
    named: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    dtypes = set()
    for member, part in unpack_bundle(name, data):
        array, valid, descriptions, dtype = read_file(f"{name}/{member}", part)
        if array.shape[-1] != 1:
            raise DecodeError(f"member {name!r}: {member!r} holds {array.shape[-1]} bands; a band set takes one band per file")
        band = band_name(member, descriptions)
        if band is None:
            raise DecodeError(f"member {name!r}: cannot tell which band {member!r} holds: name the file after it (B01 ... B12, "
                              "B8A) or give it a GeoTIFF band description")
        if band in named:
            raise DecodeError(f"member {name!r}: band {band} appears twice; one file per band")
        named[band] = array[..., 0].astype(np.float32), valid[..., 0]
        dtypes.add(np.dtype(dtype))
    order = [b for b in S2_ORDER if b in named] + [b for b in named if b not in S2_ORDER]
    height = max(v[0].shape[0] for v in named.values())
    width = max(v[0].shape[1] for v in named.values())
    if height * width * len(order) > max_pixels:
        raise DecodeError(f"member {name!r}: {len(order)} bands on a {height}x{width} grid exceed max_pixels={max_pixels}; "
                          f"rejected before resampling; {PIXELS_FIX}")
    bands, valids = [], []
    for band in order:
        values, valid = named[band]
        h, w = values.shape
        if abs(height / h - width / w) > 0.01 * max(height / h, width / w):
            raise DecodeError(f"member {name!r}: band {band} is {h}x{w}, which does not cover the {height}x{width} grid of the "
                              "finest band with square pixels; the files of one item must cover the same area")
        resampled, mask = _resample(values, valid, (height, width), nearest=band in nearest_bands)
        bands.append(resampled)
        valids.append(mask)
    dtype = max(dtypes, key=lambda d: (d.kind == "f", d.itemsize))  # the unit scale of the widest type
    return np.stack(bands, -1), np.stack(valids, -1), order, dtype


def _resample(values: np.ndarray, valid: np.ndarray, size: tuple[int, int], *, nearest: bool) -> tuple[np.ndarray, np.ndarray]:
    if values.shape == size:
        return values, valid
    import torch
    import torch.nn.functional as F

    def up(x: np.ndarray, mode: str) -> np.ndarray:
        kwargs = {} if mode == "nearest-exact" else {"align_corners": False}
        return F.interpolate(torch.from_numpy(np.ascontiguousarray(x, np.float32))[None, None], size=size, mode=mode, **kwargs)[0, 0].numpy()

    mask = up(valid.astype(np.float32), "nearest-exact") > 0.5
    if nearest:
        return up(values, "nearest-exact"), mask
    weight = up(valid.astype(np.float32), "bilinear")
    blended = up(np.where(valid, values, 0.0), "bilinear") / np.maximum(weight, 1e-6)
    return blended.astype(np.float32), mask & (weight > 0)
