"""Checkpoint directories on disk: written whole or not at all, found, verified and pruned. File I/O only.

A checkpoint is a directory of safetensors and JSON files. It is written into ``.{name}.tmp-{pid}`` beside its
final place, every file fsynced, then a ``COMPLETE`` marker listing each file and its size is written last, and the
directory is made visible by one rename (and the parent fsynced). A crash at any moment leaves either the complete
directory or a temporary one that readers ignore (and the next run removes), never a half-written checkpoint under
the final name. A run keeps its checkpoints as ``checkpoints/step-NNNNNNNN/`` with a ``latest`` pointer updated after
the rename; retention never deletes the newest complete one.

Nothing here knows what a model is: ``builder`` decides which tensors a model checkpoint holds, ``train_state`` what
a run adds (optimizer, RNG streams, data position).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

log = logging.getLogger(__name__)

FORMAT = "mmdomain-checkpoint/2"
MARKER = "COMPLETE"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
_STEP = re.compile(r"^step-(\d+)$")


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to the disk, so a rename after it never outlives its content.
    Some network and FUSE filesystems cannot fsync a directory (EINVAL): there it is skipped, their own guarantee."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if not (path.is_dir() and exc.errno in (errno.EINVAL, errno.ENOTSUP, errno.EBADF)):
            raise
    finally:
        os.close(fd)


def write_text_durably(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename, fsynced: readers see the old content or the new, never a part."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


class CheckpointWriter:
    """Write a checkpoint directory atomically::

        with CheckpointWriter(run_dir / "checkpoints" / "step-00000100", step=100) as ckpt:
            ckpt.tensors("model.safetensors", state)
            ckpt.json("trainer_state.json", {...})
            tokenizer.save_pretrained(ckpt.path / "tokenizer")

    On leaving the block without an error the directory appears under its final name, complete; on an error the
    temporary directory is removed, a ``target`` that already existed is untouched, and an ``OSError`` (disk full,
    permissions) becomes a ``CheckpointError`` naming the target.
    """

    def __init__(self, target: str | Path, *, step: int | None = None) -> None:
        self.target = Path(target)
        self.step = step
        self.path = self.target.with_name(f".{self.target.name}.tmp-{os.getpid()}")

    def __enter__(self) -> "CheckpointWriter":
        if self.target.exists() and read_marker(self.target) is None and (not self.target.is_dir() or any(self.target.iterdir())):
            raise CheckpointError(f"{self.target} exists and is not an mmdomain checkpoint; saving there would replace it whole: "
                                  "choose a new or empty directory")
        self.target.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # left by an earlier attempt of this same process id
            shutil.rmtree(self.path)
        self.path.mkdir()  # plain mkdir (not mkdtemp's 0700): teammates on a shared machine can read checkpoints
        return self

    def tensors(self, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(self.path / name),
                      metadata={"format": FORMAT, **(metadata or {})})
        except SafetensorError as exc:  # safetensors reports its I/O errors (a full disk too) as its own type
            text = str(exc)
            code = errno.ENOSPC if "os error 28" in text or "No space left" in text else errno.EIO
            raise OSError(code, text, str(self.path / name)) from exc

    def json(self, name: str, data: Any) -> None:
        (self.path / name).write_text(json.dumps(data, indent=2) + "\n")

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        if kind is None:
            try:
                self._commit()
                return
            except BaseException as error:  # noqa: BLE001 - cleaned up, then re-raised (named when it is an OSError)
                shutil.rmtree(self.path, ignore_errors=True)
                if isinstance(error, OSError):
                    raise self._named(error) from error
                raise
        shutil.rmtree(self.path, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, CheckpointError):
            raise self._named(exc) from exc

    def _named(self, error: OSError) -> CheckpointError:
        reason = "the disk is full" if error.errno == errno.ENOSPC else (error.strerror or str(error))
        where = f" ({error.filename})" if error.filename else ""
        return CheckpointError(f"could not write checkpoint {self.target}: {reason}{where}; nothing under that name was changed")

    def _commit(self) -> None:
        write_marker(self.path, self.step)
        _publish(self.path, self.target)


def write_marker(directory: Path, step: int | None) -> None:
    """Make every file under ``directory`` durable, then write the marker that lists them (name and size): a
    directory with a marker is complete, whatever was killed after."""
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            fsync_path(path)
            files[str(path.relative_to(directory))] = path.stat().st_size
    for path in sorted((p for p in directory.rglob("*") if p.is_dir()), reverse=True):
        fsync_path(path)
    with open(directory / MARKER, "w") as f:
        f.write(json.dumps({"format": FORMAT, "step": step, "files": files}, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    fsync_path(directory)


def _publish(tmp: Path, target: Path) -> None:
    """Make ``tmp`` visible as ``target`` in one rename. An existing ``target`` (a model saved again to the same
    directory) is first renamed aside and removed after, so a crash in between leaves the complete old or new
    directory under a name ``resolve_checkpoint`` reports. (A run never saves the same step twice, so in a run's
    checkpoints/ such leftovers are only litter, removed with the others.)"""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    os.replace(tmp, target)
    fsync_path(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_marker(directory: Path) -> dict[str, Any] | None:
    """The completion marker of ``directory``, or None when the directory is not a complete checkpoint."""
    marker = Path(directory) / MARKER
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def verify(directory: str | Path) -> dict[str, Any]:
    """Check that every file the marker lists is there with its recorded size; returns the marker.

    Raises ``CheckpointError`` naming the directory and the first missing or truncated file."""
    directory = Path(directory)
    marker = read_marker(directory)
    if marker is None:
        raise CheckpointError(f"{directory} is not a complete checkpoint (no {MARKER} marker): it was interrupted while being "
                              "written; use an earlier checkpoint")
    if marker.get("format") != FORMAT:
        raise CheckpointError(f"{directory} has format {marker.get('format')!r}; this mmdomain reads {FORMAT!r}")
    for name, size in marker["files"].items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing from checkpoint {directory}; the directory was changed after it was written")
        actual = path.stat().st_size
        if actual != size:
            raise CheckpointError(f"{path} has {actual} bytes but was written with {size}: the file is truncated or was replaced; "
                                  "use an earlier checkpoint (or restore this file from a backup)")
    return marker


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of one safetensors file; a damaged or foreign file is a ``CheckpointError`` naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0]}): it is truncated or corrupt; "
                              "use an earlier checkpoint") from None


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); the file is damaged") from None


# -- a run's checkpoints ----------------------------------------------------------------------------------------


def step_directory(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:08d}"


def complete_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, directory)`` of every complete checkpoint of a run, oldest first. Incomplete ones (a crash while
    writing) are skipped with a log line naming them."""
    root = Path(run_dir) / CHECKPOINTS
    found = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        match = _STEP.match(path.name)
        if not path.is_dir():
            continue
        if match is None:
            if path.name.startswith("."):
                log.info("ignoring %s: an unfinished checkpoint write (removed when a run next writes here)", path)
            continue
        if read_marker(path) is None:
            log.warning("ignoring %s: it has no %s marker, so it is not a checkpoint this mmdomain wrote whole (a copy in "
                        "progress?)", path, MARKER)
            continue
        found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run (the highest step; ``latest`` is a pointer for people and tools)."""
    found = complete_checkpoints(run_dir)
    return found[-1][1] if found else None


def point_latest(run_dir: str | Path, directory: Path) -> None:
    write_text_durably(Path(run_dir) / CHECKPOINTS / LATEST, directory.name + "\n")


_LEFTOVER = re.compile(r"^\.step-\d+\.(tmp-\d+|old-\d+|deleting)$")  # what CheckpointWriter, _publish and prune leave


def remove_unfinished(run_dir: str | Path) -> list[Path]:
    """Delete what interrupted checkpoint writes and deletions of this format leave (hidden ``.step-N.*`` folders).
    A ``step-N`` folder without a marker is never deleted: no write of ours leaves one, so it is a copy in progress
    or someone's edit, and readers just skip it."""
    root = Path(run_dir) / CHECKPOINTS
    removed = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if path.is_dir() and _LEFTOVER.match(path.name):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            log.info("removed %s, left by an interrupted checkpoint write", path)
    return removed


