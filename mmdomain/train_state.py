"""What a run checkpoint adds to the model so training continues as if it never stopped: optimizer moments, the
random streams, the data position, the failures counted, the loss history. Tensors go to safetensors, the rest to
JSON; nothing needs pickle to read back.

Optimizer state is keyed by parameter *name* (not torch's positional ids), so a resumed run that builds its
optimizer again finds each moment for the right parameter, and a changed set of trained parameters is named.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import CheckpointWriter, read_json, read_tensors
from .errors import CheckpointError

OPTIMIZER = "optimizer.safetensors"
RNG = "rng.safetensors"
STATE = "trainer_state.json"


@dataclass
class TrainerState:
    """Scalars of a run at a step boundary."""

    step: int
    total_steps: int
    epoch: int
    batch: int
    """Batches of ``epoch`` this rank has consumed."""
    failures: dict[str, list[Any]]
    first_loss: float | None
    recent_losses: list[float]
    window: dict[str, float]
    """Sums of the metrics interval in progress, so the next metrics row covers the same steps as without a stop."""
    recipe: dict[str, Any]
    data: list[list[Any]]
    """The training shards (path, size, usable samples) the position refers to."""
    resumed_at: list[int] = field(default_factory=list)
    seconds: float = 0.0
    """Wall time of the run up to this checkpoint, over all the sessions that made it."""
    world_size: int = 1
    """Processes the run trains on (torchrun); the data position and random streams are per rank."""
    strategy: str = "none"
    """none (one process), ddp or fsdp: where the optimizer state lives (optimizer.safetensors, or sharded in DCP)."""
    grad_scaler: dict[str, Any] | None = None
    """fp16's loss-scale state (torch.amp.GradScaler.state_dict())."""
    skipped_steps: int = 0
    """fp16 steps the scaler skipped because the scaled gradients overflowed."""


def _optimizer_names(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> list[str]:
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def write_training(writer: CheckpointWriter, state: TrainerState, optimizer: torch.optim.Optimizer, model: torch.nn.Module, *,
                   ranks_rng: list[tuple[dict[str, torch.Tensor], dict[str, Any]]] | None = None, sharded_optimizer: str | None = None) -> None:
    """``ranks_rng``: every rank's ``capture_rng()`` (rank 0's under the plain names, rank r's under ``rank{r}/``);
    ``sharded_optimizer``: the folder where DCP wrote the optimizer state instead of optimizer.safetensors."""
    names = {id(p): n for n, p in model.named_parameters()}
    if sharded_optimizer is None:
        tensors: dict[str, torch.Tensor] = {}
        for param_name, param in zip(_optimizer_names(optimizer, names), (p for g in optimizer.param_groups for p in g["params"])):
            for field_name, value in optimizer.state.get(param, {}).items():
                tensors[f"{param_name}/{field_name}"] = value if torch.is_tensor(value) else torch.tensor(value)
        writer.tensors(OPTIMIZER, tensors)
    ranks_rng = ranks_rng or [capture_rng()]
    rng_tensors = dict(ranks_rng[0][0])
    for rank, (tensors_of_rank, _) in enumerate(ranks_rng[1:], start=1):
        rng_tensors.update({f"rank{rank}/{k}": v for k, v in tensors_of_rank.items()})
    writer.tensors(RNG, rng_tensors)
    record = {"params": _optimizer_names(optimizer, names),
              "groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups],
              **({"sharded": sharded_optimizer} if sharded_optimizer else {})}
    writer.json(STATE, {**asdict(state), "optimizer": record, "rng": ranks_rng[0][1],
                        **({"rng_ranks": [j for _, j in ranks_rng[1:]]} if len(ranks_rng) > 1 else {})})


def read_trainer_state(directory: Path) -> TrainerState:
    data = read_json(directory / STATE)
    known = set(TrainerState.__dataclass_fields__)
    try:
        return TrainerState(**{k: v for k, v in data.items() if k in known})
    except TypeError as exc:
        raise CheckpointError(f"{directory / STATE} is not a trainer state of this mmdomain ({exc})") from None


def restore_training(directory: Path, optimizer: torch.optim.Optimizer, model: torch.nn.Module, *, rank: int = 0) -> None:
    """Load optimizer moments (by parameter name) and this rank's random streams saved in ``directory``. Optimizer
    state sharded by DCP (FSDP runs) is left to ``dist_checkpoint.load_sharded_optimizer``."""
    data = read_json(directory / STATE)
    if not isinstance(data.get("optimizer"), dict) or "params" not in data["optimizer"] or "rng" not in data:
        raise CheckpointError(f"{directory / STATE} lacks the optimizer or random-stream records; it was not written by this mmdomain")
    names = {id(p): n for n, p in model.named_parameters()}
    mine = _optimizer_names(optimizer, names)
    theirs = data["optimizer"]["params"]
    if sorted(mine) != sorted(theirs):
        missing, extra = sorted(set(theirs) - set(mine)), sorted(set(mine) - set(theirs))
        raise CheckpointError(f"{directory}: the parameters that train are not the checkpoint's (only there: {missing[:3]}; only "
                              f"here: {extra[:3]}): the model or trainable settings changed, which no resume can bridge; resume "
                              "with the settings the run was started with, or start a new run (init_from this one)")
    if not data["optimizer"].get("sharded"):
        _restore_optimizer(directory, optimizer, mine)
    try:
        tensors = read_tensors(directory / RNG)
        if rank:
            tensors = {k.removeprefix(f"rank{rank}/"): v for k, v in tensors.items() if k.startswith(f"rank{rank}/")}
        restore_rng(tensors, data["rng"] if not rank else data["rng_ranks"][rank - 1])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
        raise CheckpointError(f"{directory}: the random-stream records cannot be restored ({type(exc).__name__}: {exc})") from None


def _restore_optimizer(directory: Path, optimizer: torch.optim.Optimizer, mine: list[str]) -> None:
    stored = read_tensors(directory / OPTIMIZER)
    fresh = optimizer.state_dict()
    by_name = dict(zip(mine, (i for g in fresh["param_groups"] for i in g["params"])))
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in stored.items():
        param_name, _, field_name = key.rpartition("/")
        if param_name not in by_name:
            raise CheckpointError(f"{directory / OPTIMIZER}: state for unknown parameter {param_name!r}")
        state.setdefault(by_name[param_name], {})[field_name] = tensor
    optimizer.load_state_dict({"state": state, "param_groups": fresh["param_groups"]})


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every random stream training draws from: torch (CPU and each CUDA device), NumPy's and Python's globals."""
    tensors = {"torch_cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # The training device's stream only: asking every visible GPU would create a context (and memory) on each.
        tensors["torch_cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64))
    version, internal, gauss_next = random.getstate()
    return tensors, {"numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
                     "python": {"version": version, "state": list(internal), "gauss_next": gauss_next}}


def restore_rng(tensors: dict[str, torch.Tensor], data: dict[str, Any]) -> None:
    torch.random.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"], torch.cuda.current_device())
    np_state = data["numpy"]
    np.random.set_state((np_state["kind"], tensors["numpy_keys"].numpy().astype(np.uint32), np_state["pos"], np_state["has_gauss"],
                         np_state["cached_gaussian"]))
    py = data["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
