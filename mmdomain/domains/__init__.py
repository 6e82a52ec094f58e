"""Domain adapters: the fixed allow-list of decoders that turn shard members into media an encoder accepts.

Chosen per recipe as ``model.domain: {name, options}``: ``generic`` (PNG/JPEG/NumPy), ``medical`` (DICOM, NIfTI),
``remote_sensing`` (multi-band GeoTIFF), ``audio`` (WAV/FLAC). Each domain's options are a typed schema.
"""
from __future__ import annotations

import importlib
import re
from typing import Any

from .base import DecodeError, Domain, media_type

# name -> (module, options class, domain class); modules import their file-format libraries lazily.
_DOMAINS = {
    "generic": ("generic", "GenericOptions", "GenericDomain"),
    "medical": ("medical", "MedicalOptions", "MedicalDomain"),
    "remote_sensing": ("remote_sensing", "RemoteSensingOptions", "RemoteSensingDomain"),
    "audio": ("audio", "AudioOptions", "AudioDomain"),
}

# Words tools and datasets use as media placeholders. One in a sample's text that is not a marker of the model (or of
# make-shards) is named in errors, rather than trained on as text.
MARKER_LIKE = re.compile(r"<(?:image|img|audio|video|speech|sound|wav|scan|dicom|tile|frame|media)(?:_?\d+)?>", re.IGNORECASE)


def domain_names() -> list[str]:
    return sorted(_DOMAINS)


def _parts(name: str) -> tuple[Any, Any]:
    if name not in _DOMAINS:
        raise KeyError(f"unknown domain {name!r}; choose one of {', '.join(domain_names())}")
    module, options, cls = _DOMAINS[name]
    mod = importlib.import_module(f"{__name__}.{module}")
    return getattr(mod, options), getattr(mod, cls)


def validate_options(name: str, options: dict[str, Any]) -> Any:
    """The typed options of a domain (raises pydantic's ValidationError on unknown keys or bad values)."""
    return _parts(name)[0].model_validate(options)


def build_domain(name: str = "generic", options: dict[str, Any] | None = None, encoder_info: Any = None, *, raw: bool = False) -> Domain:
    """The domain ``name`` with ``options``. ``raw=True`` leaves out the options that only normalise decoded values
    (an options class lists them in ``NORMALISING``), for writing shards and for computing those statistics."""
    opts_cls, cls = _parts(name)
    options = dict(options or {})
    if raw:
        for option in getattr(opts_cls, "NORMALISING", ()):
            options.pop(option, None)
    return cls(opts_cls.model_validate(options), encoder_info)


def decode_media(domains: Domain | dict[str, Domain], conversation: list[dict[str, Any]], named: list[tuple[str, bytes]],
                 media_token: str = "<image>") -> tuple[list[dict[str, Any]], list[Any]]:
    """Decode ``(name, bytes)`` media files in order; file i belongs to the i-th marker of any kind, and is decoded
    by that kind's domain (``domains`` maps marker token -> domain; a single domain serves ``media_token``). A
    file that yields several items (tiles, volume slices) has its marker repeated once per item, so each item
    still gets its own placeholder block. Returns (conversation, media)."""
    import re

    table = domains if isinstance(domains, dict) else {media_token: domains}
    pattern = re.compile("|".join(re.escape(t) for t in sorted(table, key=len, reverse=True)))
    markers = [m for turn in conversation for m in pattern.findall(turn["content"])]
    if len(markers) != len(named):
        foreign = sorted({m for turn in conversation for m in MARKER_LIKE.findall(turn["content"]) if m not in table})
        hint = (f"; the text holds {foreign[0]!r}: if that is the marker these shards use, set the recipe's model.media_token "
                f"to {foreign[0]!r} (shards and recipe must use the same one)") if foreign and not markers else ""
        raise DecodeError(f"{len(markers)} media markers ({', '.join(table)}) but {len(named)} media files{hint}")
    counts, media = [], []
    for marker, (name, data) in zip(markers, named):
        items = table[marker].decode(name, data)
        counts.append(len(items))
        media += items
    if all(c == 1 for c in counts):
        return conversation, media
    pending = iter(counts)
    out = []
    for turn in conversation:
        pieces = pattern.split(turn["content"])
        found = pattern.findall(turn["content"])
        text = pieces[0]
        for marker, piece in zip(found, pieces[1:]):
            text += " ".join([marker] * next(pending)) + piece
        out.append({**turn, "content": text})
    return out, media


__all__ = ["decode_media", "DecodeError", "Domain", "build_domain", "domain_names", "media_type", "validate_options"]
