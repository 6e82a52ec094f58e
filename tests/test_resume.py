"""A run killed at any moment and resumed equals the run that never stopped, bit for bit: parameters, optimizer
state, random streams, learning rates, losses and the sequence of sample keys. Each run is its own process
(``tests/fault_driver.py`` injects the fault), as a crash would be."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmdomain.checkpoint import complete_checkpoints, latest_checkpoint
from mmdomain.shards import make_shards

from .conftest import with_changes, write_side_task

DRIVER = Path(__file__).with_name("fault_driver.py")
STEPS, SAVE_EVERY = 10, 3


@pytest.fixture(scope="module")
def task(tmp_path_factory, tiny_llm_dir):
    """64 samples in 4 shards of a bright-left / bright-right task, and a recipe writer."""
    root = tmp_path_factory.mktemp("resume")
    write_side_task(root)
    make_shards(root / "samples.jsonl", root / "media", root / "shards", samples_per_shard=16)

    def recipe(name: str, **changes) -> Path:
        data = {
            "model": {"encoder": {"name": "tiny-vit", "options": {"image_size": 32, "patch_size": 8, "dim": 32, "channels": 1}},
                      "llm": {"path": tiny_llm_dir}, "max_length": 64},
            "data": {"train": str(root / "shards" / "*.tar"), "shuffle_buffer": 16},
            "optim": {"max_steps": STEPS, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2},
            "output_dir": str(root / "runs" / name), "seed": 0, "threads": 1, "log_every": 1, "save_every": SAVE_EVERY,
            "keep_last": 5, "log_sample_keys": True,
        }
        path = root / f"{name}.yaml"
        path.write_text(json.dumps(with_changes(data, changes)))
        return path

    recipe.root = root
    return recipe


def _mmdomain(*args: str, fault: tuple[str, int] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, str(DRIVER), fault[0], str(fault[1]), "--", *args] if fault else [sys.executable, "-m", "mmdomain.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _outcome(run_dir: Path) -> dict:
    """Everything the continuation must reproduce."""
    final = latest_checkpoint(run_dir)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "checkpoint": final.name,
        "weights": load_file(str(final / "model.safetensors")),
        "optimizer": load_file(str(final / "optimizer.safetensors")),
        "rng": load_file(str(final / "rng.safetensors")),
        "steps": [{k: row[k] for k in ("step", "epoch", "loss", "lr", "grad_norm", "skipped_samples")} for row in metrics if "loss" in row],
        "evals": [row["eval"] for row in metrics if "eval" in row],
        "keys": (run_dir / "samples.jsonl").read_text().splitlines(),
        "result": {k: v for k, v in json.loads((run_dir / "result.json").read_text()).items() if k not in ("seconds", "resumed_at", "checkpoint", "cost")},
    }


def _assert_same(resumed: dict, reference: dict) -> None:
    for part in ("weights", "optimizer", "rng"):
        assert resumed[part].keys() == reference[part].keys(), part
        for name, tensor in reference[part].items():
            assert torch.equal(resumed[part][name], tensor), f"{part}: {name} differs"
    for part in ("checkpoint", "steps", "evals", "keys", "result"):
        assert resumed[part] == reference[part], part


@pytest.fixture(scope="module")
def references(task):
    """Uninterrupted runs: stage 1 (connector), stage 2 (LoRA with dropout, so the random stream matters), and stage 2
    adapting the encoder too (LoRA on its blocks and its last block whole)."""
    out = {}
    for name, extra in {"align": {}, "align_w2_ga3": {"data__num_workers": 2, "optim__grad_accum": 3},
                        "lora_ga3": _lora(task, optim__grad_accum=3, eval__every_steps=4, eval__max_samples=8),
                        "lora_w2": _lora(task, data__num_workers=2), "encoder_parts": _encoder_parts(task)}.items():
        proc = _mmdomain("-q", "run", str(task(f"ref_{name}", **extra)))
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[name] = _outcome(task.root / "runs" / f"ref_{name}")
    return out


def _lora(task, **extra):
    return {"init_from": str(task.root / "runs" / "ref_align"), "trainable__llm": "lora",
            "model__llm__lora": {"r": 4, "alpha": 8, "dropout": 0.1}, "data__eval": str(task.root / "shards" / "*.tar"), **extra}


def _encoder_parts(task):
    return _lora(task, model__encoder__lora={"r": 4, "alpha": 8, "dropout": 0.1}, trainable__encoder={"last_blocks": 1, "lora": True})


@pytest.mark.slow
@pytest.mark.parametrize("combo", ["align", "align_w2_ga3", "lora_ga3", "lora_w2", "encoder_parts"])
def test_kill_at_a_random_step_then_resume_is_bit_identical(task, references, combo):
    extra = {"align": {}, "align_w2_ga3": {"data__num_workers": 2, "optim__grad_accum": 3}}.get(combo)
    if combo == "encoder_parts":
        extra = _encoder_parts(task)
    if extra is None:
        extra = _lora(task, **({"optim__grad_accum": 3, "eval__every_steps": 4, "eval__max_samples": 8} if combo == "lora_ga3"
                               else {"data__num_workers": 2}))
    kill_at = random.Random(combo).randint(2, STEPS - 1)
    recipe = task(f"killed_{combo}", **extra)
    killed = _mmdomain("-q", "run", str(recipe), fault=("kill-after-optimizer-step", kill_at))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run_dir = task.root / "runs" / f"killed_{combo}"
    saved = [step for step, _ in complete_checkpoints(run_dir)]
    assert saved == list(range(SAVE_EVERY, kill_at, SAVE_EVERY))  # killed before step kill_at could save: nothing later or partial
    resumed = _mmdomain("-q", "run", str(recipe), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    outcome = _outcome(run_dir)
    _assert_same(outcome, references[combo])
    if combo == "encoder_parts":  # the encoder's adapters and last block are among what resumed bit for bit
        assert {"encoder.blocks.0.qkv.lora_A.default.weight", "encoder.blocks.1.qkv.base_layer.weight"} <= set(outcome["weights"])
    assert json.loads((run_dir / "result.json").read_text())["resumed_at"] == ([saved[-1]] if saved else [])


@pytest.mark.slow
@pytest.mark.parametrize("fault", [("kill-before-rename", 2), ("kill-mid-write", 4)])
def test_kill_while_a_checkpoint_is_written(task, references, fault):
    """Between the COMPLETE marker and the rename, or mid-file: the half-made checkpoint is ignored (and removed),
    the previous one resumed from."""
    recipe = task(f"{fault[0]}", data__num_workers=2, optim__grad_accum=3)
    killed = _mmdomain("-q", "run", str(recipe), fault=fault)
    assert killed.returncode == -signal.SIGKILL
    run_dir = task.root / "runs" / fault[0]
    assert [s for s, _ in complete_checkpoints(run_dir)] == [3]
    litter = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    assert litter and all(".tmp-" in name for name in litter)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-00000003"
    resumed = _mmdomain("-q", "run", str(recipe), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    _assert_same(_outcome(run_dir), references["align_w2_ga3"])


@pytest.mark.slow
def test_disk_full_keeps_the_previous_checkpoint_and_resumes_from_it(task, references):
    recipe = task("disk_full")
    # safetensors files per checkpoint: model, optimizer, rng; the 5th write is the second checkpoint's optimizer.
    failed = _mmdomain("run", str(recipe), fault=("disk-full", 5))
    assert failed.returncode == 2
    last_line = failed.stderr.strip().splitlines()[-1]
    assert "step 6: could not write checkpoint" in last_line and "the disk is full" in last_line
    assert "step-00000003 is complete and untouched" in last_line and "--resume" in last_line and "Traceback" not in failed.stderr
    run_dir = task.root / "runs" / "disk_full"
    assert [s for s, _ in complete_checkpoints(run_dir)] == [3]
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".step")]
    resumed = _mmdomain("-q", "run", str(recipe), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same(_outcome(run_dir), references["align"])


@pytest.mark.slow
def test_killed_at_random_moments_until_done(task, references):
    """SIGKILL at random times (during start-up, steps, saves or the final evaluation), resumed each time with
    ``resume: auto``, until a process finishes: the result still equals the uninterrupted run."""
    recipe = task("chaos", data__num_workers=2, optim__grad_accum=3, resume="auto")
    rng = random.Random(7)
    for attempt in range(12):
        process = subprocess.Popen([sys.executable, "-m", "mmdomain.cli", "-q", "run", str(recipe)], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
        try:
            process.wait(timeout=rng.uniform(2.0, 9.0) if attempt < 8 else 300)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            continue
        assert process.returncode == 0, process.stderr.read()[-3000:]
        break
    else:
        pytest.fail("the run never finished")
    _assert_same(_outcome(task.root / "runs" / "chaos"), references["align_w2_ga3"])
