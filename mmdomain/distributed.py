"""Where this process trains: its device and, under torchrun / accelerate launch, its rank in the process group and
how the model is wrapped (DDP or FSDP2). One process (no WORLD_SIZE, or 1) is the same code with world 1.

torchrun and ``accelerate launch`` set RANK, WORLD_SIZE and LOCAL_RANK (and MASTER_ADDR/PORT). Each rank trains on
``cuda:LOCAL_RANK`` (NCCL) or the CPU (gloo). Only rank 0 owns the run directory (lock, checkpoints' marker, logs);
every collective here is called by every rank in the same order, or the group hangs.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from .errors import MmdomainError

log = logging.getLogger(__name__)


class DistributedError(MmdomainError, RuntimeError):
    """A launch that cannot run as asked (a GPU per rank missing, an unknown strategy for this model)."""


def resolve_device(choice: str, local_rank: int | None = None) -> torch.device:
    """The recipe's ``device`` (auto|cpu|cuda) as the device this process trains on: ``cuda:LOCAL_RANK`` under a
    launcher, ``cuda`` alone otherwise. The one place a training device is decided."""
    from .recipe import RecipeError

    if choice == "cuda" and not torch.cuda.is_available():
        raise RecipeError("device: cuda, but torch sees no CUDA GPU here (torch.cuda.is_available() is False; torch "
                          f"{torch.__version__}); use device: auto or cpu, or check the driver and that torch is a CUDA build")
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if local_rank is None:
            return torch.device("cuda")
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(f"LOCAL_RANK {local_rank} but this machine shows {torch.cuda.device_count()} GPUs: start at "
                                   "most one process per GPU (torchrun --nproc-per-node), or check CUDA_VISIBLE_DEVICES")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def launched_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment; (0, 1, 0) for a plain process."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise DistributedError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers ({exc}); start with torchrun or accelerate launch") from None
    if world > 1 and not 0 <= rank < world:
        raise DistributedError(f"RANK={rank} is outside WORLD_SIZE={world}")
    if world > 1 and not os.environ.get("MASTER_ADDR"):  # init_process_group would fail with a bare ValueError about env://
        raise DistributedError(f"WORLD_SIZE={world} is set but MASTER_ADDR is not: start the run with torchrun or accelerate launch "
                               "(they set both), or unset WORLD_SIZE to train in one process")
    return rank, world, local


def choose_strategy(strategy: str, trainable_llm: Any) -> str:
    """ddp or fsdp for ``distributed.strategy``: auto shards (FSDP2) when the whole LLM trains, where weights, gradients
    and Adam moments of every rank's full copy are what runs out of memory; otherwise the trained part is small and
    DDP's full replica costs only the frozen weights, which are needed at every step anyway."""
    if strategy != "auto":
        return strategy
    return "fsdp" if trainable_llm == "full" else "ddp"


@dataclass
class World:
    """This process's place in the run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    strategy: str = "none"
    """none (one process), ddp or fsdp."""
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @classmethod
    def start(cls, device_choice: str, strategy: str, trainable_llm: Any) -> "World":
        """Read the launcher's variables, pick the device and join the process group (NCCL on GPUs, gloo on CPUs)."""
        rank, size, local = launched_world()
        if size == 1:
            return cls(device=resolve_device(device_choice))
        import torch.distributed as dist

        device = resolve_device(device_choice, local)
        if device.type == "cuda":
            torch.cuda.set_device(device)  # before the group: NCCL binds each rank's communicator to its current device
        owns = False
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, **({"device_id": device} if device.type == "cuda" else {}))
            owns = True
        if dist.get_world_size() != size:
            raise DistributedError(f"WORLD_SIZE={size} but the process group has {dist.get_world_size()} ranks")
        chosen = choose_strategy(strategy, trainable_llm)
        if rank != 0:  # one voice: the other ranks report only what goes wrong
            logging.getLogger("mmdomain").setLevel(max(logging.WARNING, logging.getLogger("mmdomain").getEffectiveLevel()))
        log.info("rank %d of %d on %s (%s)", rank, size, device, chosen)
        return cls(rank, size, local, device, chosen, owns)

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.owns_group = False

    # -- collectives (no-ops in one process) ------------------------------------------------------------------

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks, in float64 (exact for counts)."""
        if not self.distributed:
            return list(values)
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (picklable, small), in rank order, on every rank."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, value)
        return out

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    # -- the model --------------------------------------------------------------------------------------------

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module training calls: the model itself (one process, or FSDP2, which shards it in place) or its DDP
        wrapper. The model object stays the one to save, evaluate and name parameters by."""
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            # find_unused_parameters: a batch without media of some kind (text-only samples, a second media kind absent)
            # leaves that connector out of the graph, which DDP otherwise waits for forever.
            return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                           find_unused_parameters=True)
        if self.strategy == "fsdp":
            shard_model(model, self.device)
        return model

    @contextlib.contextmanager
    def accumulating(self, wrapped: nn.Module, last: bool) -> Iterator[None]:
        """Gradients synchronise only on the last micro-batch of a step (the others accumulate locally)."""
        if self.strategy == "ddp" and not last:
            with wrapped.no_sync():
                yield
            return
        if self.strategy == "fsdp":
            wrapped.set_requires_gradient_sync(last)
        yield

    @contextlib.contextmanager
    def whole_weights(self, model: nn.Module) -> Iterator[None]:
        """Evaluation and generation call the model's parts directly (``generate``, ``sequence_logprobs``), not its
        forward, so FSDP2's forward hooks never gather the root's shards (embeddings, connector, encoder, head): they
        are gathered here for the duration and sharded again after. Decoder layers gather themselves."""
        if self.strategy != "fsdp":
            yield
            return
        model.unshard()
        try:
            yield
        finally:
            model.reshard()


