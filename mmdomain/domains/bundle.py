"""Bundles: several files that form one media item (a DICOM series, a Sentinel-2 band set) stored as one tar member.

A media entry in a make-shards JSONL that is a list of files or a folder becomes one item of media type
``"{ext}.tar"``. A domain opts in by listing that type; it receives the files packed in order and stores what its
``prepare_for_shard`` returns (usually re-packed under anonymous names, since file names can identify people).
"""
from __future__ import annotations

import io
import tarfile

from .base import DecodeError

BUNDLE_SUFFIX = ".tar"
MAX_MEMBERS = 4096  # a CT series rarely passes 2,000 slices; past this the input is more likely a mistake than a study


def bundle_type(ext: str) -> str:
    """The media type of a bundle of ``ext`` files: ``dcm`` -> ``dcm.tar``."""
    return f"{ext}{BUNDLE_SUFFIX}"


def is_bundle(kind: str) -> bool:
    return kind.endswith(BUNDLE_SUFFIX) and kind != BUNDLE_SUFFIX.lstrip(".")


def pack_bundle(parts: list[tuple[str, bytes]]) -> bytes:
    """A deterministic uncompressed tar of ``(name, bytes)`` in the given order (no times, owners or modes of the source)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT if all(len(n) < 100 for n, _ in parts) else tarfile.PAX_FORMAT) as tar:
        for name, data in parts:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def unpack_bundle(name: str, data: bytes, max_members: int = MAX_MEMBERS) -> list[tuple[str, bytes]]:
    """``(member name, bytes)`` in stored order; a DecodeError naming ``name`` for anything but a tar of plain files."""
    parts: list[tuple[str, bytes]] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    raise DecodeError(f"member {name!r}: bundle entry {info.name!r} is not a plain file")
                if len(parts) >= max_members:
                    raise DecodeError(f"member {name!r}: more than {max_members} files in one bundle; split the item")
                parts.append((info.name, tar.extractfile(info).read()))
    except tarfile.TarError as exc:
        raise DecodeError(f"member {name!r}: not a readable bundle ({exc})") from None
    if not parts:
        raise DecodeError(f"member {name!r}: empty bundle")
    return parts
