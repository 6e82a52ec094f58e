"""A second run into the same folder, overwrite, resume with a changed recipe, two processes at once, SIGTERM."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mmdomain.checkpoint import complete_checkpoints, latest_checkpoint, step_directory
from mmdomain.data import DataError
from mmdomain.recipe import validate_recipe
from mmdomain.run_dir import REPLACED, ResumeError, RunDirectoryError, RunLock
from mmdomain.shards import make_shards
from mmdomain.train import train

from .conftest import with_changes

DRIVER = Path(__file__).with_name("fault_driver.py")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("rundir")
    (root / "media").mkdir()
    rows = []
    for i in range(32):
        Image.fromarray(np.full((32, 32), 40 + 5 * i, np.uint8)).save(root / "media" / f"{i}.png")
        rows.append({"id": f"r{i}", "image": f"{i}.png", "question": "where is the lesion ?", "answer": ["left", "right"][i % 2]})
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    make_shards(root / "rows.jsonl", root / "media", root / "shards", samples_per_shard=8)
    return str(root / "shards" / "*.tar")


def _recipe(llm_dir, shards, out, **changes):
    data = {"model": {"encoder": {"name": "tiny-vit", "options": {"image_size": 32, "patch_size": 8, "dim": 32, "channels": 1}},
                      "llm": {"path": llm_dir}, "max_length": 64},
            "data": {"train": shards, "shuffle_buffer": 8}, "optim": {"max_steps": 6, "batch_size": 4, "lr": 3e-3},
            "output_dir": str(out), "save_every": 2, "log_every": 1}
    return validate_recipe(with_changes(data, changes))


def test_a_second_run_into_the_same_folder_is_refused_with_the_ways_out(tiny_llm_dir, shards, tmp_path):
    train(_recipe(tiny_llm_dir, shards, tmp_path / "run"))
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(RunDirectoryError, match=r"already holds a run \(complete up to step 6\); continue it with --resume.*overwrite=true"):
        train(_recipe(tiny_llm_dir, shards, tmp_path / "run"))
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


def _empty_shard(tmp_path) -> str:
    """A shard that exists but holds no sample: the run starts, then fails on its data before the first checkpoint."""
    from .conftest import write_tar

    write_tar(tmp_path / "empty-0.tar", [])
    return str(tmp_path / "empty-*.tar")


def test_overwrite_keeps_the_old_run_until_the_new_one_has_a_checkpoint(tiny_llm_dir, shards, tmp_path):
    run = tmp_path / "run"
    train(_recipe(tiny_llm_dir, shards, run))
    old_weights = load_file(str(latest_checkpoint(run) / "model.safetensors"))
    (run / "notes.txt").write_text("mine")  # not a run file: overwrite must never touch it
    # A new run that dies before its first checkpoint (a data error) loses nothing: the old run is set aside whole.
    with pytest.raises(DataError):
        train(_recipe(tiny_llm_dir, _empty_shard(tmp_path), run, overwrite=True))
    assert (run / REPLACED / "checkpoints").is_dir() and not (run / "checkpoints").exists()
    kept = load_file(str(latest_checkpoint(run / REPLACED) / "model.safetensors"))
    assert all(torch.equal(kept[k], v) for k, v in old_weights.items())
    # A new run that gets to its first checkpoint replaces the old one; metrics are its own only.
    result = train(_recipe(tiny_llm_dir, shards, run, overwrite=True, optim__max_steps=4, seed=1))
    assert not (run / REPLACED).exists() and (run / "notes.txt").read_text() == "mine"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 4 and result["steps"] == 4 and [s for s, _ in complete_checkpoints(run)] == [2, 4]


def test_resume_takes_allowed_changes_and_refuses_the_others(tiny_llm_dir, shards, tmp_path, caplog):
    run = tmp_path / "run"
    train(_recipe(tiny_llm_dir, shards, run))
    # Finished run, same recipe: nothing to redo.
    assert train(_recipe(tiny_llm_dir, shards, run, resume=True))["steps"] == 6
    with pytest.raises(ResumeError, match=r"changes that make it another run \(.*model.connector.options.depth: None -> 3.*"
                                          r"optim.batch_size: 4 -> 2.*--accept-changes"):
        train(_recipe(tiny_llm_dir, shards, run, resume=True, optim__batch_size=2, model__connector={"name": "mlp", "options": {"depth": 3}}))
    # Same pattern, other files (a shard removed since): the saved data position would point elsewhere.
    import shutil

    own = tmp_path / "own"
    shutil.copytree(Path(shards).parent, own)
    train(_recipe(tiny_llm_dir, str(own / "*.tar"), tmp_path / "run2", optim__max_steps=2))
    moved = shutil.copytree(own, tmp_path / "moved")  # the same files elsewhere: the same run
    assert train(_recipe(tiny_llm_dir, str(moved / "*.tar"), tmp_path / "run2", resume=True, optim__max_steps=3))["steps"] == 3
    (own / "train-000003.tar").unlink()
    with pytest.raises(ResumeError, match=r"data \(shard files\): '4 shards as recorded' -> '3 shards \(missing: train-000003.tar"):
        train(_recipe(tiny_llm_dir, str(own / "*.tar"), tmp_path / "run2", resume=True, optim__max_steps=4))
    # More steps and another LR continue the same run, logged as a diff.
    caplog.set_level("INFO")
    result = train(_recipe(tiny_llm_dir, shards, run, resume=True, optim__max_steps=9, optim__lr=1e-3))
    assert result["steps"] == 9 and result["resumed_at"] == [6]
    assert "resume: optim.max_steps changed from 6 to 9" in caplog.text
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["changes"] for r in rows if r.get("event") == "resume"][-1]["optim.lr"] == [3e-3, 1e-3]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 10))
    # --accept-changes continues anyway.
    assert train(_recipe(tiny_llm_dir, shards, run, resume=True, optim__max_steps=10, data__shuffle_buffer=0), accept_changes=True)["steps"] == 10


def test_resume_with_nothing_to_resume(tiny_llm_dir, shards, tmp_path):
    with pytest.raises(ResumeError, match="nothing to resume in .*start it without --resume"):
        train(_recipe(tiny_llm_dir, shards, tmp_path / "empty", resume=True))
    assert train(_recipe(tiny_llm_dir, shards, tmp_path / "auto", resume="auto", optim__max_steps=2))["resumed_at"] == []


def test_one_process_per_run_directory(tiny_llm_dir, shards, tmp_path):
    (tmp_path / "run").mkdir()
    holder = RunLock(tmp_path / "run")
    holder.acquire()
    try:
        with pytest.raises(RunDirectoryError, match=rf"another mmdomain process \(pid {os.getpid()}\) is running into"):
            train(_recipe(tiny_llm_dir, shards, tmp_path / "run"))
    finally:
        holder.release()
    train(_recipe(tiny_llm_dir, shards, tmp_path / "run", optim__max_steps=1))


@pytest.mark.slow
def test_sigterm_saves_at_the_step_boundary_and_the_resumed_run_is_identical(tiny_llm_dir, shards, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(_recipe(tiny_llm_dir, shards, tmp_path / "run", save_every=0, threads=1,
                                         data__num_workers=2).model_dump(mode="json")))
    stopped = subprocess.run([sys.executable, str(DRIVER), "sigterm-after-optimizer-step", "3", "--", "run", str(recipe)],
                             capture_output=True, text=True, timeout=300)
    assert stopped.returncode == 143, stopped.stderr[-2000:]  # 128 + SIGTERM, as a shell reports it
    assert "stopped by SIGTERM after step 3 of 6" in stopped.stderr.strip().splitlines()[-1]
    assert [s for s, _ in complete_checkpoints(tmp_path / "run")] == [3]
    resumed = subprocess.run([sys.executable, "-m", "mmdomain.cli", "-q", "run", str(tmp_path / "run"), "--resume"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    reference = subprocess.run([sys.executable, "-m", "mmdomain.cli", "-q", "run", str(recipe), f"output_dir={tmp_path / 'ref'}"],
                               capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-2000:]
    a = load_file(str(latest_checkpoint(tmp_path / "run") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "ref") / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_never_deletes_what_it_cannot_continue(tiny_llm_dir, shards, tmp_path):
    """A run directory of an older mmdomain (checkpoint/, result.json) is refused by --resume and left as it is."""
    run = tmp_path / "old"
    (run / "checkpoint").mkdir(parents=True)
    (run / "checkpoint" / "mmdomain_config.json").write_text('{"format": "mmdomain-checkpoint/1"}')
    (run / "result.json").write_text("{}")
    with pytest.raises(ResumeError, match=r"no checkpoint this mmdomain can continue from \(checkpoint/ was written by an older "
                                          r"mmdomain \(format 1\)\); start it again with overwrite=true"):
        train(_recipe(tiny_llm_dir, shards, run, resume=True))
    assert (run / "checkpoint" / "mmdomain_config.json").is_file() and (run / "result.json").is_file()
    with pytest.raises(RunDirectoryError, match="already holds a run"):
        train(_recipe(tiny_llm_dir, shards, run, resume="auto"))
    assert (run / "result.json").is_file()


def test_a_damaged_newest_checkpoint_is_stepped_around(tiny_llm_dir, shards, tmp_path, caplog):
    run = tmp_path / "run"
    train(_recipe(tiny_llm_dir, shards, run, keep_last=3))
    newest = latest_checkpoint(run)
    (newest / "optimizer.safetensors").write_bytes(b"\0" * 10)  # a bad block, say
    result = train(_recipe(tiny_llm_dir, shards, run, keep_last=3, resume=True))
    assert result["resumed_at"] == [4] and result["steps"] == 6
    assert f"not resuming from {newest}" in caplog.text and "truncated" in caplog.text


@pytest.mark.slow
def test_a_killed_run_with_workers_can_be_resumed_at_once(tiny_llm_dir, shards, tmp_path):
    """DataLoader workers outlive a kill -9 of their parent by a few seconds; they must not hold the run's lock."""
    import time

    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(_recipe(tiny_llm_dir, shards, tmp_path / "run", optim__max_steps=400, save_every=1,
                                         data__num_workers=2).model_dump(mode="json")))
    process = subprocess.Popen([sys.executable, "-m", "mmdomain.cli", "-q", "run", str(recipe)], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not complete_checkpoints(tmp_path / "run") and time.monotonic() < deadline:
        time.sleep(0.2)
    process.kill()
    process.wait()
    resumed = subprocess.run([sys.executable, "-m", "mmdomain.cli", "-q", "run", str(recipe), "--resume", "optim.max_steps=12"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]


def test_an_interrupted_overwrite_puts_the_old_run_back(tiny_llm_dir, shards, tmp_path):
    run = tmp_path / "run"
    train(_recipe(tiny_llm_dir, shards, run, optim__max_steps=2))
    kept = load_file(str(latest_checkpoint(run) / "model.safetensors"))
    with pytest.raises(DataError):  # the new run dies before its first checkpoint, the old one waits in .replaced/
        train(_recipe(tiny_llm_dir, _empty_shard(tmp_path), run, overwrite=True))
    with pytest.raises(RunDirectoryError, match="already holds a run"):  # a plain run must not take (and delete) it
        train(_recipe(tiny_llm_dir, shards, run))
    assert not (run / REPLACED).exists()
    assert train(_recipe(tiny_llm_dir, shards, run, optim__max_steps=3, resume=True))["resumed_at"] == [2]
    back = load_file(str(step_directory(run, 2) / "model.safetensors"))
    assert all(torch.equal(back[k], v) for k, v in kept.items())


def test_a_checkpoint_folder_without_its_marker_is_skipped_not_deleted(tiny_llm_dir, shards, tmp_path):
    run = tmp_path / "run"
    train(_recipe(tiny_llm_dir, shards, run, optim__max_steps=4))
    (step_directory(run, 4) / "COMPLETE").unlink()  # a copy in progress, say
    assert train(_recipe(tiny_llm_dir, shards, run, optim__max_steps=5, resume=True))["resumed_at"] == [2]
    kept = [p for p in (run / "checkpoints").iterdir() if p.name.startswith("step-00000004.set-aside-")]
    assert len(kept) == 1 and (kept[0] / "model.safetensors").is_file()  # the marker-less folder was kept, renamed
    assert [s for s, _ in complete_checkpoints(run)][-1] == 5


def test_a_run_directory_given_to_the_cli_is_where_the_run_continues(tiny_llm_dir, shards, tmp_path):
    """A copied run continues in the copy, not in the folder its recipe.yaml first named."""
    import shutil

    from mmdomain.cli import main

    train(_recipe(tiny_llm_dir, shards, tmp_path / "a", optim__max_steps=2))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert main(["-q", "run", str(tmp_path / "b"), "--resume", "optim.max_steps=3"]) == 0
    assert [s for s, _ in complete_checkpoints(tmp_path / "b")] == [2, 3]
    assert [s for s, _ in complete_checkpoints(tmp_path / "a")] == [2]
