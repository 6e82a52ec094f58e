"""Remote-sensing media: multi-band (Geo)TIFF with band selection, per-band statistics, nodata, composites, tiling.

Two ways to feed more than three bands to an encoder:
- ``mode: bands`` keeps every selected band, standardised with per-band statistics; pair it with an encoder whose
  patch embedding is widened to C channels (``timm:<arch>`` with ``in_chans: C``: timm's ``adapt_input_conv``
  repeats the pretrained RGB kernel over the C channels and rescales it by 3/C, so pretrained weights stay useful);
- ``mode: composite`` maps three chosen bands to RGB (each stretched over mean +- 2 std, or its 2-98 percentiles)
  for an unchanged RGB encoder.
SAR bands (``band_kinds``) are read in dB with robust statistics (sar.py); a band set of single-band files at mixed
resolutions (``tif.tar``, e.g. a Sentinel-2 product) is resampled onto its finest grid (sentinel2.py). Statistics of
the selected bands are computed from the shards (``band_statistics``; ../band_stats.py for recipes and runs).
"""
from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import ClassVar, Iterable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .base import PIXELS_FIX, DecodeError, guarded, media_type
from .generic import GenericDomain, GenericOptions
from .bundle import is_bundle
from .sentinel2 import read_band_set
from .sar import UNIT_WINDOW_DB, RobustAccumulator, linear_to_db, median_filter

# A GeoTIFF, or a band set of single-band GeoTIFFs (sentinel2.py) stored as one bundle.
TIFF_TYPES = ("tif", "tiff", "tif.tar", "tiff.tar")
_ITEM = re.compile(r'<Item name="DESCRIPTION" sample="(\d+)"[^>]*>([^<]*)</Item>')


