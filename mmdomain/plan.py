"""`mmdomain plan`: what a recipe costs before it runs: parameters, memory per GPU, FLOPs, time, and what makes it fit.

Everything comes from the recipe and the models' configuration files (the model is built on the meta device, see
``model_skeleton``); the cost formulas are ``cost_model``'s. A change that would make the run fit is found by
re-estimating the recipe with each candidate change, in order, and naming the first that fits.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from . import cost_model
from .chunked_loss import chunk_rows
from .cost_model import Stack
from .gpus import Gpu
from .recipe import Recipe, apply_overrides, validate_recipe

GiB = 1024**3
DEFAULT_MFU = 0.35


# -- the model's shape, as the cost model sees it ------------------------------------------------------------


def _linears(block: nn.Module) -> list[nn.Linear]:
    """The block's own linear layers (LoRA adapters' small matrices left out)."""
    return [m for name, m in block.named_modules() if isinstance(m, nn.Linear) and "lora_" not in name]


def _matmul_params(block: nn.Module) -> int:
    weights = sum(m.weight.numel() for m in _linears(block))
    weights += sum(m.in_proj_weight.numel() for m in block.modules() if isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None)
    return weights


def _heads(block: nn.Module, width: int) -> int:
    for module in block.modules():
        for name in ("num_heads", "num_attention_heads", "n_head", "heads"):
            value = getattr(module, name, None)
            if isinstance(value, int) and value > 0:
                return value
    return max(1, width // 64)


def block_stack(blocks: list[nn.Module]) -> Stack | None:
    """A ``Stack`` from an encoder's blocks (all alike): widths from its linear layers."""
    if not blocks:
        return None
    first = blocks[0]
    linears = _linears(first)
    attention = [m for m in first.modules() if isinstance(m, nn.MultiheadAttention)]
    if not linears and not attention:
        return None
    width = attention[0].embed_dim if attention else min(m.in_features for m in linears)
    ffn = max([m.out_features for m in linears if m.in_features == width] or [width])
    gated = sum(1 for m in linears if m.in_features == width and m.out_features == ffn) >= 2 and ffn != width
    return Stack(layers=len(blocks), width=width, attn_width=width, kv_width=width, ffn=ffn, gated=gated,
                 heads=_heads(first, width), matmul_params=_matmul_params(first))


def llm_stack(causal_lm: nn.Module) -> Stack:
    config = causal_lm.config
    config = getattr(config, "text_config", None) or config
    d = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or d // heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    layers = causal_lm.get_decoder().layers
    first = layers[0]
    ffn = int(getattr(config, "intermediate_size", 4 * d))
    gated = any(name.endswith(("gate_proj", "w1", "w3", "gate_up_proj")) for name, _ in first.named_modules())
    return Stack(layers=len(layers), width=d, attn_width=heads * head_dim, kv_width=kv * head_dim, ffn=ffn, gated=gated,
                 heads=heads, matmul_params=_matmul_params(first))


def _block_mode(block: nn.Module, earlier_trains: bool) -> str:
    named = list(block.named_parameters())
    if any(p.requires_grad and "lora_" not in n for n, p in named):
        return "trained"
    if any(p.requires_grad for _, p in named):
        return "lora"
    return "path" if earlier_trains else "none"


def encoder_stacks(encoder: nn.Module) -> list[tuple[Stack, str]]:
    """(stack, mode) runs of an encoder's blocks, input to output: ``trained`` blocks (their weights train), ``lora``
    (adapters only), ``path`` (frozen, but something before them trains), ``none`` (no gradient reaches them). Blocks
    before the first that trains keep nothing: ``trainable.encoder: {last_blocks: 2}`` keeps activations in two."""
    parts = list(getattr(encoder, "parts", None) or [encoder])  # a fused encoder runs each part
    runs: list[tuple[Stack, str]] = []
    for part in parts:
        blocks = list(part.layer_blocks()) if hasattr(part, "layer_blocks") else []
        stack = block_stack(blocks)
        if stack is None:
            continue
        inside = {id(p) for block in blocks for p in block.parameters()}
        earlier = any(p.requires_grad for p in part.parameters() if id(p) not in inside) and not _only_after(part, blocks)
        modes = []
        for block in blocks:
            modes.append(_block_mode(block, earlier))
            earlier = earlier or modes[-1] != "none"
        start = 0
        for i in range(1, len(modes) + 1):
            if i == len(modes) or modes[i] != modes[start]:
                runs.append((dataclasses.replace(stack, layers=i - start), modes[start]))
                start = i
    return runs


