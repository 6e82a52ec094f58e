"""A run's directory: one process at a time, a fresh start or a resume, what ``overwrite`` may replace, and the
JSONL logs (metrics, the sample keys each step trained on) that a resumed run continues without duplicates.

What a run writes: ``recipe.yaml`` (resolved), ``metrics.jsonl``, ``samples.jsonl`` (with ``log_sample_keys``),
``checkpoints/step-N/`` + ``checkpoints/latest``, ``result.json``, ``eval_predictions.jsonl``. ``overwrite: true``
moves exactly these aside into ``.replaced/`` (nothing else in the folder is touched) and deletes them only once
the new run has written its first complete checkpoint, so a new run that dies early loses nothing.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import CHECKPOINTS, complete_checkpoints, latest_checkpoint, remove_unfinished, verify
from .errors import CheckpointError, MmdomainError
from .recipe import Recipe, dump_recipe

log = logging.getLogger(__name__)

RUN_FILES = ("recipe.yaml", "metrics.jsonl", "samples.jsonl", "result.json", "eval_predictions.jsonl", CHECKPOINTS, "checkpoint")
REPLACED = ".replaced"
LOCK = ".lock"

# Recipe fields a resumed run may change (each change is logged); any other change is refused unless accepted,
# because the continuation would no longer be the run the checkpoint belongs to.
RESUMABLE_CHANGES = (
    "optim.lr", "lr.", "optim.max_steps", "optim.epochs", "optim.warmup_steps", "optim.schedule", "optim.min_lr_ratio",
    "optim.clip_grad_norm", "optim.gradient_checkpointing", "eval.", "data.eval", "data.num_workers", "data.decode_error_budget", "save_every", "keep_last",
    "log_every", "log_sample_keys", "threads", "device", "overwrite", "resume", "output_dir", "init_from", "stage",
    "card",  # the model card's declarations say what the model is for, not how it trains
    "data.train",  # the shards themselves are compared (check_resume_data): the same files moved elsewhere are fine
    "distributed.",  # what must match (world size, where the optimizer state lives) is checked by dist_checkpoint.check_same_world
)  # (another thread count or device still trains the same run, though CPU sums may then round differently)


class RunDirectoryError(MmdomainError, RuntimeError):
    """An output_dir that cannot take this run (it holds another run, another process writes it, ...)."""


class ResumeError(MmdomainError, RuntimeError):
    """A resume that would not continue the same run: nothing to resume, or the recipe or data changed."""


def holds_run(run_dir: Path) -> bool:
    return any((run_dir / name).exists() for name in RUN_FILES)


class RunLock:
    """An exclusive lock on the run directory for this process's lifetime, released by the OS when the process dies,
    kill -9 included. (A forked child shares the lock; ``close_in_child`` drops the child's hold, so a DataLoader
    worker outliving a killed run for a few seconds does not keep the directory locked.)"""

    _held: set[int] = set()

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip()
            os.close(self._fd)
            self._fd = None
            raise RunDirectoryError(f"another mmdomain process{f' (pid {holder})' if holder else ''} is running into "
                                    f"{self.path.parent}; wait for it, or choose another output_dir") from None
        except OSError as exc:  # a filesystem without locks (some network mounts)
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            raise RunDirectoryError(f"cannot lock {self.path} ({exc.strerror}); the output_dir's filesystem does not support "
                                    "file locks: choose an output_dir on a local disk") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, str(os.getpid()).encode(), 0)
        RunLock._held.add(self._fd)

    def release(self) -> None:
        if self._fd is not None:
            RunLock._held.discard(self._fd)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @classmethod
    def close_in_child(cls) -> None:
        """In a forked child: close (never unlock: that would unlock the parent too) the inherited lock descriptors."""
        for fd in list(cls._held):
            try:
                os.close(fd)
            except OSError:
                pass
        cls._held.clear()


@dataclass
class RunStart:
    run_dir: Path
    lock: RunLock
    resume_from: Path | None
    """The checkpoint to continue from, or None for a fresh start."""


def open_run(recipe: Recipe) -> RunStart:
    """Take the output directory for this run: lock it, then resume from its newest usable checkpoint (``resume``
    true or auto; resuming takes precedence over ``overwrite``) or start fresh (refused over another run unless
    ``overwrite``)."""
    run_dir = Path(recipe.output_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirectoryError(f"output_dir {str(run_dir)!r} cannot be created: {exc.strerror}") from None
    lock = RunLock(run_dir)
    lock.acquire()
    try:
        removed = remove_unfinished(run_dir)
        if removed:
            log.info("removed %d unfinished checkpoint writes from an earlier, interrupted run", len(removed))
        _restore_interrupted_overwrite(run_dir)
        if recipe.resume:
            usable = newest_usable_checkpoint(run_dir)
            if usable is not None:
                if recipe.overwrite:
                    log.info("resuming %s (overwrite applies only when there is nothing to resume)", run_dir)
                return RunStart(run_dir, lock, usable)
        if not holds_run(run_dir):
            if recipe.resume is True:
                raise ResumeError(f"nothing to resume in {run_dir}: it holds no run; start it without --resume")
            return RunStart(run_dir, lock, None)
        if recipe.resume and _never_saved(run_dir):
            log.warning("%s holds a run that stopped before its first checkpoint: starting it again from step 0", run_dir)
            _clear_run_files(run_dir)
            return RunStart(run_dir, lock, None)
        if recipe.resume is True:
            raise ResumeError(f"{run_dir} holds a run but no checkpoint this mmdomain can continue from ({_what_is_there(run_dir)}); "
                              "start it again with overwrite=true (the old files are kept until the new run's first checkpoint), "
                              "or choose another output_dir")
        if not recipe.overwrite:
            newest = latest_checkpoint(run_dir)
            step = f" (complete up to step {complete_checkpoints(run_dir)[-1][0]})" if newest is not None else ""
            raise RunDirectoryError(f"output_dir {str(run_dir)!r} already holds a run{step}; continue it with --resume, choose "
                                    "another output_dir, or set overwrite=true to replace it")
        _set_aside(run_dir)
        return RunStart(run_dir, lock, None)
    except BaseException:
        lock.release()
        raise


def _restore_interrupted_overwrite(run_dir: Path) -> None:
    """An overwrite that died before the new run's first checkpoint leaves the old run in ``.replaced/``: it is still
    this directory's run, so it goes back in place (the dead attempt's own files never held a checkpoint)."""
    aside = run_dir / REPLACED
    if not aside.is_dir():
        return
    if latest_checkpoint(run_dir) is not None:  # the new run saved; only the deletion of the old one was cut short
        shutil.rmtree(aside, ignore_errors=True)
        return
    if not _never_saved(run_dir):
        log.warning("%s holds both a replaced run (%s) and files of another; neither is touched: keep the one you want", run_dir, aside)
        return
    _clear_run_files(run_dir)
    for path in aside.iterdir():
        os.replace(path, run_dir / path.name)
    aside.rmdir()
    log.warning("an overwrite of %s stopped before the new run saved a checkpoint: the previous run is back in place", run_dir)


def newest_usable_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint whose files are whole; a damaged newer one is skipped with a warning that says
    what is wrong with it, so a bad disk block costs the steps since the previous save, not the run."""
    for _, directory in reversed(complete_checkpoints(run_dir)):
        try:
            verify(directory)
            return directory
        except CheckpointError as exc:
            log.warning("not resuming from %s: %s; trying the checkpoint before it (delete %s once you have looked at it)",
                        directory, exc, directory)
    return None


