"""Fold LoRA adapters into the weights they adapt (encoder and LLM), so an export needs neither peft nor mmdomain."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


def merge_encoder_lora(encoder: nn.Module) -> int:
    """Merge every peft LoRA layer inside ``encoder`` (put there by ``encoder_adaptation.add_encoder_lora``) into its
    base layer and put the base layer back in its place; returns how many were merged. The module keeps its class
    and methods, and its parameter names become those of an encoder built without adapters."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapted = [(name, module) for name, module in encoder.named_modules() if isinstance(module, BaseTunerLayer)]
    with torch.no_grad():
        for _, module in adapted:  # outer layers first: an adapted MultiheadAttention merges its out_proj's adapter too
            if not module.merged:
                module.merge()
    for name, module in sorted(adapted, key=lambda item: -item[0].count(".")):  # inner layers are put back first
        parent_name, _, child = name.rpartition(".")
        parent = encoder.get_submodule(parent_name) if parent_name else encoder
        base = module.get_base_layer()
        _restore_parameters(base)
        setattr(parent, child, base)
    if hasattr(encoder, "lora_layers"):
        del encoder.lora_layers
    return len(adapted)


def _restore_parameters(module: nn.Module) -> None:
    """peft merges an adapted ``MultiheadAttention`` by putting plain tensors where its weights were (so it can undo
    the merge); made parameters again, they are in its state dict, saved and loaded like any weight."""
    for sub in module.modules():
        for name in ("weight", "bias", "in_proj_weight", "in_proj_bias"):
            value = sub.__dict__.get(name)
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                delattr(sub, name)
                sub.register_parameter(name, nn.Parameter(value, requires_grad=False))


def merged_llm(llm: Any) -> Any:
    """The plain transformers causal LM with its peft LoRA merged in (``merge_and_unload``), or ``llm`` unchanged
    when it has no adapters."""
    if hasattr(llm, "merge_and_unload"):
        return llm.merge_and_unload()
    return llm


def merge_model_lora(model: Any) -> None:
    """Merge the LoRA of every encoder and of the LLM of a ``MultimodalLM`` in place; its spec then describes the
    merged model (no adapters), so the weights it now holds are what a save or export stores."""
    spec = model.spec
    for encoder, _, _ in model.kind_parts():
        merge_encoder_lora(encoder)
    model.llm = merged_llm(model.llm)
    kinds = [kind.model_copy(update={"encoder": kind.encoder.model_copy(update={"lora": None})}) for kind in spec.extra_kinds]
    model.spec = spec.model_copy(update={"encoder": spec.encoder.model_copy(update={"lora": None}),
                                         "llm": spec.llm.model_copy(update={"lora": None}), "extra_kinds": kinds})
