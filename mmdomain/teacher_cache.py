"""The teacher's answer cache: one JSONL line per settled request, appended and fsynced as each answer arrives, so a
run stopped at any point resumes without sending (or paying for) any request it already settled."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

from .errors import MmdomainError

log = logging.getLogger(__name__)


class TeacherCacheError(MmdomainError, ValueError):
    """A cache file that cannot be read back; the message names the file and line."""


def cache_key(teacher_id: str, model: str, template_id: str, prompt: str, seed: int) -> str:
    """sha256 of everything that decides the reply: the same key means the same request."""
    return hashlib.sha256(json.dumps([teacher_id, model, template_id, prompt, seed]).encode()).hexdigest()


class TeacherCache:
    """``get(key)`` -> the stored entry (``{"reply": str|None, "reason": str|None, "attempts": int}``) or None;
    ``put(key, entry)`` appends it durably. Safe to call from several threads."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._entries: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        offset = 0
        for number, line in enumerate(lines, 1):
            start, offset = offset, offset + len(line) + 1
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                self._entries[record["key"]] = record
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
                if number == len(lines):
                    # A run killed mid-write leaves a partial last line (no newline yet): cut it off, so appends
                    # start on a clean line; that one answer is asked again.
                    log.warning("%s: dropping a partial last line (a run stopped while writing it)", self.path)
                    with open(self.path, "r+b") as f:
                        f.truncate(start)
                    continue
                raise TeacherCacheError(f"teacher cache {self.path} line {number} is not a cache record ({exc}); "
                                        "delete the file to start afresh (its answers will be asked again)") from exc

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> dict[str, Any] | None:
        return self._entries.get(key)

    def put(self, key: str, entry: dict[str, Any]) -> None:
        record = {"key": key, **entry}
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            self._entries[key] = record