def peer_lost(exc: BaseException) -> bool:
    """Whether a collective failed because another rank is gone (it crashed, was killed, or stopped on its own error):
    NCCL raises DistError; gloo a plain RuntimeError that names the closed or reset connection."""
    import torch.distributed as dist

    if isinstance(exc, dist.DistError):
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in ("closed by peer", "reset by peer", "Broken pipe"))


def resume_command(world: World, run_dir: Any) -> str:
    """The command that continues this run: on several ranks, the same launch (a single process would be refused)."""
    if not world.distributed:
        return f"`mmdomain run {run_dir} --resume`"
    per_node = os.environ.get("LOCAL_WORLD_SIZE", str(world.size))  # torchrun sets it; one node runs all ranks otherwise
    nodes = f" on each of the same nodes ({world.size} processes in all)" if per_node != str(world.size) else ""
    return f"`torchrun --nproc-per-node {per_node} --no-python mmdomain run {run_dir} --resume`{nodes}"


def lost_peer_error(world: World, output_dir: str, exc: BaseException) -> DistributedError:
    """The one line a rank reports when another rank stopped first: not a defect of its own, and how to go on."""
    detail = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
    return DistributedError(f"rank {world.rank}: another rank of this run stopped first ({detail}); that rank's own error, in "
                            f"the log above, is the cause: fix it and continue from the newest checkpoint with "
                            f"{resume_command(world, output_dir)}")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The LLM's transformer blocks (``get_decoder().layers``), the units FSDP2 gathers one at a time."""
    decoder = model.causal_lm.get_decoder()
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise DistributedError(f"{type(decoder).__name__} has no .layers list; distributed.strategy: fsdp cannot find the LLM's "
                               "blocks to shard: use distributed.strategy: ddp")
    return list(layers)


def shard_model(model: nn.Module, device: torch.device) -> None:
    """FSDP2 in place: each decoder block its own unit, the rest (embeddings, head, encoder, connector) the root's."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import torch.distributed as dist

    layers = decoder_layers(model)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    units = [(f"llm block {i}", list(layer.named_parameters())) for i, layer in enumerate(layers)]
    units.append(("the rest (embeddings, head, encoder, connector)", [(n, p) for n, p in model.named_parameters() if id(p) not in in_layers]))
    for unit, params in units:
        # FSDP2 reduces a unit's gradients in one buffer: its trained parameters must share a dtype.
        dtypes = {str(p.dtype).removeprefix("torch."): n for n, p in params if p.requires_grad}
        if len(dtypes) > 1:
            listed = ", ".join(f"{d} ({n})" for d, n in dtypes.items())
            raise DistributedError(f"distributed.strategy: fsdp: the trained parameters of {unit} have several dtypes: {listed}; "
                                   "FSDP2 needs one per unit: keep trained weights float32 (model.llm.dtype: float32, "
                                   "optim.precision: bf16 for bf16 compute), or use distributed.strategy: ddp")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Total gradient norm over every rank's gradients (FSDP2's are shards: their norm is reduced over the group),
    and clip to ``max_norm``; the same value on every rank."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = torch.nn.utils.get_total_norm(grads, 2.0)
    if hasattr(total, "full_tensor"):
        total = total.full_tensor()
    if max_norm != float("inf"):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total
