"""Saving and resuming a run that trains on several ranks, in the same crash-safe checkpoint layout as one process.

Rank 0 opens the checkpoint's temporary directory (``CheckpointWriter``) and tells the others its path; what is
sharded is written there by every rank with torch Distributed Checkpoint (DCP: FSDP2's optimizer moments, one file
per rank plus DCP's metadata, under ``optimizer/``); rank 0 writes the rest (the full model weights, gathered from
the shards, so evaluation, export and ``init_from`` read an FSDP run's checkpoint like any other; each rank's random
streams; the trainer state) and only then the marker and the rename. A crash at any moment, on any rank, leaves the
previous checkpoint as it was. The run directory must be on a filesystem every rank sees (as DCP requires).

Resuming needs the same world size: each rank's data position and random streams belong to that rank. The model
weights would load at any size (they are whole) and DCP can reshard the optimizer, but no other size continues the
same run, so it is refused with the size to start with.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .builder import write_model
from .checkpoint import CheckpointWriter
from .distributed import World
from .errors import CheckpointError
from .run_dir import ResumeError
from .train_state import TrainerState, capture_rng, write_training

log = logging.getLogger(__name__)

SHARDED_OPTIMIZER = "optimizer"


def save_distributed(world: World, target: Path, step: int, *, model: nn.Module, processor: Any, bases: dict[str, Any],
                     optimizer: torch.optim.Optimizer, state: TrainerState) -> None:
    """Write checkpoint ``target`` of a multi-rank run; called by every rank, in step."""
    ranks_rng = world.gather(capture_rng())
    full = None
    if world.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))  # whole on rank 0 only
    if not world.is_main:
        path = world.broadcast(None)
        if path is None:
            raise CheckpointError(f"rank 0 could not start checkpoint {target} (its error says why)")
        if world.strategy == "fsdp":
            _save_sharded_optimizer(model, optimizer, Path(path) / SHARDED_OPTIMIZER)
        outcome = world.broadcast(None)
        if outcome != "ok":
            raise CheckpointError(f"checkpoint {target} failed on rank 0: {outcome}")
        return
    writer = CheckpointWriter(target, step=step)
    try:
        writer.__enter__()
    except BaseException:
        world.broadcast(None)
        raise
    world.broadcast(str(writer.path))
    try:
        try:
            sharded = None
            if world.strategy == "fsdp":
                _save_sharded_optimizer(model, optimizer, writer.path / SHARDED_OPTIMIZER)
                sharded = SHARDED_OPTIMIZER
            write_model(writer, model, processor, bases, full=full)
            write_training(writer, state, optimizer, model, ranks_rng=ranks_rng, sharded_optimizer=sharded)
        except BaseException as exc:
            writer.__exit__(type(exc), exc, exc.__traceback__)
            raise
        writer.__exit__(None, None, None)  # fsyncs, writes the marker, renames into place
    except BaseException as exc:
        world.broadcast(f"{type(exc).__name__}: {exc}")
        raise
    world.broadcast("ok")


def _save_sharded_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=str(directory))


def load_sharded_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, checkpoint: Path) -> None:
    """Load the DCP-sharded optimizer state of ``checkpoint`` into this rank's shards; every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    directory = checkpoint / SHARDED_OPTIMIZER
    if not directory.is_dir():
        raise CheckpointError(f"{checkpoint} records a sharded optimizer state but has no {SHARDED_OPTIMIZER}/ folder; use an earlier checkpoint")
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}  # the shapes to load into (fresh moments)
    dcp.load(state, checkpoint_id=str(directory))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def check_same_world(checkpoint: Path, saved: TrainerState, world: World) -> None:
    """Refuse to continue a run on another number of ranks or another strategy than it was saved with."""
    if saved.world_size != world.size:
        launch = (f"torchrun --nproc-per-node {saved.world_size} --no-python mmdomain run ... --resume" if saved.world_size > 1
                  else "mmdomain run ... --resume in one process")
        raise ResumeError(f"{checkpoint} was saved by a run on {saved.world_size} process(es); this one has {world.size}. Each rank's "
                          f"data position and random streams belong to that rank, so another count would not continue the same "
                          f"run: resume with {launch}, or start a new run from it with init_from: {checkpoint}")
    if saved.strategy != world.strategy and world.size > 1:
        raise ResumeError(f"{checkpoint} was saved with distributed.strategy {saved.strategy}; this run resolves to {world.strategy}, "
                          f"which keeps the optimizer state elsewhere: set distributed.strategy: {saved.strategy} to resume")
