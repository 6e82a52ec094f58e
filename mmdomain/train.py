"""The training loop: one recipe stage from model building to the final checkpoint and evaluation.

Reads top to bottom: run directory (fresh or resumed) -> model (+ init_from) -> what trains -> data -> optimizer and
schedule -> restored state -> steps (token-weighted gradient accumulation, clipping, metrics, periodic eval and
checkpoints) -> final save -> evaluation -> result.json. A checkpoint holds everything the steps depend on (weights,
optimizer moments, random streams, data position), so a run stopped at any moment and resumed trains exactly as if
it had never stopped.
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from .band_stats import ensure_band_stats
from .compiled_step import CompileWatch, compile_model
from .builder import base_identities, build_model, check_handoff, load_handoff, load_weights, write_model
from .checkpoint import CheckpointWriter, latest_checkpoint, point_latest, prune, read_marker, step_directory
from .data import DataError, FailureBudget, SampleFormat, ShardCatalog, expand_shards
from .dist_checkpoint import check_same_world, load_sharded_optimizer, save_distributed
from .distributed import World, lost_peer_error, peer_lost, resolve_device, resume_command
from .errors import CheckpointError, MmdomainError, RunInterrupted
from .evaluate import evaluate_shards
from .feature_cache import check_cacheable, open_cache
from .memory_savers import enable_gradient_checkpointing
from .objectives import make_objective
from .preflight import check_models, input_problems
from .recipe import Recipe, RecipeError, with_new_fields
from .run_cost import estimated_cost, measured_cost, start_measuring
from .run_dir import JsonLog, check_resume_changes, check_resume_data, drop_replaced, open_run, write_recipe
from .spec import LEGACY_DEFAULTS, with_legacy_defaults
from .stop_requests import StopRequests, outlive_launcher_stop
from .train_state import TrainerState, read_trainer_state, restore_training, write_training
from .train_step import NonFiniteLossError, StepRunner
from .train_stream import BatchStream, Position, TrainBatches
from .trainability import apply_trainable, param_groups, trainable_table
from .update_audit import UpdateAudit

log = logging.getLogger(__name__)


__all__ = ["NonFiniteLossError", "lr_factor", "train"]


def lr_factor(step: int, *, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the base LR at optimizer step ``step`` (0-based): linear warmup, then cosine/linear/constant."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * shape


def _device(choice: str) -> torch.device:  # kept for callers of the old name; the decision lives in distributed
    return resolve_device(choice)


def run_eval(model: Any, processor: Any, recipe: Recipe, patterns: Any, layout: SampleFormat, *, device: torch.device,
             path: Path | None = None, objective: Any = None) -> dict[str, Any] | None:
    if patterns is None:
        return None
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # evaluation never shifts training's random streams
        report = evaluate_shards(model, processor, patterns, max_samples=recipe.eval.max_samples, batch_size=recipe.eval.batch_size,
                                 max_new_tokens=recipe.eval.max_new_tokens, error_budget=recipe.data.decode_error_budget,
                                 predictions_path=path, layout=layout, choice_score=recipe.eval.choice_score, device=device)
        extra = objective.evaluate(model, processor, patterns, layout, recipe) if objective is not None else None
    return {**report, objective.name: extra} if extra else report


def train(recipe: Recipe, *, accept_changes: bool = False) -> dict[str, Any]:
    """Run (or resume) one stage. Returns the summary also written to ``{output_dir}/result.json``.

    Under torchrun every rank calls this; rank 0 alone checks the inputs, takes the run directory (its lock) and
    tells the others where the run stands (a fresh start or the checkpoint to resume), or the error that stopped it."""
    started = time.perf_counter()
    world = World.start(recipe.device, recipe.distributed.strategy, recipe.trainable.llm)
    try:
        if not world.is_main:
            outcome = world.broadcast(None)
            if "error" in outcome:
                raise MmdomainError(f"rank 0 could not start the run: {outcome['error']}")
            resume_from = Path(outcome["resume_from"]) if outcome["resume_from"] else None
            return _train(recipe, Path(recipe.output_dir), resume_from, accept_changes, started, world)
        try:
            # Wrong paths fail here, in a second and before the run directory exists, not after the encoder has loaded.
            check_models(recipe.model)
            problems = input_problems(recipe)
            if problems:
                raise RecipeError("the run cannot start:\n  " + "\n  ".join(problems))
            ensure_band_stats(recipe)  # a missing stats: file is computed from the training shards; one for other bands is refused
            run = open_run(recipe)
        except BaseException as exc:
            world.broadcast({"error": str(exc)})
            raise
        world.broadcast({"resume_from": str(run.resume_from) if run.resume_from else None})
        try:
            return _train(recipe, run.run_dir, run.resume_from, accept_changes, started, world)
        finally:
            run.lock.release()
    except BaseException as exc:
        if not world.distributed:
            raise
        outlive_launcher_stop()  # the launcher's SIGTERM must not cut this rank's one line short
        if isinstance(exc, RuntimeError) and peer_lost(exc) and not isinstance(exc, MmdomainError):
            raise lost_peer_error(world, recipe.output_dir, exc) from exc
        raise
    finally:
        world.close()


def _train(recipe: Recipe, run_dir: Path, resume_from: Path | None, accept_changes: bool, started: float, world: World) -> dict[str, Any]:
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    seed_everything(recipe.seed)  # the same on every rank: replicas start equal, and their random streams stay equal
    device = world.device
    main = world.is_main
    opt = recipe.optim

    # A resumed run must be the same run: the recipe is compared with the checkpoint's before anything is built.
    saved = read_trainer_state(resume_from) if resume_from is not None else None
    if saved and isinstance(saved.recipe.get("model"), dict):  # a run from before a model field existed ran as its legacy value
        absent = {field: value for field, value in LEGACY_DEFAULTS.items() if field not in saved.recipe["model"]}
        saved.recipe["model"] = with_legacy_defaults(saved.recipe["model"])
        # Its recipe.yaml (or the user's YAML) predates the field too: unless the recipe names it, the run goes on as it
        # ran, not under the field's new default (which would be refused as a change, or train another model).
        unnamed = {field: value for field, value in absent.items() if field not in recipe.model.model_fields_set}
        if unnamed:
            recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update=unnamed)})
    if saved:
        saved.recipe = with_new_fields(saved.recipe)  # a run from before distributed / gradient_checkpointing existed
    recipe_dict = recipe.model_dump(mode="json")
    changes = check_resume_changes(resume_from, saved.recipe, recipe_dict, accept_changes) if saved else []
    if saved is not None:
        check_same_world(resume_from, saved, world)

    # Model: built from the spec; a previous stage's weights (checked before anything loads), or this run's own
    # checkpoint when resuming; then the recipe decides what trains.
    # DPO and GRPO compare with the start model: a resumed run loads init_from again to rebuild that reference.
    objective = make_objective(recipe)
    handoff = check_handoff(recipe.model, recipe.init_from) if recipe.init_from and (resume_from is None or objective.needs_reference) else None
    model, processor = build_model(recipe.model)
    if handoff is not None:
        log.info("init_from %s: loaded %d tensors", handoff, len(load_handoff(model, handoff)))
    if objective.needs_reference:
        apply_trainable(model, recipe.trainable)  # the reference keeps what is about to train, as it starts
        objective.prepare(model, processor)
    if resume_from is not None:
        load_weights(model, resume_from)
    declared = apply_trainable(model, recipe.trainable)
    log.info("what trains (stage %s):\n%s", recipe.stage, trainable_table(model, recipe.trainable))
    if opt.gradient_checkpointing:
        log.info("gradient checkpointing: %s", ", ".join(enable_gradient_checkpointing(model)))
    model.train()
    if world.strategy != "fsdp":
        model.to(device)
    # Under FSDP2 the model stays where it was built until world.wrap shards it: fully_shard moves each unit to the
    # device as it shards it, one decoder block at a time, so no GPU ever holds the whole model (moving it first would
    # need exactly the memory FSDP is chosen to avoid).
    start_measuring(device)
    estimate = estimated_cost(model, recipe, device)  # what `mmdomain plan` says, recorded beside what the run measures
    if opt.compile:
        compile_model(model)

    # Data: media shards, or a feature cache made by the same frozen encoder from the same shards (checked).
    train_patterns, eval_patterns = recipe.data.train, recipe.data.eval
    layout = SampleFormat.from_recipe(recipe.data)
    if recipe.data.feature_cache:
        check_cacheable(recipe)
        train_patterns, eval_patterns = open_cache(recipe.data.feature_cache, model, processor, recipe)
        layout = SampleFormat()  # cache shards always hold numbered members, whatever the source shards used
        log.info("training from feature cache %s", recipe.data.feature_cache)
    if eval_patterns is not None:
        expand_shards(eval_patterns)  # a wrong eval pattern fails now, not after the first steps
    failures = FailureBudget(recipe.data.decode_error_budget)
    catalog = ShardCatalog(expand_shards(train_patterns), failures, patterns=train_patterns)
    dataset = TrainBatches(catalog, processor, layout=layout, seed=recipe.seed, shuffle_buffer=recipe.data.shuffle_buffer,
                           limit=recipe.data.max_train_samples, batch_size=opt.batch_size, pack_length=recipe.data.pack_length,
                           rank=world.rank, world=world.size, examples=objective.examples)
    if dataset.samples_per_epoch == 0:
        raise DataError(f"the training shards {train_patterns} hold no usable sample")
    steps = opt.max_steps or max(1, math.ceil(opt.epochs * dataset.batches_per_epoch() / opt.grad_accum))

    # The module steps call: a DDP wrapper, the model sharded in place (FSDP2), or the model itself. After the feature
    # cache is checked (it hashes the encoder's whole weights) and before the optimizer (FSDP2 replaces parameters).
    wrapped = world.wrap(model)

    # Optimizer; the LR of each step is set from the schedule, so it depends on the step alone.
    optimizer = torch.optim.AdamW(param_groups(model, recipe.lr, opt.lr, opt.weight_decay), betas=opt.betas,
                                  foreach=device.type == "cuda")
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    state = TrainerState(step=0, total_steps=steps, epoch=0, batch=0, failures={}, first_loss=None, recent_losses=[],
                         window=_empty_window(), recipe=recipe_dict, data=catalog.fingerprint(), world_size=world.size,
                         strategy=world.strategy)
    metrics, keys_log = JsonLog(run_dir / "metrics.jsonl"), JsonLog(run_dir / "samples.jsonl")
    if saved is not None:
        check_resume_data(resume_from, saved.data, state.data, accept_changes)
        if saved.step >= steps and (run_dir / "result.json").is_file():
            log.info("%s finished at step %d of %d already; nothing to do (raise optim.max_steps to train on)", run_dir, saved.step, steps)
            return json.loads((run_dir / "result.json").read_text())
        restore_training(resume_from, optimizer, model, rank=world.rank)
        if world.strategy == "fsdp":
            load_sharded_optimizer(model, optimizer, resume_from)
        failures.merge(saved.failures)
        state = TrainerState(**{**saved.__dict__, "total_steps": steps, "recipe": recipe_dict, "data": state.data,
                                "resumed_at": [*saved.resumed_at, saved.step]})
        if main:
            metrics.continue_after(saved.step).write(step=saved.step, event="resume", checkpoint=str(resume_from),
                                                     changes={name: [a, b] for name, a, b in changes})
            if recipe.log_sample_keys or keys_log.path.exists():
                keys_log.continue_after(saved.step)
        log.info("resuming from %s at step %d of %d", resume_from, saved.step, steps)
    elif main:
        metrics.start_fresh()
        if recipe.log_sample_keys:
            keys_log.start_fresh()
    if main:
        write_recipe(run_dir, recipe)
    stream = BatchStream(dataset, num_workers=recipe.data.num_workers, failures=failures, position=Position(state.epoch, state.batch),
                         pin_memory=device.type == "cuda")
    runner = StepRunner(world, model, wrapped, optimizer, precision=opt.precision, clip_grad_norm=opt.clip_grad_norm,
                        scaler_state=state.grad_scaler, objective=objective)
    bases = base_identities(recipe.model)

    earlier_seconds = state.seconds  # of the sessions before this one, when resuming

    def save(step: int) -> Path:
        state.epoch, state.batch = stream.position.epoch, stream.position.batch
        state.seconds = earlier_seconds + time.perf_counter() - started
        state.grad_scaler = runner.scaler_state()
        for rank_failures in world.gather(failures.state()):  # every rank's, so a resumed rank counts them all once
            failures.merge(rank_failures)
        state.failures = failures.state()
        target = step_directory(run_dir, step)
        if world.distributed:
            save_distributed(world, target, step, model=model, processor=processor, bases=bases, optimizer=optimizer, state=state)
            if main:
                point_latest(run_dir, target)
                prune(run_dir, recipe.keep_last)
                drop_replaced(run_dir)
                metrics.write(step=step, event="checkpoint", path=str(target))
            return target
        if target.exists() and read_marker(target) is None:  # not ours: a copy or an edit; kept, under another name
            kept_as = target.with_name(f"{target.name}.set-aside-{int(time.time())}")
            target.rename(kept_as)
            log.warning("%s was not a complete checkpoint; it is kept as %s and step %d is saved in its place", target, kept_as, step)
        try:
            with CheckpointWriter(target, step=step) as writer:
                write_model(writer, model, processor, bases)
                write_training(writer, state, optimizer, model)
        except CheckpointError as exc:
            previous = latest_checkpoint(run_dir)
            kept = f"the previous checkpoint {previous} is complete and untouched" if previous else "no earlier checkpoint exists"
            raise CheckpointError(f"step {step}: {exc}; {kept}. Free the space (or fix the cause) and continue with "
                                  f"`mmdomain run {run_dir} --resume`") from None
        point_latest(run_dir, target)
        prune(run_dir, recipe.keep_last)
        drop_replaced(run_dir)
        metrics.write(step=step, event="checkpoint", path=str(target))
        return target

    # Steps. The audit fingerprints the weights as the first step of this session finds them (restored ones included).
    audit = UpdateAudit(model, declared)
    pooled_failures = len(failures.failures)
    zero_grad_warned = False
    first_step = state.step + 1  # of this session: with optim.compile, the one that compiles
    with StopRequests() as stop:
        for step in tqdm(range(state.step + 1, steps + 1), desc=recipe.stage, initial=state.step, total=steps, dynamic_ncols=True,
                         disable=not main):
            t0, graphs = time.perf_counter(), CompileWatch.graphs() if opt.compile else 0
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * lr_factor(step - 1, warmup=opt.warmup_steps, total=steps, schedule=opt.schedule, min_ratio=opt.min_lr_ratio)
            micro = [stream.next_batch()[1] for _ in range(opt.grad_accum)]
            lr_used = optimizer.param_groups[0]["lr"]
            done = runner.run(step, micro, stream.zero_weight_batch)
            pooled_failures = _pool_failures(world, failures, pooled_failures)
            step_loss, grad_norm = done.loss, done.grad_norm
            if done.skipped:
                state.skipped_steps += 1
                log.warning("step %d: fp16 gradients overflowed; the step was skipped and the loss scale lowered to %g (%d skipped so far)",
                            step, runner.scaler.get_scale(), state.skipped_steps)
            elif grad_norm == 0.0 and not zero_grad_warned:
                zero_grad_warned = True
                log.warning("step %d: the gradient of every trained parameter is exactly 0, so nothing learns; check trainable, "
                            "the labels (is any token supervised?) and the learning rate", step)
            audit.after_step(step, max(group["lr"] for group in optimizer.param_groups))

            state.step = step
            state.first_loss = step_loss if state.first_loss is None else state.first_loss
            state.recent_losses = [*state.recent_losses, step_loss][-20:]
            window = state.window
            new_graphs = CompileWatch.graphs() - graphs if opt.compile else 0
            if new_graphs or (opt.compile and step == first_step):  # compiling, not training: reported on its own
                if main:
                    metrics.write(step=step, event="compile", seconds=round(time.perf_counter() - t0, 3), graphs=new_graphs)
            else:
                window["samples"] += done.samples
                window["tokens"] += done.tokens
                window["seconds"] += time.perf_counter() - t0
            window["loss"] += step_loss
            window["steps"] += 1
            if recipe.log_sample_keys:
                every_rank = world.gather(done.keys)  # rank order: the order one process at the global batch would train them
                if main:
                    keys_log.write(step=step, keys=[k for keys in every_rank for k in keys])
            if step % recipe.log_every == 0 or step == 1 or step == steps:
                if main:
                    metrics.write(step=step, epoch=stream.position.epoch, loss=window["loss"] / window["steps"], lr=lr_used,
                                  grad_norm=float(grad_norm), samples_per_s=window["samples"] / window["seconds"] if window["seconds"] else None,
                                  tokens_per_s=window["tokens"] / window["seconds"] if window["seconds"] else None, skipped_samples=failures.total,
                                  **({"skipped_steps": state.skipped_steps} if runner.scaler is not None else {}), **objective.metrics())
                state.window = _empty_window()
            if recipe.eval.every_steps and step % recipe.eval.every_steps == 0 and step != steps:
                try:
                    with world.whole_weights(model):
                        report = run_eval(model, processor, recipe, eval_patterns, layout, device=device, objective=objective)
                except MmdomainError as exc:  # a problem with the evaluation data must not cost the training run
                    log.error("step %d: evaluation failed, training goes on: %s", step, exc)
                    if main:
                        metrics.write(step=step, eval_error=str(exc))
                else:
                    if main:
                        metrics.write(step=step, eval=report)
                    log.info("step %d eval: %s", step, json.dumps(report))
            written = save(step) if step == steps or (recipe.save_every and step % recipe.save_every == 0) else None
            # A stop asked of any rank stops all of them at the same step (each must take part in the save).
            stopping = stop.requested if not world.distributed else world.sum([1.0 if stop.requested else 0.0])[0] > 0
            if stopping:
                written = written or save(step)
                raise RunInterrupted(f"stopped by {stop.requested} after step {step} of {steps}; checkpoint {written}"
                                     f"{' (the final evaluation did not run)' if step == steps else ''}. Continue with "
                                     f"{resume_command(world, run_dir)}", stop.signal_number)
    stream.close()
    audit.finish()

    # Every rank evaluates the same samples (FSDP2's forward gathers weights from all of them; a rank waiting idle
    # at a barrier through a long evaluation could time out); rank 0 records.
    with world.whole_weights(model):
        report = run_eval(model, processor, recipe, eval_patterns, layout, device=device,
                          path=run_dir / "eval_predictions.jsonl" if main else None, objective=objective)
    if report is not None and main:
        metrics.write(step=steps, eval=report)
    tail = state.recent_losses[-max(1, min(20, steps // 5)) :]
    result = {
        "stage": recipe.stage,
        "steps": steps,
        "first_loss": state.first_loss,
        "final_loss": sum(tail) / len(tail) if tail else None,
        "skipped_samples": failures.total,
        **({"skipped_steps": state.skipped_steps} if runner.scaler is not None else {}),
        **({"world_size": world.size, "strategy": world.strategy} if world.distributed else {}),
        "skipped": [f"{key}: {reason}" for key, (reason, _) in list(failures.failures.items())[:20]],
        "resumed_at": state.resumed_at,
        "eval": report,
        "seconds": round(earlier_seconds + time.perf_counter() - started, 2),
        "checkpoint": str(latest_checkpoint(run_dir)),
    }
    samples = steps * opt.batch_size * opt.grad_accum * world.size
    result["cost"] = {"measured": measured_cost(device, result["seconds"], samples, bool(state.resumed_at)), "estimate": estimate}
    if main:
        (run_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    log.info("stage %s done in %.1f s: loss %s -> %s%s", recipe.stage, result["seconds"], result["first_loss"], result["final_loss"],
             f", eval {json.dumps(report)}" if report else "")
    return result


def seed_everything(seed: int) -> None:
    """Seed every global random stream (torch, NumPy, Python): a run is then a function of its recipe, and the
    streams a checkpoint saves are the ones a run that never stopped would have."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _pool_failures(world: World, failures: FailureBudget, pooled: int) -> int:
    """Each rank decodes its own batches, so each meets its own failed samples: once any rank met a new one, every
    rank takes all ranks' failures, so data.decode_error_budget holds for the whole run (not per rank) and stops every
    rank at the same step. Returns how many failures are now pooled; one process has nothing to pool."""
    if not world.distributed:
        return pooled
    if world.sum([float(len(failures.failures) - pooled)])[0] > 0:
        for rank_failures in world.gather(failures.state()):
            failures.merge(rank_failures)
        failures.enforce()
    return len(failures.failures)


def _empty_window() -> dict[str, float]:
    return {"samples": 0, "tokens": 0, "seconds": 0.0, "loss": 0.0, "steps": 0}
