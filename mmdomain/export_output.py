"""Where an export is written: a temporary folder beside OUT, renamed into place whole, never half over a good one."""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .checkpoint import fsync_path, write_marker
from .errors import MmdomainError

log = logging.getLogger(__name__)


class ExportError(MmdomainError, ValueError):
    """An export that cannot be made: the source run, the output folder or an unsupported combination, named."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class ExportWriter:
    """Write an export folder atomically::

        with ExportWriter("exports/cxr", overwrite=False) as out:
            model.save_pretrained(out.path)        # out.path is the temporary folder

    An existing ``target`` is refused unless ``overwrite``; then it is replaced only once the new export is complete
    (renamed aside, the new one renamed in, the old one removed). On an error the temporary folder is removed and the
    target is untouched. ``marker=True`` also writes a checkpoint ``COMPLETE`` marker (files and sizes), so mmdomain's
    ``load_pretrained`` takes the folder as a checkpoint (the native format).
    """

    def __init__(self, target: str | Path, *, overwrite: bool = False, marker: bool = False) -> None:
        self.target = Path(target)
        self.overwrite = overwrite
        self.marker = marker
        self.path = self.target.with_name(f".{self.target.name}.tmp-{os.getpid()}")

    def __enter__(self) -> "ExportWriter":
        if self.target.exists() and not self.overwrite:
            raise ExportError(f"{self.target} exists; choose a new OUT, or pass --overwrite to replace it (it is replaced only once "
                              "the new export is complete)")
        if self.target.exists() and not self.target.is_dir():
            raise ExportError(f"{self.target} is a file, not a folder; choose another OUT")
        self.target.parent.mkdir(parents=True, exist_ok=True)
        for leftover in [*self.target.parent.glob(f".{self.target.name}.tmp-*"), *self.target.parent.glob(f".{self.target.name}.old-*")]:
            # An export killed while writing leaves its temporary folder; one killed while replacing OUT leaves the
            # previous export renamed aside (a whole model's size, hidden). Those whose process is gone (or us) go:
            # this export is about to take OUT's place.
            pid = leftover.name.rpartition("-")[2]
            if pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
                if ".old-" in leftover.name:
                    log.warning("removing %s, the previous export of %s left aside by an export killed while replacing it",
                                leftover, self.target)
                shutil.rmtree(leftover, ignore_errors=True)
        self.path.mkdir()
        return self

    # The methods builder.write_model calls on a checkpoint writer, so a native export reuses it.

    def tensors(self, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(self.path / name),
                  metadata={"format": "pt", **(metadata or {})})

    def json(self, name: str, data: Any) -> None:
        (self.path / name).parent.mkdir(parents=True, exist_ok=True)
        (self.path / name).write_text(json.dumps(data, indent=2) + "\n")

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        if kind is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        try:
            self._commit()
        except BaseException:
            shutil.rmtree(self.path, ignore_errors=True)
            raise

    def _commit(self) -> None:
        if self.marker:
            write_marker(self.path, None)
        else:
            for path in sorted(self.path.rglob("*")):
                if path.is_file():
                    fsync_path(path)
            fsync_path(self.path)
        old = None
        if self.target.exists():
            old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
            if old.exists():
                shutil.rmtree(old)
            os.replace(self.target, old)
        os.replace(self.path, self.target)
        fsync_path(self.target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