def prune(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Keep the newest ``keep_last`` complete checkpoints (at least one: the newest is never deleted). Each doomed one
    is renamed to a hidden name first, so a crash mid-delete never leaves a marked checkpoint with files missing."""
    found = complete_checkpoints(run_dir)
    doomed = [path for _, path in found[: max(0, len(found) - max(1, keep_last))]]
    for path in doomed:
        hidden = path.with_name(f".{path.name}.deleting")
        os.replace(path, hidden)
        shutil.rmtree(hidden, ignore_errors=True)
    return doomed


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its newest complete checkpoint). Errors say what was found."""
    path = Path(path)
    if read_marker(path) is not None:
        return path
    siblings = sorted(path.parent.glob(f".{path.name}.*")) if path.name else []
    complete_siblings = [s for s in siblings if read_marker(s) is not None]
    if complete_siblings and not path.exists():
        raise CheckpointError(f"{path} is missing, but {complete_siblings[-1]} is a complete checkpoint left by an interrupted "
                              f"save: rename it to {path}")
    if not path.exists():
        raise CheckpointError(f"{str(path)!r} does not exist; give a run directory (e.g. runs/x) or one of its checkpoints/step-N")
    newest = latest_checkpoint(path)
    if newest is not None:
        return newest
    for config in (path / "mmdomain_config.json", path / "checkpoint" / "mmdomain_config.json"):
        if config.is_file():
            if '"mmdomain-checkpoint/1"' in config.read_text():
                raise CheckpointError(f"{config.parent} is a checkpoint of an older mmdomain (format 1); re-run the stage with this version")
            raise CheckpointError(f"{config.parent} has no {MARKER} marker, so it was never completely written (or the marker was "
                                  "deleted); use another checkpoint")
    if (path / CHECKPOINTS).is_dir():
        raise CheckpointError(f"run {path} has no complete checkpoint yet (the run stopped before its first save)")
    raise CheckpointError(f"{str(path)!r} is neither a checkpoint nor a run directory with {CHECKPOINTS}/")
