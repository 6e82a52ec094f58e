"""SAR backscatter bands: linear power to decibels (floored, nodata-aware), an optional median speckle filter, and
robust (median / MAD) statistics in dB, since speckle gives linear power a heavy right tail that mean/std follow."""
from __future__ import annotations

import numpy as np

# Without statistics, SAR bands in dB become [0, 1] over this window: it spans the usual Sentinel-1 VV/VH backscatter
# of land and water (-30 dB: calm water and shadow; +5 dB: urban double bounce); values outside are clipped.
UNIT_WINDOW_DB = (-30.0, 5.0)
# 1.4826 * MAD estimates the standard deviation of a normal distribution (dB backscatter is close to one).
MAD_TO_STD = 1.4826


def linear_to_db(values: np.ndarray, valid: np.ndarray, floor_db: float) -> np.ndarray:
    """10 log10 of linear power; zero, negative or tiny values become ``floor_db``; nodata pixels are left as they were
    (the caller's mask keeps them out of statistics and zeroes them later)."""
    floor = 10.0 ** (floor_db / 10.0)
    out = values.astype(np.float32, copy=True)
    out[valid] = 10.0 * np.log10(np.maximum(values[valid], floor))
    return out


def median_filter(band: np.ndarray, valid: np.ndarray, size: int) -> np.ndarray:
    """A ``size`` x ``size`` median over valid pixels (edges reflected). Nodata pixels enter the windows at the band's
    median, so they pull no neighbour toward the nodata value; their own value stays as it was."""
    if not valid.any():
        return band
    filled = np.where(valid, band, np.median(band[valid])).astype(np.float32)
    half = size // 2
    padded = np.pad(filled, half, mode="reflect")
    windows = np.lib.stride_tricks.sliding_window_view(padded, (size, size))
    return np.where(valid, np.median(windows, axis=(-2, -1)), band).astype(np.float32)


class RobustAccumulator:
    """Median and MAD of many files' values in one pass and fixed memory: a histogram over -100..+100 dB in 0.005 dB
    bins (values beyond the range count in the end bins)."""

    LOW, HIGH, BINS = -100.0, 100.0, 40000

    def __init__(self) -> None:
        self.counts = np.zeros(self.BINS, np.int64)

    def add(self, values: np.ndarray) -> None:
        index = np.clip(((values - self.LOW) / (self.HIGH - self.LOW) * self.BINS).astype(np.int64), 0, self.BINS - 1)
        self.counts += np.bincount(index, minlength=self.BINS)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def median_and_std(self) -> tuple[float, float]:
        """Median and 1.4826 * MAD (bin centres; exact to half a bin, 0.0025 dB)."""
        centres = self.LOW + (np.arange(self.BINS) + 0.5) * (self.HIGH - self.LOW) / self.BINS
        median = _weighted_median(centres, self.counts)
        deviation = np.abs(centres - median)
        order = np.argsort(deviation, kind="stable")
        return median, MAD_TO_STD * _weighted_median(deviation[order], self.counts[order])


def _weighted_median(sorted_values: np.ndarray, counts: np.ndarray) -> float:
    cumulative = np.cumsum(counts)
    return float(sorted_values[np.searchsorted(cumulative, cumulative[-1] / 2.0)])
