"""Hold the first optimizer steps of a run to what the recipe declared: exactly the declared parameters change.

Freeze switches that silently do nothing are a known failure of training tools (a library re-enabling
``requires_grad``, a parameter shared with a trained one, a hook writing weights, an optimizer group that misses a
parameter). ``apply_trainable`` returns the names the recipe declares trainable; this audit fingerprints every other
parameter before the first step and compares after it, so a frozen parameter that moved stops the run with its name,
before any checkpoint is written from it. Trainable parameters that never move get a warning naming them.

Why compare weights and not gradients: a gradient says nothing about a parameter the optimizer misses (no group)
or one that something other than the optimizer writes; the weights themselves show what really happened.

Which steps count: only steps whose learning rate is above 0, since at LR 0 nothing legitimately moves (a
warmup or schedule that starts at 0) and a wrongly trained frozen parameter would not show. The frozen check runs
after the first such step. A trainable parameter may legitimately stay put on that step, so it is followed for up
to ``WINDOW`` such steps: a LoRA ``A`` matrix gets exactly zero gradient while its ``B`` is still 0 (peft's init) and
moves from the second step; a connector of a media kind absent from the first batches waits for its data.

Cost: one integer sum per frozen tensor, once, plus one per not-yet-moved trainable tensor on each of at most
``WINDOW`` steps; no copy of any weight is kept. A tensor's fingerprint is the wrapping int64 sum of its bytes read
as 64-bit words, without a copy: 0.4-1.2 ns per element on 2 shared CPU threads (about 0.5 s, once, for a 0.5 B
LLM), one memory-bound pass on a GPU. Integer addition is exact and independent of reduction order, so equal
weights always give equal fingerprints, and any single changed element changes it. (An update that changed
several elements and left the sum of their words exactly equal would go unseen; optimizer updates are not built
like that.)
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from .errors import MmdomainError

log = logging.getLogger(__name__)

WINDOW = 10  # steps with LR > 0 over which every trainable parameter is expected to have moved

_SAME_WIDTH_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class FrozenParameterMoved(MmdomainError, RuntimeError):
    """A parameter the recipe declares frozen changed during a step."""


def _fingerprint(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()
    if hasattr(tensor, "to_local"):  # an FSDP2 shard (DTensor): each rank audits the part it holds
        tensor = tensor.to_local()
    if tensor.is_contiguous() and tensor.numel() * tensor.element_size() % 8 == 0:
        return tensor.view(-1).view(torch.int64).sum()  # 40x faster on a CPU than widening each element first
    return tensor.view(_SAME_WIDTH_INT[tensor.element_size()]).sum(dtype=torch.int64)  # odd sizes: small tensors


def fingerprints(params: list[torch.Tensor]) -> torch.Tensor:
    """One int64 per tensor (see the module docstring), gathered with one transfer to the CPU."""
    if not params:
        return torch.zeros(0, dtype=torch.int64)
    sums = [_fingerprint(p) for p in params]
    return torch.stack([s.to(sums[0].device) for s in sums]).cpu()


class UpdateAudit:
    """Call ``after_step(step, lr)`` after every optimizer step and ``finish()`` at the end of the run; it stops
    costing anything once the frozen check has run and every trainable parameter has moved (or ``WINDOW`` passed)."""

    def __init__(self, model: nn.Module, declared: set[str]) -> None:
        named = dict(model.named_parameters())  # shared (tied) parameters appear once, under their first name
        self.frozen = {n: p for n, p in named.items() if n not in declared}
        self.waiting = {n: p for n, p in named.items() if n in declared}  # trainable, not seen moving yet
        self._frozen_before: torch.Tensor | None = fingerprints(list(self.frozen.values()))
        self._waiting_before = fingerprints(list(self.waiting.values()))
        self._counted = 0
        self.done = False

    def after_step(self, step: int, lr: float) -> None:
        if self.done or lr <= 0:
            return
        self._counted += 1
        if self._frozen_before is not None:
            moved = [n for n, before, now in zip(self.frozen, self._frozen_before, fingerprints(list(self.frozen.values()))) if before != now]
            self._frozen_before = None
            if moved:
                listed = ", ".join(moved[:5]) + (f" and {len(moved) - 5} more" if len(moved) > 5 else "")
                raise FrozenParameterMoved(
                    f"step {step}: {len(moved)} parameter(s) the recipe declares frozen changed: {listed}. Something other than "
                    "trainable trains them (requires_grad turned back on after trainable was applied, a weight shared with a "
                    "trained one, or a hook writing it); the run stops before saving. Fix that, or declare them trainable "
                    "(trainable.params globs, or trainable.encoder parts)")
        now = fingerprints(list(self.waiting.values()))
        still = {n: (p, before) for (n, p), before, after in zip(self.waiting.items(), self._waiting_before, now) if before == after}
        self.waiting = {n: p for n, (p, _) in still.items()}
        self._waiting_before = torch.stack([b for _, b in still.values()]) if still else torch.zeros(0, dtype=torch.int64)
        if not self.waiting or self._counted >= WINDOW:
            self.finish()

    def finish(self) -> None:
        """Warn about the trainable parameters that never moved (once); a run shorter than ``WINDOW`` calls it at its end."""
        if self.done:
            return
        self.done = True
        if self._counted and self.waiting:
            names = list(self.waiting)
            listed = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            log.warning("%d trainable parameter(s) did not change in the first %d step(s) with a learning rate above 0: %s. No "
                        "gradient reaches them (not on the path to the loss, a media kind missing from the data) or the "
                        "optimizer does not hold them; they train as declared only if that changes", len(names), self._counted, listed)