def _never_saved(run_dir: Path) -> bool:
    """Only the files of an attempt that died before its first checkpoint (nothing of value to keep): no checkpoint
    of any kind (not even a folder someone copied in without its marker) and no result."""
    checkpoints = run_dir / CHECKPOINTS
    saved = [p for p in checkpoints.iterdir() if p.name != "latest"] if checkpoints.is_dir() else []
    return not (run_dir / "checkpoint").exists() and not (run_dir / "result.json").exists() and not saved


def _what_is_there(run_dir: Path) -> str:
    if (run_dir / "checkpoint").exists():
        return "checkpoint/ was written by an older mmdomain (format 1)"
    if latest_checkpoint(run_dir) is not None:
        return "every checkpoint in checkpoints/ is damaged"
    return "result.json says it finished, but checkpoints/ holds no complete checkpoint"


def _clear_run_files(run_dir: Path) -> None:
    for name in RUN_FILES:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _set_aside(run_dir: Path) -> None:
    """Move the previous run's files into ``.replaced/``, kept until the new run's first checkpoint."""
    aside = run_dir / REPLACED
    aside.mkdir()
    for name in RUN_FILES:
        if (run_dir / name).exists():
            os.replace(run_dir / name, aside / name)
    log.info("overwrite: the previous run in %s was moved to %s; it is deleted once this run saves its first checkpoint", run_dir, aside)


