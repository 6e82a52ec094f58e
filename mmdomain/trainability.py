"""Decide what trains (module switches + parameter-name globs), build per-module optimizer groups, log the table."""
from __future__ import annotations

import fnmatch
import logging
from typing import Any

import torch
from torch import nn

from .encoder_adaptation import encoder_parts
from .recipe import EncoderParts, ModuleLR, RecipeError, Trainable

log = logging.getLogger(__name__)

MODULES = ("encoder", "connector", "llm")


def modules_of(model: nn.Module, kind: str) -> list[nn.Module]:
    """The modules a switch covers: ``encoder`` and ``connector`` include those of every extra media kind."""
    extra = [getattr(k, kind) for k in getattr(model, "extra_kinds", [])] if kind != "llm" else []
    return [getattr(model, kind), *extra]


def encoder_part_rows(model: nn.Module, parts: EncoderParts) -> list[tuple[str, list[nn.Parameter]]]:
    """``(label, parameters)`` of each encoder part that trains, for every media kind's encoder (labelled by kind
    when there are several)."""
    rows = []
    kinds = list(zip(model.kind_parts(), model.spec.kinds()))
    for index, ((encoder, _, _), kind) in enumerate(kinds):
        where = "model.encoder" if index == 0 else f"model.extra_kinds[{index - 1}].encoder"
        for label, params in encoder_parts(encoder, parts, kind.encoder.lora, where):
            rows.append((f"{kind.name}: {label}" if len(kinds) > 1 else label, params))
    return rows


def apply_trainable(model: nn.Module, trainable: Trainable) -> set[str]:
    """Set ``requires_grad`` on every parameter from the recipe; globs match full names like ``llm.*lm_head*``.
    Returns the names of the parameters the recipe declares trainable (what ``UpdateAudit`` holds the steps to)."""
    model.requires_grad_(False)
    for kind in ("encoder", "connector"):
        if getattr(trainable, kind) is True:
            for module in modules_of(model, kind):
                module.requires_grad_(True)
    if isinstance(trainable.encoder, EncoderParts):
        for _, params in encoder_part_rows(model, trainable.encoder):
            for param in params:
                param.requires_grad_(True)
    if trainable.llm == "full":
        model.llm.requires_grad_(True)
    elif trainable.llm == "lora":
        for name, param in model.llm.named_parameters():
            param.requires_grad_("lora_" in name)
    names = dict(model.named_parameters())
    for pattern in trainable.params:
        matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            raise RecipeError(f"trainable.params pattern {pattern!r} matches no parameter (names look like {next(iter(names))!r})")
        for n in matched:
            names[n].requires_grad_(True)
    if not any(p.requires_grad for p in model.parameters()):
        raise RecipeError("the recipe trains nothing: enable trainable.connector, encoder, llm or give trainable.params")
    low = [(n, p.dtype) for n, p in model.named_parameters() if p.requires_grad and p.dtype != torch.float32]
    if low:
        name, dtype = low[0]
        raise RecipeError(
            f"{len(low)} trainable parameters are {str(dtype).removeprefix('torch.')} (first: {name}); AdamW on half-precision "
            "weights loses most small updates. Keep model.llm.dtype: float32 for the parts that train and set "
            "optim.precision: bf16 for bf16 compute"
        )
    return {n for n, p in model.named_parameters() if p.requires_grad}


def param_groups(model: nn.Module, lr: ModuleLR, default_lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """One AdamW group per module that trains (its own LR); biases and norms get no weight decay."""
    groups = []
    for module in MODULES:
        decay, no_decay = [], []
        for part in modules_of(model, module):
            for param in part.parameters():
                if param.requires_grad:
                    (no_decay if param.ndim < 2 else decay).append(param)
        module_lr = getattr(lr, module) or default_lr
        for params, wd, suffix in ((decay, weight_decay, ""), (no_decay, 0.0, ".no_decay")):
            if params:
                groups.append({"params": params, "lr": module_lr, "weight_decay": wd, "name": module + suffix})
    return groups


def trainable_table(model: nn.Module, trainable: Trainable | None = None) -> str:
    """A table of parameter counts per module: total, trainable, and what share trains; under ``encoder``, one row per
    part that ``trainable.encoder`` trains (``blocks 11-12 of 12 + final norm``, ``LoRA r=8 on qkv, proj``, ``norms``)."""
    rows = [("module", "parameters", "trainable", "share")]
    total_all = total_train = 0
    for module in MODULES:
        params = [p for part in modules_of(model, module) for p in part.parameters()]
        total = sum(p.numel() for p in params)
        train = sum(p.numel() for p in params if p.requires_grad)
        total_all, total_train = total_all + total, total_train + train
        rows.append((module, f"{total:,}", f"{train:,}", f"{100 * train / max(total, 1):.1f}%"))
        if module == "encoder" and trainable is not None and isinstance(trainable.encoder, EncoderParts):
            for label, part in encoder_part_rows(model, trainable.encoder):
                count = sum(p.numel() for p in part)
                rows.append((f"  {label}", "", f"{count:,}", f"{100 * count / max(total, 1):.1f}%"))
    rows.append(("total", f"{total_all:,}", f"{total_train:,}", f"{100 * total_train / max(total_all, 1):.1f}%"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
