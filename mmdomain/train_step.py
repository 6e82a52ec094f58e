"""One optimizer step over a step's micro-batches, on one process or many: token-weighted loss exact across
ranks, autocast (bf16, or fp16 with a dynamic loss scale), gradient sync on the last micro-batch only, clipping.

Token weighting: every supervised token of the global step counts the same, however the tokens fall on micro-batches
and ranks. The supervised-token count is summed over ranks before any backward, each rank backpropagates
``loss_sum * world / global_count``, and DDP / FSDP2 average gradients over ``world`` ranks: the result is the
gradient one process computes on all the step's samples. A rank whose batch holds no sample (padding at an epoch's
end, or every sample failed) steps on a usable batch with weight 0, so the collectives still line up.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .distributed import World, clip_grad_norm
from .errors import MmdomainError
from .evaluate import to_device
from .objectives.sft import SFTObjective

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(MmdomainError, RuntimeError):
    """The loss or gradient became NaN/inf; the run stops before any checkpoint is written from it."""


@dataclass
class StepOutcome:
    loss: float
    """Mean loss per supervised token of the whole step (all ranks)."""
    grad_norm: float
    samples: int
    """Samples of all ranks this step trained on."""
    tokens: int
    keys: list[str] = field(default_factory=list)
    """This rank's sample keys, in order."""
    skipped: bool = False
    """fp16 only: the scaled gradients overflowed, so the optimizer did not step (the scale is lowered)."""


class StepRunner:
    """Runs steps for ``model`` (what is saved) through ``wrapped`` (what is called: the model, or its DDP wrapper)."""

    def __init__(self, world: World, model: nn.Module, wrapped: nn.Module, optimizer: torch.optim.Optimizer, *, precision: str,
                 clip_grad_norm: float | None, scaler_state: dict[str, Any] | None = None, objective: Any = None) -> None:
        self.world, self.model, self.wrapped, self.optimizer = world, model, wrapped, optimizer
        self.objective = objective if objective is not None else SFTObjective()
        if world.distributed and self.objective.name != "sft":
            # DPO and GRPO call the model's own methods (log-probs, sampling, the reference swap), which a DDP or FSDP
            # wrapper would be bypassed by: gradients would not be synchronised.
            raise MmdomainError(f"objective: {self.objective.name} runs in one process for now (found {world.size} under torchrun); "
                                "start it with `mmdomain run` alone, or train objective: sft across processes")
        self.trained = [p for p in model.parameters() if p.requires_grad]
        self.clip = clip_grad_norm or float("inf")
        self.device = world.device
        self.autocast_dtype = AUTOCAST.get(precision)
        self.scaler: torch.amp.GradScaler | None = None
        if precision == "fp16":
            if world.strategy == "fsdp":
                # Each rank sees only its gradient shards, so an overflow found on one would skip the step there alone.
                raise MmdomainError("optim.precision: fp16 with distributed.strategy: fsdp is not supported (an overflow in one "
                                    "rank's gradient shard must skip the step on every rank); use optim.precision: bf16, or "
                                    "distributed.strategy: ddp")
            self.scaler = torch.amp.GradScaler(self.device.type)
            if scaler_state:
                self.scaler.load_state_dict(scaler_state)

    def scaler_state(self) -> dict[str, Any] | None:
        return dict(self.scaler.state_dict()) if self.scaler is not None else None

    def _autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16, enabled=self.autocast_dtype is not None)

    def run(self, step: int, micro: list[dict[str, Any] | None], zero_weight_batch: Any) -> StepOutcome:
        """Forward and backward every micro-batch (None: no usable sample here), then one optimizer step."""
        world = self.world
        usable = [b for b in micro if b is not None]
        # What the summed losses are divided by (SFT: the step's supervised tokens; DPO: pairs; GRPO: sampled answers).
        local = [self.objective.units(usable), sum(len(b["keys"]) for b in usable), sum(b["num_tokens"] for b in usable)]
        total_supervised, samples, tokens = (int(v) for v in world.sum(local))
        denominator = max(total_supervised, 1)
        step_loss = 0.0
        for i, batch in enumerate(micro):
            weight = 1.0 if batch is not None else 0.0
            batch = batch if batch is not None else zero_weight_batch()
            with world.accumulating(self.wrapped, last=i == len(micro) - 1):
                with self._autocast():
                    loss_sum = self.objective.loss(self.wrapped, to_device(batch, self.device))
                if not world.distributed and not torch.isfinite(loss_sum):
                    raise NonFiniteLossError(f"step {step}: loss is {loss_sum.item()} on samples {batch['keys']}; no checkpoint was written from it")
                loss = loss_sum * (weight * world.size) / denominator
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            step_loss += loss_sum.item() * weight / denominator
        if world.distributed:
            step_loss = world.sum([step_loss])[0]  # the same on every rank, so a bad value stops every rank alike
            if not torch.isfinite(torch.tensor(step_loss)):
                raise NonFiniteLossError(f"step {step}: loss is {step_loss} (this rank's samples {[k for b in usable for k in b['keys']]}); "
                                         "no checkpoint was written from it")
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if world.strategy == "fsdp":
            grad_norm = clip_grad_norm(self.trained, self.clip)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.trained, self.clip)
        skipped = False
        if self.scaler is not None:
            before = self.scaler.get_scale()
            self.scaler.step(self.optimizer)  # skipped by the scaler when a gradient is inf/NaN
            self.scaler.update()
            skipped = self.scaler.get_scale() < before
        else:
            if not torch.isfinite(grad_norm):
                raise NonFiniteLossError(f"step {step}: gradient norm is {grad_norm.item()} on samples {[k for b in usable for k in b['keys']]}")
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutcome(step_loss, float(grad_norm), samples, tokens, [k for b in usable for k in b["keys"]], skipped)
