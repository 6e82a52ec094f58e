"""Domain adapters: the fixed allow-list of decoders that turn shard members into media an encoder accepts."""
from __future__ import annotations

from typing import Any, Callable

from .generic import IMAGE_EXTENSIONS, decode_image, decode_npy


class DecodeError(ValueError):
    """A media member that cannot be decoded; the message names the member and why."""


# Extension -> decoder. Only these member types are ever decoded: no pickle, no arbitrary code paths.
DECODERS: dict[str, Callable[[bytes], Any]] = {**{ext: decode_image for ext in IMAGE_EXTENSIONS}, "npy": decode_npy}


def media_extensions() -> list[str]:
    return sorted(DECODERS)


def decode_member(name: str, data: bytes) -> Any:
    ext = name.rsplit(".", 1)[-1].lower()
    decoder = DECODERS.get(ext)
    if decoder is None:
        raise DecodeError(f"member {name!r}: extension .{ext} is not an allowed media type ({', '.join(media_extensions())})")
    try:
        return decoder(data)
    except DecodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure becomes a named, counted DecodeError
        raise DecodeError(f"member {name!r}: {type(exc).__name__}: {exc}") from exc