def _only_after(part: nn.Module, blocks: list[nn.Module]) -> bool:
    """Whether the trainable parameters outside the blocks are only the final norm (after them, so no gradient
    passes through the blocks for it)."""
    norm = part.output_norm() if hasattr(part, "output_norm") else None
    allowed = {id(p) for p in norm.parameters()} if norm is not None else set()
    inside = {id(p) for block in blocks for p in block.parameters()}
    return all(id(p) in allowed for p in part.parameters() if p.requires_grad and id(p) not in inside)


# -- the estimate -------------------------------------------------------------------------------------------------


def _params(model: nn.Module) -> dict[str, dict[str, int]]:
    out = {}
    for module in ("encoder", "connector", "llm"):
        parts = [getattr(model, module)] + ([getattr(k, module) for k in model.extra_kinds] if module != "llm" else [])
        params = [p for part in parts for p in part.parameters()]
        out[module] = {"trainable": sum(p.numel() for p in params if p.requires_grad),
                       "frozen": sum(p.numel() for p in params if not p.requires_grad)}
    return out


def _bytes_by_dtype(model: nn.Module, skip_encoders: bool) -> dict[str, int]:
    out: dict[str, int] = {}
    skipped = {id(p) for enc, _, _ in model.kind_parts() for p in enc.parameters()} if skip_encoders else set()
    for p in model.parameters():
        if id(p) not in skipped:
            key = str(p.dtype).removeprefix("torch.")
            out[key] = out.get(key, 0) + p.numel() * p.element_size()
    return out


def _mode(module: nn.Module, gradient_flows_in: bool) -> str:
    params = list(module.parameters())
    if any(p.requires_grad and "lora_" not in n for n, p in module.named_parameters()):
        return "trained"
    if any(p.requires_grad for p in params) or gradient_flows_in:
        return "path"
    return "none"


def _volume_depth(kind: Any) -> int:
    nifti = (kind.domain.options or {}).get("nifti") or {}
    return int(nifti.get("count", 1)) if nifti.get("mode") == "volume" else 1


