"""What a domain adapter is: an allow-list of media types, each decoded from bytes into arrays an encoder accepts."""
from __future__ import annotations

from typing import Any, Literal, Protocol

import numpy as np
from ..errors import MmdomainError

Output = Literal["unit", "standardized", "waveform"]

# The fix for every "too many pixels" refusal, so each domain points at the same option in the same words.
PIXELS_FIX = ("if the file is meant to be this large, raise the domain's max_pixels (model.domain.options.max_pixels "
              "in a recipe, --domain-options '{\"max_pixels\": N}' for make-shards)")

class DecodeError(MmdomainError, ValueError):
    """A media member that cannot be decoded; the message names the member and why (never a header value)."""


def media_type(name: str) -> str:
    """``scan.nii.gz`` -> ``nii.gz``; ``0.PNG`` -> ``png``; a bundle ``0.dcm.tar`` -> ``dcm.tar`` (see bundle.py)."""
    lower = name.lower().rsplit("/", 1)[-1]
    if lower.endswith(".tar") and lower.count(".") >= 2:
        return f"{media_type(lower[:-4])}.tar"
    return "nii.gz" if lower.endswith(".nii.gz") else lower.rsplit(".", 1)[-1]


class Domain(Protocol):
    """A decoder set chosen by the recipe (``model.domain``).

    ``output`` says what ``decode`` returns: ``unit`` images in [0, 1] (or integer images scaled by their dtype),
    to which the encoder's mean/std still apply; ``standardized`` images already normalised per channel (the
    encoder's mean/std are skipped); or a mono ``waveform`` at the encoder's sample rate.
    """

    name: str
    output: Output

    def media_types(self) -> list[str]: ...

    def decode(self, name: str, data: bytes) -> list[np.ndarray]:
        """One or more media items (several for a tiled image or evenly spaced volume slices)."""
        ...

    def prepare_for_shard(self, name: str, data: bytes) -> bytes:
        """What make-shards stores for a media file: checked, and stripped of anything that must not travel."""
        ...


def guarded(name: str, decode: Any, data: bytes) -> Any:
    """Run a decoder; any failure becomes a DecodeError naming the member."""
    try:
        return decode(data)
    except DecodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - every decoder failure is named and counted, never crashes the run
        raise DecodeError(f"member {name!r}: {type(exc).__name__}: {exc}") from exc
