"""The training loop: one recipe stage from model building to the final checkpoint and evaluation.

Reads top to bottom: run directory -> model (+ init_from) -> what trains -> data -> optimizer and schedule ->
steps (token-weighted gradient accumulation, clipping, metrics, periodic eval and checkpoints) -> final save.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .checkpoint import init_from_checkpoint
from .data import SampleFormat, TrainStream, epochs_of_batches, expand_shards, train_loader
from .evaluate import evaluate_shards, to_device
from .feature_cache import check_cacheable, open_cache
from .model import MultimodalLM, build_model
from .processor import IGNORE, MultimodalProcessor
from .recipe import Recipe, dump_recipe
from .shards import count_samples
from .trainability import apply_trainable, param_groups, trainable_table
from .errors import MmdomainError

log = logging.getLogger(__name__)


class NonFiniteLossError(MmdomainError, RuntimeError):
    """The loss or gradient became NaN/inf; the run stops before any checkpoint is written from it."""


class RunDirectoryError(MmdomainError, RuntimeError):
    """An output_dir that cannot take this run (it holds another run, or cannot be written)."""


def lr_factor(step: int, *, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the base LR at optimizer step ``step`` (0-based): linear warmup, then cosine/linear/constant."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * shape


def prepare_run_dir(recipe: Recipe) -> Path:
    run_dir = Path(recipe.output_dir)
    if (run_dir / "checkpoint").exists() or (run_dir / "metrics.jsonl").exists():
        if not recipe.overwrite:
            raise RunDirectoryError(f"output_dir {str(run_dir)!r} already holds a run; choose another output_dir or set overwrite=true")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))  # the fully resolved recipe, overrides applied
    return run_dir


def _device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def total_steps(recipe: Recipe, shards: list[str]) -> int:
    if recipe.optim.max_steps is not None:
        return recipe.optim.max_steps
    samples = count_samples(shards)
    if samples is None:
        raise ValueError("optim.epochs needs manifest.json beside the shards (make-shards writes it); or give optim.max_steps")
    if recipe.data.max_train_samples:
        samples = min(samples, recipe.data.max_train_samples)
    per_step = recipe.optim.batch_size * recipe.optim.grad_accum
    return max(1, math.ceil(recipe.optim.epochs * samples / per_step))


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.write_text("")

    def write(self, **row: Any) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def run_eval(model: MultimodalLM, processor: MultimodalProcessor, recipe: Recipe, path: Path | None = None,
             patterns: str | list[str] | None = None, layout: SampleFormat | None = None) -> dict[str, Any] | None:
    patterns = patterns or recipe.data.eval
    if patterns is None:
        return None
    return evaluate_shards(model, processor, patterns, max_samples=recipe.eval.max_samples, batch_size=recipe.eval.batch_size,
                           max_new_tokens=recipe.eval.max_new_tokens, error_budget=recipe.data.decode_error_budget,
                           predictions_path=path, layout=layout or SampleFormat.from_recipe(recipe.data))


def train(recipe: Recipe) -> dict[str, Any]:
    """Run one stage. Returns the summary that is also written to ``{output_dir}/result.json``."""
    started = time.perf_counter()
    run_dir = prepare_run_dir(recipe)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    device = _device(recipe.device)

    # Model: built from the spec; a previous stage's weights on top; then the recipe decides what trains.
    model, processor = build_model(recipe.model)
    if recipe.init_from:
        loaded = init_from_checkpoint(model, recipe.init_from)
        log.info("init_from %s: loaded %d tensors", recipe.init_from, len(loaded))
    apply_trainable(model, recipe.trainable)
    log.info("what trains (stage %s):\n%s", recipe.stage, trainable_table(model))
    model.to(device).train()

    # Data: media shards, or a feature cache made by the same frozen encoder (checked by key).
    train_patterns, eval_patterns = recipe.data.train, recipe.data.eval
    layout = SampleFormat.from_recipe(recipe.data)
    if recipe.data.feature_cache:
        check_cacheable(recipe)
        cached = open_cache(recipe.data.feature_cache, model, processor)
        train_patterns, eval_patterns = cached["train"], (cached.get("eval") if recipe.data.eval else None)
        layout = SampleFormat()  # cache shards always hold numbered members, whatever the source shards used
        model.encoder.to("cpu")  # never called while training from features
        log.info("training from feature cache %s", recipe.data.feature_cache)
    shards = expand_shards(train_patterns)
    stream = TrainStream(shards, processor, seed=recipe.seed, shuffle_buffer=recipe.data.shuffle_buffer,
                         error_budget=recipe.data.decode_error_budget, limit=recipe.data.max_train_samples, layout=layout)
    batches = epochs_of_batches(train_loader(stream, recipe.optim.batch_size, recipe.data.num_workers, recipe.data.pack_length), stream)
    steps = total_steps(recipe, shards)

    # Optimizer and schedule.
    opt = recipe.optim
    optimizer = torch.optim.AdamW(param_groups(model, recipe.lr, opt.lr, opt.weight_decay), betas=opt.betas,
                                  foreach=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup=opt.warmup_steps, total=steps, schedule=opt.schedule, min_ratio=opt.min_lr_ratio))
    trained = [p for p in model.parameters() if p.requires_grad]
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=opt.precision == "bf16")

    losses: list[float] = []
    window = {"samples": 0, "tokens": 0, "seconds": 0.0, "loss": 0.0, "steps": 0}
    epoch = 0
    for step in tqdm(range(1, steps + 1), desc=f"{recipe.stage}", disable=not rank0, dynamic_ncols=True):
        t0 = time.perf_counter()
        micro = []
        for _ in range(opt.grad_accum):
            epoch, batch = next(batches)
            micro.append(batch)
        # Token-weighted accumulation: every supervised token counts the same, however the micro-batches split.
        supervised = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro)
        step_loss = 0.0
        for batch in micro:
            with autocast:
                out = model(**to_device(batch, device))
            if not torch.isfinite(out.loss_sum):
                raise NonFiniteLossError(f"step {step}: loss is {out.loss_sum.item()} on samples {batch['keys']}; no checkpoint was written from it")
            (out.loss_sum / max(supervised, 1)).backward()
            step_loss += out.loss_sum.item() / max(supervised, 1)
        grad_norm = torch.nn.utils.clip_grad_norm_(trained, opt.clip_grad_norm or float("inf"))
        if not torch.isfinite(grad_norm):
            raise NonFiniteLossError(f"step {step}: gradient norm is {grad_norm.item()} on samples {[k for b in micro for k in b['keys']]}")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        losses.append(step_loss)
        window["samples"] += sum(len(b["keys"]) for b in micro)
        window["tokens"] += sum(b["num_tokens"] for b in micro)
        window["seconds"] += time.perf_counter() - t0
        window["loss"] += step_loss
        window["steps"] += 1
        if step % recipe.log_every == 0 or step == 1 or step == steps:
            metrics.write(step=step, epoch=epoch, loss=window["loss"] / window["steps"], lr=optimizer.param_groups[0]["lr"],
                          grad_norm=float(grad_norm), samples_per_s=window["samples"] / window["seconds"],
                          tokens_per_s=window["tokens"] / window["seconds"])
            window = {"samples": 0, "tokens": 0, "seconds": 0.0, "loss": 0.0, "steps": 0}
        if recipe.eval.every_steps and step % recipe.eval.every_steps == 0 and step != steps:
            report = run_eval(model, processor, recipe, patterns=eval_patterns, layout=layout)
            if report is not None:
                metrics.write(step=step, eval=report)
                log.info("step %d eval: %s", step, json.dumps(report))
        if recipe.save_every and step % recipe.save_every == 0 and step != steps:
            model.save_pretrained(str(run_dir / "checkpoint"), processor.tokenizer)

    model.save_pretrained(str(run_dir / "checkpoint"), processor.tokenizer)
    report = run_eval(model, processor, recipe, run_dir / "eval_predictions.jsonl", patterns=eval_patterns, layout=layout)
    if report is not None:
        metrics.write(step=steps, eval=report)
    tail = losses[-max(1, min(20, len(losses) // 5)) :]
    result = {
        "stage": recipe.stage,
        "steps": steps,
        "first_loss": losses[0],
        "final_loss": sum(tail) / len(tail),
        "skipped_samples": len(stream.failures.failures),
        "eval": report,
        "seconds": round(time.perf_counter() - started, 2),
        "checkpoint": str(run_dir / "checkpoint"),
    }
    (run_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    log.info("stage %s done in %.1f s: loss %.4f -> %.4f%s", recipe.stage, result["seconds"], result["first_loss"], result["final_loss"],
             f", eval {json.dumps(report)}" if report else "")
    return result