class BandStats(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mean: list[float]
    std: list[float]

    @model_validator(mode="after")
    def _same_length(self) -> "BandStats":
        if len(self.mean) != len(self.std) or any(s <= 0 for s in self.std):
            raise ValueError("stats.mean and stats.std need one value per band, std > 0")
        return self


class Tiling(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: int = Field(ge=8)
    stride: int | None = Field(None, ge=1)
    max_tiles: int = Field(64, ge=1)


class RemoteSensingOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Options that only normalise decoded values: shards store files as they are, and `data stats` computes the
    # statistics from raw bands, so both build this domain without them (stats made from shards cannot gate the shards).
    NORMALISING: ClassVar[tuple[str, ...]] = ("stats",)
    bands: list[int | str] | None = Field(None, description="bands to keep, by 0-based index or name; default all")
    band_names: list[str] | None = Field(None, description="names of the file's bands in order; default the GeoTIFF's band descriptions")
    mode: Literal["bands", "composite"] = "bands"
    stats: BandStats | str | None = Field(None, description="per selected band mean/std, or the JSON written by `mmdomain data stats` "
                                                            "(a run computes a missing file from its training shards)")
    nodata: float | None = Field(None, description="nodata value; default the file's GDAL_NODATA tag")
    band_kinds: list[Literal["optical", "sar_linear", "sar_db"]] | None = Field(
        None, description="per selected band: optical (as stored), sar_linear (backscatter in linear power, turned into dB) or "
                          "sar_db (already dB); SAR bands get robust statistics (median, 1.4826 MAD) in dB; default all optical")
    sar_floor_db: float = Field(-50.0, description="linear SAR power at or below 10^(floor/10) (zeros included) becomes this dB value")
    speckle_filter: int | None = Field(None, ge=3, le=15, description="odd k: a k x k median filter on SAR bands (in dB) before "
                                                                     "statistics and standardisation; default none")
    gsd: float | None = Field(None, gt=0, description="ground sampling distance of the files (m/pixel)")
    target_gsd: float | None = Field(None, gt=0, description="resample to this GSD before tiling (needs gsd)")
    tile: Tiling | None = None
    nearest_bands: list[str] = Field(["SCL"], description="band set (tif.tar) bands resampled by nearest neighbour, not "
                                                          "bilinear: class maps such as Sentinel-2's scene classification")
    max_pixels: int = Field(1 << 28, ge=1, description="TIFF height x width x bands, or PNG/JPEG/WebP/BMP width x height x "
                                                       "frames (.npy: elements), allowed; checked from the header before reading")

    @model_validator(mode="after")
    def _consistent(self) -> "RemoteSensingOptions":
        if self.mode == "composite" and (self.bands is None or len(self.bands) != 3):
            raise ValueError("mode: composite needs exactly three bands, e.g. bands: [3, 2, 1] (red, green, blue)")
        if self.band_kinds is not None and self.bands is not None and len(self.band_kinds) != len(self.bands):
            raise ValueError(f"band_kinds names {len(self.band_kinds)} kinds for {len(self.bands)} bands; give one per selected band")
        if self.speckle_filter is not None and self.speckle_filter % 2 == 0:
            raise ValueError(f"speckle_filter must be odd (a window centred on its pixel), got {self.speckle_filter}")
        if self.target_gsd is not None and self.gsd is None:
            raise ValueError("target_gsd needs gsd (the files' ground sampling distance)")
        return self

    def resolved_stats(self) -> BandStats | None:
        if isinstance(self.stats, str):
            path = Path(self.stats).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"band statistics {str(path)!r} do not exist; write them with `mmdomain data stats RECIPE --out {path}` "
                                        "(a training run computes them itself when they are missing)")
            data = json.loads(path.read_text())
            return BandStats(mean=data["mean"], std=data["std"])
        return self.stats


class RemoteSensingDomain:
    name = "remote_sensing"

    def __init__(self, options: RemoteSensingOptions, encoder_info: object = None) -> None:
        self.options = options
        self.stats = options.resolved_stats()
        self.generic = GenericDomain(GenericOptions(max_pixels=options.max_pixels))  # one cap for every file type of the domain
        # Standardised bands skip the encoder's own mean/std; composites and unscaled bands are [0, 1] images.
        self.output = "standardized" if (options.mode == "bands" and self.stats is not None) else "unit"

    def media_types(self) -> list[str]:
        return sorted({*TIFF_TYPES, *self.generic.media_types()})

    def decode(self, name: str, data: bytes) -> list[np.ndarray]:
        if media_type(name) not in TIFF_TYPES:
            return self.generic.decode(name, data)
        bands, valid = self.read_bands(name, data)
        if self.options.mode == "composite":
            image = self._composite(bands, valid)
        elif self.stats is not None:
            if len(self.stats.mean) != bands.shape[-1]:
                raise DecodeError(f"member {name!r}: {bands.shape[-1]} bands selected but stats give {len(self.stats.mean)}")
            image = (bands - np.array(self.stats.mean, np.float32)) / np.array(self.stats.std, np.float32)
            image[~valid] = 0.0  # nodata sits at the band mean
        else:
            image = bands / _dtype_scale(self._dtype)
            low, high = UNIT_WINDOW_DB
            for c in self.sar_bands(bands.shape[-1]):  # dB is no fraction of a dtype's range: a fixed window instead
                image[..., c] = np.clip((bands[..., c] - low) / (high - low), 0, 1)
            image[~valid] = 0.0
        return self._tiles(self._resample(image.astype(np.float32)))

    def read_bands(self, name: str, data: bytes) -> tuple[np.ndarray, np.ndarray]:
        """Selected bands ``[H, W, C]`` as float32 in the file's units (dB for SAR), and the mask of valid (not nodata)
        pixels. A band set (``tif.tar``: one file per band, any resolutions) comes resampled onto its finest grid."""
        if is_bundle(media_type(name)):
            array, valid, names, self._dtype = read_band_set(name, data, self._read_file, self.options.nearest_bands,
                                                                  self.options.max_pixels)
        else:
            array, valid, names, self._dtype = self._read_file(name, data)
        names = self.options.band_names or names
        index = self._band_index(name, names, array.shape[-1])
        bands, valid = array[..., index], valid[..., index]
        return self._sar_to_db(name, bands, valid), valid

    def _read_file(self, name: str, data: bytes) -> tuple[np.ndarray, np.ndarray, list[str] | None, np.dtype]:
        """One GeoTIFF: all bands ``[H, W, C]`` float32, valid mask, band descriptions, stored dtype."""
        import tifffile

        with guarded(name, lambda d: tifffile.TiffFile(io.BytesIO(d)), data) as tif:
            series = tif.series[0]
            if int(np.prod(series.shape)) > self.options.max_pixels:
                raise DecodeError(f"member {name!r}: shape {series.shape} exceeds max_pixels={self.options.max_pixels}; rejected before reading; {PIXELS_FIX}")
            page = tif.pages[0]
            tags = {t.code: t.value for t in page.tags.values()}
            array = guarded(name, lambda s: s.asarray(), series)
            axes = series.axes
        band_axis = next((axes.index(a) for a in "SCQI" if a in axes), None)
        if array.ndim == 2:
            array = array[..., None]
        elif band_axis is not None:
            array = np.moveaxis(array, band_axis, -1)
        dtype = array.dtype
        array = array.astype(np.float32)
        nodata = self.options.nodata if self.options.nodata is not None else _nodata(tags.get(42113))
        valid = np.ones(array.shape, bool) if nodata is None else ~np.isclose(array, nodata)
        valid &= np.isfinite(array)
        return array, valid, _band_descriptions(tags.get(42112), array.shape[-1]), dtype

    def sar_bands(self, count: int) -> list[int]:
        """Positions of the SAR bands among ``count`` selected bands."""
        kinds = self.options.band_kinds or []
        return [c for c, kind in enumerate(kinds[:count]) if kind.startswith("sar")]

    def _sar_to_db(self, name: str, bands: np.ndarray, valid: np.ndarray) -> np.ndarray:
        kinds = self.options.band_kinds
        if kinds is None:
            return bands
        if len(kinds) != bands.shape[-1]:
            raise DecodeError(f"member {name!r}: band_kinds gives {len(kinds)} kinds for {bands.shape[-1]} bands; give one per selected band")
        for c, kind in enumerate(kinds):
            if kind == "sar_linear":
                bands[..., c] = linear_to_db(bands[..., c], valid[..., c], self.options.sar_floor_db)
            if kind != "optical" and self.options.speckle_filter:
                bands[..., c] = median_filter(bands[..., c], valid[..., c], self.options.speckle_filter)
        return bands

    def _band_index(self, name: str, names: list[str] | None, count: int) -> list[int]:
        if self.options.bands is None:
            return list(range(count))
        out = []
        for band in self.options.bands:
            if isinstance(band, int):
                if not 0 <= band < count:
                    raise DecodeError(f"member {name!r}: band {band} out of range (the file has {count})")
                out.append(band)
            elif names is None or band not in names:
                raise DecodeError(f"member {name!r}: band {band!r} not found; names are {names} (set band_names or use indices)")
            else:
                out.append(names.index(band))
        return out

    def _composite(self, bands: np.ndarray, valid: np.ndarray) -> np.ndarray:
        out = np.zeros(bands.shape, np.float32)
        for c in range(3):
            values = bands[..., c][valid[..., c]]
            if self.stats is not None:
                lo = self.stats.mean[c] - 2 * self.stats.std[c]
                hi = self.stats.mean[c] + 2 * self.stats.std[c]
            else:
                lo, hi = np.percentile(values, [2, 98]) if values.size else (0.0, 1.0)
            out[..., c] = np.clip((bands[..., c] - lo) / max(hi - lo, 1e-6), 0, 1)
        out[~valid] = 0.0
        return out

    def _resample(self, image: np.ndarray) -> np.ndarray:
        if self.options.target_gsd is None:
            return image
        import torch
        import torch.nn.functional as F

        factor = self.options.gsd / self.options.target_gsd
        size = (max(1, round(image.shape[0] * factor)), max(1, round(image.shape[1] * factor)))
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
        return F.interpolate(x, size=size, mode="bilinear", antialias=factor < 1, align_corners=False)[0].permute(1, 2, 0).numpy()

    def _tiles(self, image: np.ndarray) -> list[np.ndarray]:
        tiling = self.options.tile
        if tiling is None:
            return [image]
        size, stride = tiling.size, tiling.stride or tiling.size
        h, w = image.shape[:2]
        if h < size or w < size:
            return [image]
        tops = list(range(0, h - size + 1, stride))
        lefts = list(range(0, w - size + 1, stride))
        tiles = [image[t : t + size, l : l + size] for t in tops for l in lefts]
        if len(tiles) > tiling.max_tiles:
            raise DecodeError(f"a {h}x{w} tile gives {len(tiles)} crops of {size}, over tile.max_tiles={tiling.max_tiles}")
        return tiles

    def prepare_for_shard(self, name: str, data: bytes) -> bytes:
        if media_type(name) in TIFF_TYPES:
            self.read_bands(name, data)  # fail at make-shards time, not mid-training
            return data
        return self.generic.prepare_for_shard(name, data)


def _dtype_scale(dtype: np.dtype) -> float:
    return float(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else 1.0


def _band_descriptions(gdal_metadata: object, count: int) -> list[str] | None:
    if not isinstance(gdal_metadata, str):
        return None
    found = {int(i): text for i, text in _ITEM.findall(gdal_metadata)}
    return [found.get(i, str(i)) for i in range(count)] if found else None


def _nodata(tag: object) -> float | None:
    try:
        return float(str(tag).strip("\x00 ")) if tag is not None else None
    except ValueError:
        return None


def band_statistics(domain: RemoteSensingDomain, members: Iterable[tuple[str, bytes]]) -> dict:
    """Per selected band mean/std over valid pixels of many files (Chan's parallel update: one pass, stable); SAR bands
    (``band_kinds``) get the median and 1.4826 MAD of their dB values instead, which speckle's outliers hardly move."""
    count = mean = m2 = None
    robust: dict[int, RobustAccumulator] = {}
    files = 0
    for name, data in members:
        if media_type(name) not in TIFF_TYPES:
            continue
        bands, valid = domain.read_bands(name, data)
        files += 1
        if count is None:
            count, mean, m2 = np.zeros(bands.shape[-1]), np.zeros(bands.shape[-1]), np.zeros(bands.shape[-1])
            robust = {c: RobustAccumulator() for c in domain.sar_bands(bands.shape[-1])}
        for c in range(bands.shape[-1]):
            values = bands[..., c][valid[..., c]].astype(np.float64)
            if c in robust:
                robust[c].add(values)
            n_b = values.size
            if not n_b:
                continue
            mean_b, m2_b = values.mean(), ((values - values.mean()) ** 2).sum()
            delta, total = mean_b - mean[c], count[c] + n_b
            mean[c] += delta * n_b / total
            m2[c] += m2_b + delta**2 * count[c] * n_b / total
            count[c] = total
    if not files:
        raise DecodeError("no TIFF media found to compute band statistics from")
    std = np.sqrt(m2 / np.maximum(count - 1, 1))
    for c, accumulator in robust.items():
        if accumulator.total:
            mean[c], std[c] = accumulator.median_and_std()
    return {"mean": mean.tolist(), "std": np.maximum(std, 1e-6).tolist(), "pixels": count.astype(int).tolist(), "files": files,
            "bands": domain.options.bands, "nodata": domain.options.nodata,
            "units": ["dB (median, 1.4826 MAD)" if c in robust else "file" for c in range(len(mean))]}
