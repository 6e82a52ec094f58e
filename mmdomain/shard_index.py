"""Index webdataset tar shards by their headers: which samples each holds, where their members are, what is wrong.

Training needs to reach any sample by position (to resume mid-epoch without decoding what came before, and to give
each worker its own batches), and to know before step 0 whether the data is whole. Reading only tar headers (each
member's data is seeked over) gives both: a shard's samples in order with their members' offsets, plus its faults:

- a sample key that appears twice, adjacent (two ``k.json``) or not (``k`` again after other samples): the
  ambiguous copy is dropped and named;
- a shard that ends inside a member, or without tar's end-of-archive blocks (a copy cut short);
- fewer samples than ``manifest.json`` (written by make-shards) lists for the shard.

Sample keys follow webdataset: the member name up to the first dot of its base name (``dir/abc.0.png`` -> key
``dir/abc``, suffix ``0.png``); consecutive members with the same key form one sample.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import tarfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import MmdomainError

log = logging.getLogger(__name__)

_NAME = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")  # webdataset's split of a member name into key and suffix
_BLOCK = 512


class ShardFormatError(MmdomainError, ValueError):
    """A shard that cannot be indexed at all (not a tar file, compressed, unreadable); names the shard and the fix."""


@dataclass
class ShardIndex:
    """A shard's usable samples in file order, stored compactly (a million samples take ~130 MB: numbers in arrays,
    suffix strings shared), and ``problems``: ``(key, reason)`` of every sample that cannot be used (each counts once
    against ``data.decode_error_budget``)."""

    path: str
    keys: list[str] = field(default_factory=list)
    first: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))
    """Sample ``i``'s members are ``first[i]:first[i + 1]`` of the member arrays."""
    suffixes: list[str] = field(default_factory=list)
    offsets: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    sizes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    problems: list[tuple[str, str]] = field(default_factory=list)
    truncated: str | None = None
    """How the file ends early, when it does (its last sample may then be incomplete)."""

    def __len__(self) -> int:
        return len(self.keys)

    def members(self, sample: int) -> list[tuple[str, int, int]]:
        """``(suffix, offset, size)`` of each member of a sample."""
        lo, hi = int(self.first[sample]), int(self.first[sample + 1])
        return [(self.suffixes[m], int(self.offsets[m]), int(self.sizes[m])) for m in range(lo, hi)]


def scan_shard(path: str | Path) -> ShardIndex:
    """Index one shard by reading its tar headers only."""
    path = str(path)
    if path.endswith((".tar.gz", ".tgz", ".tar.zst", ".tar.xz", ".tar.bz2")):
        raise ShardFormatError(f"shard {path} is compressed; samples in it cannot be reached by position, which training and "
                               "resume need: decompress it (e.g. `gunzip`) and point data.train at the .tar")
    index = ShardIndex(path)
    groups: list[tuple[str, dict[str, tuple[int, int]], list[str]]] = []  # key, suffix -> (offset, size), duplicated suffixes
    seen_keys: dict[str, int] = {}
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
        except tarfile.ReadError as exc:
            if size == 0:
                raise ShardFormatError(f"shard {path} is empty (0 bytes); re-write it with `mmdomain make-shards`") from None
            raise ShardFormatError(f"shard {path} is not a tar file ({exc}); re-write it with `mmdomain make-shards`") from None
        try:
            for info in tar:
                if info.offset_data + info.size > size:
                    index.truncated = f"the file ends inside member {info.name!r} ({size} of {info.offset_data + info.size} bytes)"
                    break
                match = _NAME.match(info.name)
                if not info.isfile() or match is None:
                    continue
                key, suffix = match.groups()
                member = (info.offset_data, info.size)
                if groups and groups[-1][0] == key:
                    if suffix in groups[-1][1]:
                        groups[-1][2].append(suffix)
                    groups[-1][1][suffix] = member
                    continue
                groups.append((key, {suffix: member}, []))
        except tarfile.ReadError as exc:  # a header cut short or overwritten
            if tar.offset + _BLOCK > size:
                index.truncated = f"the file ends at byte {size}, inside a member's header or data (a copy cut short?)"
            else:
                index.truncated = f"the tar structure is damaged at byte {tar.offset} ({exc})"
        end = tar.offset
    if index.truncated is None and not _has_end_blocks(path, end, size):
        index.truncated = f"the file ends at byte {size} without tar's end-of-archive blocks (a copy cut short?)"
    first, suffixes, offsets, sizes = [0], [], [], []
    for key, members, duplicated in groups:
        if key in seen_keys:
            index.problems.append((f"{key}#{seen_keys[key] + 1}", f"sample key {key!r} appears again after other samples "
                                   "(a duplicate; the first copy is used, this one skipped)"))
            seen_keys[key] += 1
            continue
        seen_keys[key] = 1
        if duplicated:
            index.problems.append((key, f"member {key}.{duplicated[0]} appears twice in a row; which copy is meant is "
                                   "unknown, so the sample is skipped"))
            continue
        index.keys.append(key)
        for suffix, (offset, size) in members.items():
            suffixes.append(sys.intern(suffix))
            offsets.append(offset)
            sizes.append(size)
        first.append(len(suffixes))
    index.first, index.offsets, index.sizes = np.asarray(first, np.int64), np.asarray(offsets, np.int64), np.asarray(sizes, np.int64)
    index.suffixes = suffixes
    return index


def _has_end_blocks(path: str, end: int, size: int) -> bool:
    """A tar written to the end closes with two zero blocks after its last member."""
    if size - end < 2 * _BLOCK:
        return False
    with open(path, "rb") as f:
        f.seek(end)
        return f.read(2 * _BLOCK) == bytes(2 * _BLOCK)


def display_names(paths: list[str]) -> list[str]:
    """Short, unique names for shards in sample keys: the file name, or the path below the shards' common folder
    when two folders hold shards of the same name (``a/heldout-000000.tar`` and ``b/heldout-000000.tar``)."""
    names = [Path(p).name for p in paths]
    if len(set(names)) == len(names):
        return names
    common = Path(os.path.commonpath([str(Path(p).resolve().parent) for p in paths]))
    return [str(Path(p).resolve().relative_to(common)) for p in paths]


class ShardReader:
    """Reads samples by (shard number, sample number), indexing each shard on first use. ``cache`` bounds how many
    indexes are kept (None: all, so DataLoader workers forked from a process that indexed everything read no header
    again; a small number for a single pass over the data)."""

    def __init__(self, paths: list[str], cache: int | None = None) -> None:
        self.paths = list(paths)
        self.names = display_names(self.paths)
        self._indexes: OrderedDict[int, ShardIndex] = OrderedDict()
        self._cache = cache

    def index(self, shard: int) -> ShardIndex:
        found = self._indexes.get(shard)
        if found is None:
            found = self._indexes[shard] = scan_shard(self.paths[shard])
            if self._cache is not None and len(self._indexes) > self._cache:
                self._indexes.popitem(last=False)
        else:
            self._indexes.move_to_end(shard)
        return found

    def key(self, shard: int, sample: int) -> str:
        return f"{self.names[shard]}:{self.index(shard).keys[sample]}"

    def read(self, shard: int, sample: int) -> dict[str, bytes]:
        """The sample's members as ``{suffix: bytes}``."""
        out = {}
        with open(self.paths[shard], "rb") as f:
            for suffix, offset, size in self.index(shard).members(sample):
                f.seek(offset)
                data = f.read(size)
                if len(data) != size:  # the file shrank after it was indexed
                    raise OSError(f"shard {self.paths[shard]} changed while training read it ({suffix} is cut short)")
                out[suffix] = data
        return out