def estimate(model: nn.Module, recipe: Recipe, gpu: Gpu, *, gpus: int = 1, seq: int | None = None, items: int = 1,
             answer: int | None = None, mfu: float = DEFAULT_MFU, samples: int | None = None) -> dict[str, Any]:
    """The cost of ``recipe``'s stage on ``gpus`` x ``gpu`` for ``model`` (built with the recipe's trainable set)."""
    opt = recipe.optim
    half = opt.precision in ("bf16", "fp16")
    cached = recipe.data.feature_cache is not None
    checkpointing = opt.gradient_checkpointing
    seq = seq or recipe.data.pack_length or recipe.model.max_length
    b = opt.batch_size
    strategy = recipe.distributed.strategy
    if strategy == "auto":
        strategy = "fsdp" if recipe.trainable.llm == "full" else "ddp"
    if gpus == 1:
        strategy = "single"

    params = _params(model)
    trainable = sum(v["trainable"] for v in params.values())
    llm = llm_stack(model.causal_lm)
    llm_dtype = next(model.causal_lm.parameters()).dtype
    llm_bytes = 2 if half or llm_dtype in (torch.bfloat16, torch.float16) else 4
    connectors_train = any(p.requires_grad for _, c, _ in model.kind_parts() for p in c.parameters())

    # Encoders: a trained one (or one with adapters) keeps activations; a frozen one only its working set.
    encoder_flops = encoder_act = 0.0
    media_tokens = 0
    encoder_rows = []
    encoder_modes = []
    for (encoder, connector, _), kind in zip(model.kind_parts(), recipe.model.kinds()):
        per_item = connector.num_output_tokens(encoder.info.num_tokens())
        media_tokens += per_item * items
        if cached:
            continue
        mode = _mode(encoder, False)
        encoder_modes.append(mode)
        enc_bytes = 2 if half or next(encoder.parameters()).dtype != torch.float32 else 4
        passes = items * _volume_depth(kind)
        lora_dropout = kind.encoder.lora is not None and kind.encoder.lora.dropout > 0
        tokens = encoder.info.num_tokens() if encoder.info.modality == "audio" else math.prod(encoder.info.grid()) + 1
        for stack, block_mode in encoder_stacks(encoder):
            lora = block_mode == "lora"
            as_cost = "path" if lora else block_mode
            encoder_flops += passes * cost_model.step_flops(stack, tokens, tokens, input_grads=as_cost != "none",
                                                            weight_grads=as_cost == "trained", recompute=checkpointing and as_cost != "none")
            # Blocks no gradient reaches keep nothing: their cost is one layer's working set over the batch.
            encoder_act += b * passes * cost_model.activation_bytes(stack, as_cost, tokens=tokens, seq=tokens, element_bytes=enc_bytes,
                                                                    eager_attention=False, checkpointing=checkpointing,
                                                                    lora_inputs=lora, lora_dropout=lora and lora_dropout)
            encoder_rows.append({"layers": stack.layers, "width": stack.width, "tokens": tokens, "passes_per_sample": passes,
                                 "mode": block_mode})
    text = max(1, seq - media_tokens)
    supervised = min(answer, text) if answer else text  # by default an upper bound: every text token supervised

    # The LLM: gradients reach it whenever something before it or in it trains.
    llm_mode = _mode(model.llm, connectors_train or any(r["mode"] != "none" for r in encoder_rows))
    lora_llm = recipe.trainable.llm == "lora"
    lora_dropout = lora_llm and recipe.model.llm.lora is not None and recipe.model.llm.lora.dropout > 0
    eager = recipe.model.llm.attn_implementation == "eager"
    llm_act = cost_model.activation_bytes(llm, llm_mode, tokens=b * seq, seq=seq, element_bytes=llm_bytes, eager_attention=eager,
                                          checkpointing=checkpointing, lora_inputs=lora_llm, lora_dropout=lora_dropout)
    head_trains = recipe.trainable.llm == "full"
    vocab = model.causal_lm.get_output_embeddings().weight.shape[0]
    # The loss (chunked_loss) runs a chunk of supervised rows at a time: one chunk's fp32 logits and log-probabilities
    # exist at once (8 bytes per logit), beside the gradient to every supervised hidden row that it keeps for the
    # backward. The whole [supervised x vocab] logits never exist.
    chunk = min(b * supervised, chunk_rows(vocab))
    logits = chunk * vocab * 8 + b * supervised * llm.width * llm_bytes
    hidden_io = b * seq * llm.width * llm_bytes * 3  # the embeddings, the final norm's input and output

    weights = _bytes_by_dtype(model, skip_encoders=cached)
    weight_total = sum(weights.values())
    grads = trainable * 4
    optimizer = trainable * 8  # AdamW: two fp32 moments per trainable parameter
    # Under autocast, the fp32 weights of linear layers on the gradient path run as half copies that the backward
    # pass keeps (it needs them for the input gradients), trained or frozen.
    casts = 0
    if half:
        on_path = [model.llm] if llm_mode != "none" else []
        on_path += [c for _, c, _ in model.kind_parts()]
        on_path += [e for (e, _, _), row in zip(model.kind_parts(), encoder_modes) if row != "none"]
        casts = sum(m.weight.numel() * 2 for part in on_path for m in part.modules()
                    if isinstance(m, nn.Linear) and m.weight.dtype == torch.float32)
    layer_params = sum(p.numel() * p.element_size() for p in model.causal_lm.get_decoder().layers[0].parameters())
    if strategy == "fsdp":
        weight_total = weight_total / gpus + 2 * layer_params  # sharded, plus the gathered layer and the next one prefetched
        grads, optimizer = grads / gpus, optimizer / gpus
        # FSDP2 casts at the all-gather (MixedPrecisionPolicy): half weights exist only for the gathered layers.
        casts = 0
    buckets = grads if strategy == "ddp" else 0  # DDP's gradient buckets are a second copy of the gradients
    activations = llm_act + encoder_act + logits + hidden_io
    # Gradients and activations are not alive at full size together: the backward pass frees each layer's activations
    # as it writes that layer's gradients. The peak is the activations plus the gradient written first (the output
    # head's, when it trains), or all the gradients at the end, whichever is larger.
    head = model.causal_lm.get_output_embeddings().weight
    first_grad = head.numel() * 4 / (gpus if strategy == "fsdp" else 1) if head.requires_grad else 0
    total = weight_total + optimizer + casts + buckets + max(activations + first_grad, grads)

    # FLOPs per sample (one forward + backward), and time.
    sample_flops = encoder_flops
    sample_flops += cost_model.step_flops(llm, seq, seq, input_grads=llm_mode != "none", weight_grads=llm_mode == "trained", recompute=checkpointing and llm_mode != "none")
    sample_flops += cost_model.head_flops(supervised, llm.width, vocab, trains=head_trains)
    peak = gpu.peak_flops["fp32" if not half else opt.precision]
    seconds_per_sample = sample_flops / (peak * mfu * gpus)
    result = {
        "gpu": {"name": gpu.name, "description": gpu.description, "count": gpus, "memory_gib": gpu.memory_bytes / GiB,
                "usable_gib": gpu.usable_bytes / GiB, "peak_tflops": peak / 1e12, "precision": opt.precision},
        "strategy": strategy,
        "shape": {"micro_batch": b, "grad_accum": opt.grad_accum, "global_batch": b * opt.grad_accum * gpus, "seq_len": seq,
                  "media_tokens_per_sample": media_tokens, "media_items_per_sample": items, "supervised_per_sample": supervised,
                  "gradient_checkpointing": checkpointing, "feature_cache": cached},
        "parameters": params,
        "memory_gib": {"weights": weight_total / GiB, "weights_by_dtype": {k: v / GiB for k, v in weights.items()},
                       "gradients": grads / GiB, "optimizer": optimizer / GiB, "autocast_copies": casts / GiB,
                       "ddp_buckets": buckets / GiB, "activations": activations / GiB,
                       "activations_parts": {"llm": llm_act / GiB, "encoder": encoder_act / GiB, "logits": logits / GiB,
                                             "embeddings": hidden_io / GiB},
                       "total_per_gpu": total / GiB},
        "fits": total <= gpu.usable_bytes,
        "flops_per_sample": sample_flops,
        "mfu": mfu,
        "seconds_per_1k_samples": 1000 * seconds_per_sample,
        "llm": {"layers": llm.layers, "width": llm.width, "ffn": llm.ffn, "mode": llm_mode},
        "encoders": encoder_rows,
    }
    if samples:
        epochs = opt.epochs or (opt.max_steps * b * opt.grad_accum * gpus / samples)
        result["samples_per_epoch"] = samples
        result["hours_per_epoch"] = samples * seconds_per_sample / 3600
        result["hours_total"] = epochs * samples * seconds_per_sample / 3600
        result["gpu_hours_total"] = result["hours_total"] * gpus
    return result


