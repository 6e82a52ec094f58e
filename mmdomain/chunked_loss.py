"""Summed cross-entropy of an LM head over supervised positions, computed a chunk of rows at a time.

The plain path (``F.cross_entropy(head(hidden), targets)``) materialises ``[supervised, vocab]`` logits, their
log-softmax and, in backward, a zero-filled gradient of the same size: on a 151,936-token vocabulary that is
hundreds of MB per micro-batch and most of a small model's step. Here each chunk of rows is run through the head,
its loss summed, and its gradient (softmax minus one-hot, through the head and any logit transform) taken at once
from the same chunk of logits; only ``[rows, hidden]`` and the head's weight gradient outlive a chunk.

The loss is a scalar, so the gradient backward receives is a scalar too: the per-chunk gradients computed in forward
are exact and backward only scales them. This costs the same matmul FLOPs as the plain path (recomputing the
logits in backward instead would add one more head matmul). Nothing is computed for inputs that need no gradient
(evaluation under ``no_grad``, a frozen head); a forward with grad enabled whose loss is never backpropagated pays for
the gradient all the same.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Rows per chunk: about CHUNK_BYTES of fp32 logits, but never fewer than MIN_ROWS. Every chunk reads the whole head
# weight twice (logits, then the gradient to the rows), so thin chunks turn the step into weight traffic: on CPU,
# 16-row chunks of a 32k vocabulary ran 3.5x slower than the plain loss, 256-row chunks faster than it.
CHUNK_BYTES = 32 * 2**20
MIN_ROWS = 256


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def chunk_rows(vocab: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    return max(MIN_ROWS, chunk_bytes // (4 * max(vocab, 1)))


class _LinearHeadCE(torch.autograd.Function):
    """Plain linear head (``hidden @ weight.T + bias``) with no logit transform: the gradient is written by hand."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows, grad_enabled):
        need = [grad_enabled and n for n in ctx.needs_input_grad[:3]]
        need_h, need_w, need_b = need[0], need[1], bias is not None and need[2]
        wide = torch.promote_types(weight.dtype, torch.float32)
        total = torch.zeros((), dtype=wide, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=wide, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=wide, device=bias.device) if need_b else None
        for start in range(0, hidden.shape[0], rows):
            h, t = hidden[start:start + rows], targets[start:start + rows]
            logp = torch.log_softmax(_at_least_fp32(F.linear(h, weight, bias)), dim=-1)
            picked = logp.gather(1, t[:, None])
            total -= picked.sum()
            if not (need_h or need_w or need_b):
                continue
            # d(sum of losses)/d(logits) = softmax - one_hot, built in place over the chunk's log-probabilities
            grad = logp.exp_()
            grad.scatter_(1, t[:, None], picked.exp_().sub_(1))
            g = grad.to(h.dtype) if h.dtype != grad.dtype else grad
            if need_h:
                grad_h[start:start + rows] = g @ weight.to(g.dtype)
            if need_w:
                grad_w.addmm_(grad.t(), h.to(wide))
            if need_b:
                grad_b += grad.sum(0)
        ctx.grads = (grad_h, None if grad_w is None else grad_w.to(weight.dtype), None if grad_b is None else grad_b.to(bias.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = (None if g is None else g * grad_out.to(g.dtype) for g in ctx.grads)
        del ctx.grads
        return grad_h, grad_w, grad_b, None, None, None


class _AnyHeadCE(torch.autograd.Function):
    """Any head function (LoRA on the head, a soft cap, a logit scale): each chunk's gradient comes from autograd on
    that chunk alone, with respect to the hidden rows and the head's trained parameters."""

    @staticmethod
    def forward(ctx, hidden, targets, rows, grad_enabled, head, *params):
        need_h = grad_enabled and ctx.needs_input_grad[0]
        trained = [i for i, p in enumerate(params) if grad_enabled and ctx.needs_input_grad[5 + i]]
        total = torch.zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_p = [None] * len(params)
        for start in range(0, hidden.shape[0], rows):
            t = targets[start:start + rows]
            if not (need_h or trained):
                total += F.cross_entropy(_at_least_fp32(head(hidden[start:start + rows])), t, reduction="sum")
                continue
            with torch.enable_grad():
                h = hidden[start:start + rows].detach().requires_grad_(need_h)
                loss = F.cross_entropy(_at_least_fp32(head(h)), t, reduction="sum")
                wrt = ([h] if need_h else []) + [params[i] for i in trained]
                grads = list(torch.autograd.grad(loss, wrt))
            total += loss.detach()
            if need_h:
                grad_h[start:start + rows] = grads.pop(0)
            for i, g in zip(trained, grads):
                grad_p[i] = g if grad_p[i] is None else grad_p[i] + g
        for i in trained:  # no rows: the loss is a constant 0, its gradient zeros
            grad_p[i] = torch.zeros_like(params[i]) if grad_p[i] is None else grad_p[i]
        ctx.grads = (grad_h, grad_p)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_p = ctx.grads
        del ctx.grads
        scale = lambda g: None if g is None else g * grad_out.to(g.dtype)  # noqa: E731
        return (scale(grad_h), None, None, None, None, *(scale(g) for g in grad_p))


def chunked_cross_entropy(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module,
                          transform: Callable[[torch.Tensor], torch.Tensor] | None = None, *, rows: int | None = None,
                          params: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """``F.cross_entropy(transform(head(hidden)).float(), targets, reduction="sum")`` without the ``[N, vocab]``
    tensors: ``hidden`` is ``[N, H]`` (the supervised positions), ``targets`` ``[N]``. ``rows`` per chunk defaults to
    ``chunk_rows(vocab)``. An empty ``hidden`` gives a zero loss still connected to the graph (its
    gradients are zeros), as ``F.cross_entropy`` with a sum does."""
    weight = getattr(head, "weight", None)
    vocab = weight.shape[0] if weight is not None else int(head(hidden[:0]).shape[-1])
    rows = rows or chunk_rows(vocab)
    if transform is None and type(head) is nn.Linear:
        return _LinearHeadCE.apply(hidden, head.weight, head.bias, targets, rows, torch.is_grad_enabled())
    params = list(head.parameters()) if params is None else list(params)
    fn = head if transform is None else (lambda h: transform(head(h)))
    return _AnyHeadCE.apply(hidden, targets, rows, torch.is_grad_enabled(), fn, *params)
