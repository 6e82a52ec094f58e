"""Training part of an encoder: LoRA adapters (peft) on the blocks it runs, and the parameters each part of
``trainable.encoder`` names (the last k blocks and the norm after them, the adapters, the norms)."""
from __future__ import annotations

import warnings

from torch import nn

from .recipe import EncoderParts, RecipeError
from .spec import LoraSpec

# Normalisations whose weights ``norms: true`` trains. BatchNorm is left out on purpose: in training mode it also
# rewrites its running statistics, which would change a "frozen" encoder's output in evaluation.
_NORMS: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


def _is_norm(module: nn.Module) -> bool:
    # transformers and timm define norms of their own (Qwen2RMSNorm, timm's LayerNorm2d) beside torch's.
    return isinstance(module, _NORMS) or type(module).__name__.endswith(("LayerNorm", "RMSNorm", "LayerNorm2d"))


def layer_blocks(encoder: nn.Module, where: str, wanted: str) -> list[nn.Module]:
    """The blocks ``encoder`` runs, input to output, from its ``layer_blocks()`` (see ``encoders.base.Encoder``)."""
    blocks = getattr(encoder, "layer_blocks", None)
    if blocks is None:
        raise RecipeError(f"{where} ({encoder.info.source}) does not say where its blocks are (its class has no layer_blocks() "
                          f"method), so {wanted} cannot be applied to it; train it whole (trainable.encoder: true) or give its "
                          "class layer_blocks() and output_norm() as the encoders in mmdomain's encoders package have")
    return list(blocks())


def lora_targets(encoder: nn.Module, lora: LoraSpec, where: str) -> list[tuple[str, str]]:
    """``(full name inside encoder, name inside its block)`` of the layers that get adapters: every ``nn.Linear`` and
    ``nn.MultiheadAttention`` inside the blocks it runs (``all-linear``), or those whose name ends with a listed target.
    Patch embeddings, position tables and anything after the blocks keep no adapter."""
    names = {id(module): name for name, module in encoder.named_modules()}
    found: list[tuple[str, str]] = []  # (full name, name inside its block)
    for block in layer_blocks(encoder, where, "model.encoder.lora"):
        prefix = names[id(block)]
        attention = [n for n, m in block.named_modules() if isinstance(m, nn.MultiheadAttention)]
        for name, module in block.named_modules():
            # peft adapts a MultiheadAttention whole (its in-projection and its out_proj); the out_proj alone would be
            # bypassed, since MultiheadAttention reads out_proj.weight directly.
            inside_attention = any(name.startswith(a + ".") for a in attention)
            if isinstance(module, (nn.Linear, nn.MultiheadAttention)) and not inside_attention:
                found.append((f"{prefix}.{name}", name))
    if lora.targets == "all-linear":
        chosen = found
    else:
        chosen = [(full, local) for full, local in found if any(local == t or local.endswith("." + t) for t in lora.targets)]
        missing = [t for t in lora.targets if not any(local == t or local.endswith("." + t) for _, local in found)]
        if missing:
            available = sorted({local for _, local in found})
            raise RecipeError(f"{where}.lora.targets {missing} name no linear layer in its blocks; the layers of a block are "
                              f"{available} (or use targets: all-linear)")
    if not chosen:
        raise RecipeError(f"{where} ({encoder.info.source}) has no linear or attention layer in its blocks for LoRA; train "
                          "parts of it with trainable.encoder: {last_blocks: k} or {norms: true} instead")
    return chosen


def add_encoder_lora(encoder: nn.Module, lora: LoraSpec, where: str) -> nn.Module:
    """Put peft LoRA adapters into ``encoder`` in place (its class and methods stay; adapted layers keep their
    weights under ``base_layer``, and a LoRA-free checkpoint maps onto them, see ``builder._canonical``)."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = lora_targets(encoder, lora, where)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=[full for full, _ in targets])
    with warnings.catch_warnings():
        # peft warns that a MultiheadAttention adapter is experimental; it is tested here (tests/test_encoder_adaptation.py).
        warnings.filterwarnings("ignore", message=".*MultiheadAttention.*")
        inject_adapter_in_model(config, encoder)
    encoder.lora_layers = sorted({local for _, local in targets})  # what the trainable table names
    return encoder


def encoder_parts(encoder: nn.Module, parts: EncoderParts, lora: LoraSpec | None, where: str) -> list[tuple[str, list[nn.Parameter]]]:
    """``(label, parameters)`` of each part of ``encoder`` that ``parts`` trains, in the order the table shows them.
    Parts may share parameters (a norm inside the last blocks); a part the encoder cannot honour is a RecipeError."""
    found: list[tuple[str, list[nn.Parameter]]] = []
    if parts.last_blocks:
        blocks = layer_blocks(encoder, where, "trainable.encoder.last_blocks")
        k, count = parts.last_blocks, len(blocks)
        if k > count:
            raise RecipeError(f"trainable.encoder.last_blocks is {k} but {where} ({encoder.info.source}) runs {count} blocks (up to "
                              f"its layer {encoder.info.layer}); use 1..{count}, or trainable.encoder: true to train all of it")
        norm = encoder.output_norm() if hasattr(encoder, "output_norm") else None
        params = [p for block in blocks[count - k:] for p in block.parameters()] + (list(norm.parameters()) if norm is not None else [])
        span = f"block {count}" if k == 1 else f"blocks {count - k + 1}-{count}"
        found.append((f"{span} of {count}" + (" + final norm" if norm is not None else ""), params))
    if parts.lora:
        adapters = [p for name, p in encoder.named_parameters() if "lora_" in name]
        if adapters and lora is not None:  # a media kind whose encoder has no adapters trains none
            found.append((f"LoRA r={lora.r} on {', '.join(getattr(encoder, 'lora_layers', []))}", adapters))
    if parts.norms:
        norms = [m for m in encoder.modules() if _is_norm(m) and any(True for _ in m.parameters(recurse=False))]
        if not norms:
            raise RecipeError(f"trainable.encoder.norms: {where} ({encoder.info.source}) has no LayerNorm, GroupNorm or RMSNorm "
                              "with weights (BatchNorm is never trained this way); choose last_blocks or lora instead")
        found.append((f"norms ({len(norms)} layers)", [p for m in norms for p in m.parameters(recurse=False)]))
    return found