# -- making it fit ------------------------------------------------------------------------------------------------


def candidate_changes(recipe: Recipe, gpus: int) -> list[tuple[str, list[str], int]]:
    """(what, overrides, gpus) in the order they are tried: cheapest to the run's speed and result first."""
    opt = recipe.optim
    out: list[tuple[str, list[str], int]] = []
    b, accum = opt.batch_size, opt.grad_accum
    while b > 1:  # smaller micro-batches, the global batch kept by accumulating more of them
        b, accum = b // 2, accum * 2
        if opt.batch_size % b == 0:
            out.append((f"micro-batch {b} with grad_accum {accum} (same global batch)", [f"optim.batch_size={b}", f"optim.grad_accum={accum}"], gpus))
    if not opt.gradient_checkpointing:
        out.append(("gradient checkpointing", ["optim.gradient_checkpointing=true"], gpus))
        out += [(f"{what} + gradient checkpointing", [*o, "optim.gradient_checkpointing=true"], g) for what, o, g in list(out[:-1])]
    if recipe.trainable.llm == "full":
        out.append(("LoRA on the LLM instead of training it whole", ["trainable.llm=lora", "model.llm.lora={r: 16, alpha: 32}"], gpus))
    if gpus > 1 and recipe.distributed.strategy != "fsdp":
        out.append((f"FSDP across the {gpus} GPUs", ["distributed.strategy=fsdp"], gpus))
    for more in (2, 4, 8, 16):
        if more > gpus:
            out.append((f"FSDP across {more} GPUs", ["distributed.strategy=fsdp"], more))
    return out