def drop_replaced(run_dir: Path) -> None:
    aside = run_dir / REPLACED
    if aside.exists():
        shutil.rmtree(aside, ignore_errors=True)
        log.info("removed %s (the replaced run): this run has a complete checkpoint now", aside)


def write_recipe(run_dir: Path, recipe: Recipe) -> None:
    (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))


class JsonLog:
    """Appends one JSON object per line (``metrics.jsonl``, ``samples.jsonl``), flushed per line so a kill loses at
    most the line being written."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def start_fresh(self) -> "JsonLog":
        self.path.write_text("")
        return self

    def continue_after(self, step: int) -> "JsonLog":
        """Keep only the lines of steps up to ``step`` (the checkpoint resumed from): the stopped run may have logged
        steps past it, which the resumed run logs again."""
        if not self.path.exists():
            return self.start_fresh()
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # the line a kill cut short
            if isinstance(row, dict) and int(row.get("step", 0)) <= step:
                kept.append(line)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)
        return self

    def write(self, **row: Any) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def recipe_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """Dotted fields whose values differ between two recipe dicts: ``(field, old, new)``."""
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        dotted = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            changes += recipe_changes(a, b, dotted + ".")
        elif a != b:
            changes.append((dotted, a, b))
    return changes


def check_resume_changes(checkpoint: Path, old: dict[str, Any], new: dict[str, Any], accept: bool) -> list[tuple[str, Any, Any]]:
    """Log the recipe's allowed changes; refuse the others unless ``accept``. Returns every change."""
    # resume and overwrite say how this run was started, not what it trains
    changes = [c for c in recipe_changes(old, new) if c[0] not in ("resume", "overwrite")]
    for name, a, b in changes:
        log.info("resume: %s changed from %r to %r", name, a, b)
    _refuse(checkpoint, [c for c in changes if not c[0].startswith(RESUMABLE_CHANGES)], accept)
    return changes


def check_resume_data(checkpoint: Path, before: list[list[Any]], now: list[list[Any]], accept: bool) -> None:
    """The data position means nothing over other shards: refuse changed shard files unless ``accept``. Shards are
    compared by file name, size and sample count, so data copied elsewhere (a local disk on a cluster) still matches."""
    same = lambda facts: [[Path(d[0]).name, *d[1:]] for d in facts]  # noqa: E731
    if same(before) == same(now):
        return
    old, new = {Path(d[0]).name: d[1:] for d in before}, {Path(d[0]).name: d[1:] for d in now}
    gone, added = sorted(set(old) - set(new)), sorted(set(new) - set(old))
    changed = sorted(p for p in set(old) & set(new) if old[p] != new[p])
    what = "; ".join(f"{label}: {paths[0]}" + (f" and {len(paths) - 1} more" if len(paths) > 1 else "")
                     for label, paths in (("missing", gone), ("new", added), ("changed size or sample count", changed)) if paths)
    _refuse(checkpoint, [("data (shard files)", f"{len(before)} shards as recorded", f"{len(now)} shards ({what or 'reordered'})")], accept)


def _refuse(checkpoint: Path, refused: list[tuple[str, Any, Any]], accept: bool) -> None:
    if refused and not accept:
        listed = "; ".join(f"{name}: {a!r} -> {b!r}" for name, a, b in refused)
        raise ResumeError(f"resuming {checkpoint} with changes that make it another run ({listed}): undo them, start a new run "
                          "(another output_dir), or pass --accept-changes to continue anyway")
    if refused:
        log.warning("resume: continuing despite changes that make it another run (--accept-changes): %s", [name for name, _, _ in refused])


