"""The review page's judgements file: one JSON line per judged item, appended and fsynced as it is made, with the
item's media copied beside it, so a closed tab, a killed server or a crash loses nothing that was confirmed.

Lines follow the preference-pair format ``make-shards`` takes: ``{"media": [paths relative to the media folder],
"prompt", "chosen", "rejected", "judge", "judged_at", "key", ...}``; a flagged item has ``"flagged": true`` and no
chosen/rejected. The media folder is ``<out without .jsonl>.media/`` (``judgements.jsonl`` -> ``judgements.media/``):
``make-shards --jsonl judgements.jsonl --media judgements.media``.

One server writes a file at a time (an advisory lock). Reopening the file resumes: its keys are the judged items.
A crash can leave at most one incomplete last line (a write cut short); it is dropped with a warning and that item is
shown again. Anything else that is not a judgement line stops with the line number, since appending to a file
whose content is not understood could bury the problem.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import fsync_path
from .errors import MmdomainError

log = logging.getLogger(__name__)


class ReviewError(MmdomainError, ValueError):
    """A review that cannot start or a judgement that cannot be recorded; the message names the file or field and the fix."""


def media_folder(out: Path) -> Path:
    """``judgements.jsonl`` -> ``judgements.media`` beside it."""
    return out.with_name(f"{out.stem if out.suffix == '.jsonl' else out.name}.media")


def media_file_stem(key: str) -> str:
    """A file-name stem for an item key: readable characters kept, the rest replaced, and a short hash of the whole
    key, so two keys that differ only in replaced characters (``a:b`` and ``a_b``) never share a file. No dots: a
    webdataset key ends at the first dot, and make-shards names members ``{key}.{i}.{ext}``."""
    readable = re.sub(r"[^A-Za-z0-9_-]", "_", key)[:80]
    return f"{readable}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


@dataclass(frozen=True)
class MediaCopy:
    """One media member of an item as it goes into the media folder: ``suffix`` is the shard member's type part
    (``dcm``, ``nii.gz``, ``dcm.tar``), ``data`` the bytes, already stripped by the domain's shard rule."""

    suffix: str
    data: bytes


class JudgementStore:
    """The judgements JSONL of one review: judged keys on open, then ``append`` per judgement."""

    def __init__(self, out: str | Path) -> None:
        self.path = Path(out)
        if self.path.is_dir():
            raise ReviewError(f"--out {self.path} is a folder; give a file name such as {self.path / 'judgements.jsonl'}")
        if not self.path.parent.is_dir():
            raise ReviewError(f"the folder of --out {self.path} does not exist; create {self.path.parent} first")
        self.media_dir = media_folder(self.path)
        self._created = not self.path.exists()
        self._file = open(self.path, "a+b")
        self._lock()
        self.lines: list[dict[str, Any]] = self._read_and_repair()
        self.judged: set[str] = {line["key"] for line in self.lines}

    # -- opening ----------------------------------------------------------------------------------------------------

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks here; one server per file is then the user's care
            return
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._file.close()
            raise ReviewError(f"another `mmdomain review` is writing to {self.path}; stop it first, or give this one another --out") from None

    def _read_and_repair(self) -> list[dict[str, Any]]:
        self._file.seek(0)
        data = self._file.read()
        complete, _, tail = data.rpartition(b"\n")
        lines: list[dict[str, Any]] = []
        for number, raw in enumerate(complete.split(b"\n") if complete else [], start=1):
            if raw.strip():
                lines.append(self._parse(raw, number))
        if tail.strip():
            number = complete.count(b"\n") + 2 if complete else 1
            try:
                json.loads(tail)
            except (json.JSONDecodeError, UnicodeDecodeError):
                # The one thing a crash can leave: a line cut short by the kill. It was never confirmed to the page.
                log.warning("%s: dropped an incomplete last line (%d bytes, line %d), left by a crash or a kill while it was "
                            "written; that item will be shown again", self.path, len(tail), number)
                self._file.truncate(len(complete) + 1 if complete else 0)
            else:  # complete JSON whose newline was not written yet: keep it (if it is a judgement), end it
                lines.append(self._parse(tail, number))
                self._file.write(b"\n")
            self._file.flush()
            os.fsync(self._file.fileno())
        return lines

    def _parse(self, raw: bytes, number: int) -> dict[str, Any]:
        try:
            line = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ReviewError(f"{self.path} line {number} is not JSON ({exc}); this file was not written by `mmdomain review` "
                              "or was edited: fix or remove that line, or give another --out") from None
        if not isinstance(line, dict) or not isinstance(line.get("key"), str):
            raise ReviewError(f"{self.path} line {number} has no item 'key'; this file was not written by `mmdomain review`: "
                              "give another --out")
        return line

    # -- writing ----------------------------------------------------------------------------------------------------

    def append(self, line: dict[str, Any], media: list[MediaCopy]) -> dict[str, Any]:
        """Write the item's media files (each complete under its final name before the line names it), then the line,
        fsynced before this returns. Returns the line as written (with its ``media`` paths)."""
        key = line["key"]
        if key in self.judged:
            raise ReviewError(f"item {key} is judged already (in {self.path}); each item is judged once per file")
        names = self._write_media(key, media)
        written = {"media": names, **{k: v for k, v in line.items() if k != "media"}}
        self._file.seek(0, os.SEEK_END)
        self._file.write((json.dumps(written, ensure_ascii=False) + "\n").encode())
        self._file.flush()
        os.fsync(self._file.fileno())
        self.lines.append(written)
        self.judged.add(key)
        return written

    def _write_media(self, key: str, media: list[MediaCopy]) -> list[str]:
        if not media:
            return []
        self.media_dir.mkdir(exist_ok=True)
        stem, names = media_file_stem(key), []
        for i, item in enumerate(media):
            name = f"{stem}.{i}.{item.suffix}"
            tmp = self.media_dir / f".{name}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(item.data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.media_dir / name)
            names.append(name)
        fsync_path(self.media_dir)
        return names

    def close(self) -> None:
        self._file.close()  # closing the file releases the lock

    def abandon(self) -> None:
        """Close after a review that never started: the file goes again if this store created it and wrote nothing."""
        self.close()
        if self._created and not self.lines and self.path.is_file() and self.path.stat().st_size == 0:
            self.path.unlink()

    def __enter__(self) -> "JudgementStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