def recipe_with(recipe: Recipe, overrides: list[str]) -> Recipe:
    return validate_recipe(apply_overrides(recipe.model_dump(mode="json"), overrides), "plan")


def _model_for(recipe: Recipe, cache: dict[str, Any]) -> tuple[nn.Module, list[str]]:
    """The recipe's model on the meta device with its trainable set applied (built once per model spec)."""
    import copy

    from .model_skeleton import build_skeleton
    from .trainability import apply_trainable

    key = recipe.model.model_dump_json()
    if key not in cache:
        cache[key] = build_skeleton(recipe.model)
    skeleton = cache[key]
    model = copy.deepcopy(skeleton.model)  # each candidate sets its own trainable flags
    apply_trainable(model, recipe.trainable)
    return model, skeleton.notes


def make_plan(recipe: Recipe, gpu: Gpu, *, gpus: int = 1, seq: int | None = None, items: int = 1, answer: int | None = None,
              mfu: float = DEFAULT_MFU, samples: int | None = None) -> dict[str, Any]:
    """The estimate for ``recipe`` as written and, when it does not fit, the first change (tried in
    ``candidate_changes`` order, each re-estimated) that fits, with every change tried."""
    if samples is None:
        samples = _samples_in(recipe)
    cache: dict[str, Any] = {}
    model, notes = _model_for(recipe, cache)
    plan = estimate(model, recipe, gpu, gpus=gpus, seq=seq, items=items, answer=answer, mfu=mfu, samples=samples)
    plan["notes"] = notes
    plan["tried"] = []
    plan["recommendation"] = None
    if plan["fits"]:
        return plan
    for what, overrides, count in candidate_changes(recipe, gpus):
        changed = recipe_with(recipe, overrides)
        model, _ = _model_for(changed, cache)
        other = estimate(model, changed, gpu, gpus=count, seq=seq, items=items, answer=answer, mfu=mfu, samples=samples)
        row = {"change": what, "overrides": overrides, "gpus": count, "total_per_gpu_gib": other["memory_gib"]["total_per_gpu"],
               "fits": other["fits"], "seconds_per_1k_samples": other["seconds_per_1k_samples"]}
        plan["tried"].append(row)
        if other["fits"]:
            plan["recommendation"] = row
            break
    return plan


def _samples_in(recipe: Recipe) -> int | None:
    """Training samples per epoch from the shards' manifests, when the shards exist and are listed."""
    from .data import DataError, expand_shards
    from .shards import count_samples

    try:
        paths = expand_shards(recipe.data.train)
    except DataError:
        return None
    total = count_samples(paths)
    if total is not None and recipe.data.max_train_samples:
        total = min(total, recipe.data.max_train_samples)
    return total


def render(plan: dict[str, Any], source: str) -> str:
    """The plan as text for the terminal."""
    gpu, shape, mem = plan["gpu"], plan["shape"], plan["memory_gib"]
    lines = [f"plan for {source} on {gpu['count']} x {gpu['description']} ({gpu['usable_gib']:.1f} of {gpu['memory_gib']:.1f} GiB usable"
             f" each, {gpu['precision']} peak {gpu['peak_tflops']:.0f} TFLOP/s), strategy {plan['strategy']}",
             f"batch: micro-batch {shape['micro_batch']} x grad_accum {shape['grad_accum']} x {gpu['count']} GPU = {shape['global_batch']}; "
             f"sequence {shape['seq_len']} tokens ({shape['media_tokens_per_sample']} media tokens, {shape['media_items_per_sample']} item(s)); "
             f"gradient checkpointing {'on' if shape['gradient_checkpointing'] else 'off'}", "",
             f"{'module':10s} {'trainable':>15s} {'frozen':>15s}"]
    for module, counts in plan["parameters"].items():
        lines.append(f"{module:10s} {counts['trainable']:>15,} {counts['frozen']:>15,}")
    lines += ["", "memory per GPU (GiB)"]
    by_dtype = ", ".join(f"{k} {v:.2f}" for k, v in mem["weights_by_dtype"].items())
    if plan["strategy"] == "fsdp":
        by_dtype = f"sharded by {gpu['count']} + two gathered layers; whole model {by_dtype}"
    parts = ", ".join(f"{k} {v:.2f}" for k, v in mem["activations_parts"].items())
    for label, value, detail in (("weights", mem["weights"], by_dtype), ("gradients", mem["gradients"], "fp32, trainable only"),
                                 ("optimizer", mem["optimizer"], "AdamW, 2 fp32 moments per trainable parameter"),
                                 ("autocast", mem["autocast_copies"], "half copies of fp32 weights on the gradient path"),
                                 ("ddp", mem["ddp_buckets"], "gradient buckets"),
                                 ("activations", mem["activations"], parts), ("total", mem["total_per_gpu"], "")):
        if value or label in ("weights", "activations", "total"):
            lines.append(f"  {label:12s} {value:9.2f}  {detail}")
    verdict = "fits" if plan["fits"] else "does NOT fit"
    lines.append(f"  -> {verdict} in {gpu['usable_gib']:.1f} GiB")
    lines += ["", f"compute: {plan['flops_per_sample'] / 1e12:.3g} TFLOP per sample (forward + backward); at {100 * plan['mfu']:.0f}% MFU "
              f"{plan['seconds_per_1k_samples']:.1f} s per 1000 samples"]
    if "hours_per_epoch" in plan:
        lines.append(f"epoch of {plan['samples_per_epoch']:,} samples: {plan['hours_per_epoch']:.2f} h; whole stage {plan['hours_total']:.2f} h "
                     f"= {plan['gpu_hours_total']:.2f} GPU-hours")
    else:
        lines.append("samples per epoch unknown (no shard manifest found): give --samples N for the time per epoch")
    if not plan["fits"]:
        lines.append("")
        for row in plan["tried"]:
            mark = "fits" if row["fits"] else "no"
            lines.append(f"  tried {row['change']}: {row['total_per_gpu_gib']:.2f} GiB per GPU -> {mark}")
        rec = plan["recommendation"]
        if rec:
            lines.append(f"recommended: {rec['change']}: " + " ".join(rec["overrides"]) + (f" --gpus {rec['gpus']}" if rec["gpus"] != gpu["count"] else ""))
        else:
            lines.append("no single change tried makes it fit; a larger GPU, a smaller LLM or shorter sequences would")
    for note in plan.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)
