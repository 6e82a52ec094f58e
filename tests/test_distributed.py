"""`mmdomain run` under torchrun on 2 CPU processes (gloo): DDP and FSDP2 train the same parameters as one process at
the same global batch, the ranks' samples partition one process's, a 2-rank run resumes exactly, and another world
size is refused. Each 2-rank run is a real ``torchrun ... -m mmdomain.cli run`` subprocess."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmdomain.checkpoint import latest_checkpoint
from mmdomain.recipe import load_recipe
from mmdomain.run_dir import ResumeError
from mmdomain.shards import make_shards
from mmdomain.train import train

from .conftest import with_changes, write_side_task

# 18 samples, 2 ranks at batch 2 against one process at batch 4: 5 global batches per epoch, the last one 2 samples
# (rank 1's slot there is padding), so the epoch end and a zero-weight step are exercised.
SAMPLES, STEPS = 18, 6

# Different summation order (two ranks' partial sums, then gloo's) moves float32 results by a few ulps per step
# (measured: at most 3.4e-8 after 6 steps, DDP and FSDP2); Adam's normalisation can grow that where a gradient is ~0,
# hence 1e-5 absolute. The LR is 3e-3: a wrong weight, a lost or doubled sample, is off by ~1e-3 (LoRA dropout left
# on gave 6.6e-3).
ATOL = 1e-5


@pytest.fixture(scope="module")
def task(tmp_path_factory, tiny_llm_dir):
    root = tmp_path_factory.mktemp("dist")
    write_side_task(root, n=24)
    make_shards(root / "samples.jsonl", root / "media", root / "shards", samples_per_shard=8)

    def recipe(name: str, **changes) -> Path:
        data = {
            "model": {"encoder": {"name": "tiny-vit", "options": {"image_size": 32, "patch_size": 8, "dim": 32, "channels": 1}},
                      "llm": {"path": tiny_llm_dir}, "max_length": 64},
            "data": {"train": str(root / "shards" / "*.tar"), "shuffle_buffer": 8, "max_train_samples": SAMPLES},
            "optim": {"max_steps": STEPS, "batch_size": 4, "lr": 3e-3, "schedule": "constant"},
            "output_dir": str(root / "runs" / name), "seed": 0, "threads": 1, "log_every": 1, "log_sample_keys": True,
            "device": "cpu",
        }
        path = root / f"{name}.yaml"
        path.write_text(json.dumps(with_changes(data, changes)))
        return path

    recipe.root = root
    return recipe


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DRIVER = Path(__file__).with_name("fault_driver.py")


def torchrun(recipe: Path, *overrides: str, nproc: int = 2, fault: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    """``torchrun -m mmdomain.cli run RECIPE``; with ``fault``, each rank runs the CLI through tests/fault_driver.py."""
    program = [str(DRIVER), fault[0], str(fault[1]), "--"] if fault else ["-m", "mmdomain.cli"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
               "--master-port", str(_free_port()), *program, "-q", "run", str(recipe), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(run_dir) / "model.safetensors"))


def _keys(run_dir: Path) -> list[list[str]]:
    return [json.loads(line)["keys"] for line in (run_dir / "samples.jsonl").read_text().splitlines()]


def _stage(task, kind: str) -> dict:
    if kind == "connector":
        return {}
    init = {"init_from": str(task.root / "runs" / "one_connector")}
    if kind == "lora":
        # No LoRA dropout: its masks are drawn per micro-batch, so 2 x 2 samples get other masks than 1 x 4.
        return {**init, "trainable__llm": "lora", "model__llm__lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
    return {**init, "trainable__llm": "full"}


@pytest.fixture(scope="module")
def one_process(task):
    """One process at the global batch (4): stage 1, then stage 2 with LoRA and with the whole LLM from it."""
    out = {}
    for kind in ("connector", "lora", "full"):
        run_dir = task.root / "runs" / f"one_{kind}"
        train(load_recipe(task(f"one_{kind}", **_stage(task, kind))))
        out[kind] = (_weights(run_dir), _keys(run_dir))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("strategy,kind", [("ddp", "connector"), ("ddp", "lora"), ("fsdp", "connector"), ("fsdp", "lora"),
                                           ("fsdp", "full")])
def test_two_ranks_train_what_one_process_trains(task, one_process, strategy, kind):
    name = f"two_{strategy}_{kind}"
    proc = torchrun(task(name, optim__batch_size=2, distributed={"strategy": strategy}, **_stage(task, kind)))
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = task.root / "runs" / name
    reference, reference_keys = one_process[kind]
    weights = _weights(run_dir)
    assert weights.keys() == reference.keys()
    for key, tensor in reference.items():
        torch.testing.assert_close(weights[key], tensor, atol=ATOL, rtol=0, msg=lambda m, key=key: f"{key}: {m}")
    # Per step, rank 0's samples then rank 1's are exactly the samples one process trained on: none lost, none twice.
    assert _keys(run_dir) == reference_keys
    flat = [k for keys in reference_keys for k in keys]
    epoch = flat[: SAMPLES]
    assert len(set(epoch)) == SAMPLES
    result = json.loads((run_dir / "result.json").read_text())
    assert result["world_size"] == 2 and result["strategy"] == strategy


@pytest.mark.slow
def test_two_ranks_killed_mid_save_resume_exactly_and_refuse_another_world_size(task):
    # The encoder's last block and the connector train (FSDP2's root unit), saved every 2 steps.
    settings = {"optim__batch_size": 2, "distributed": {"strategy": "fsdp"}, "trainable__encoder": {"last_blocks": 1}, "save_every": 2}
    whole = torchrun(task("resume_whole", **settings))
    assert whole.returncode == 0, whole.stderr[-4000:]
    cut_recipe = task("resume_cut", **settings)
    # Rank 0 writes model.safetensors and rng.safetensors per save: the 3rd write is step 4's weights, after every rank
    # wrote its DCP optimizer shard into the temporary folder. Half of it is written, then rank 0 is killed.
    killed = torchrun(cut_recipe, fault=("kill-mid-write", 3))
    assert killed.returncode != 0
    cut = task.root / "runs" / "resume_cut"
    assert latest_checkpoint(cut).name == "step-00000002"  # the step-4 save never became a checkpoint
    assert (latest_checkpoint(cut) / "optimizer" / ".metadata").is_file()  # FSDP2's moments went through DCP
    with pytest.raises(ResumeError, match="saved by a run on 2 process.*this one has 1.*torchrun --nproc-per-node 2"):
        train(load_recipe(cut_recipe, ["resume=true"]))
    second = torchrun(cut_recipe, "--resume")
    assert second.returncode == 0, second.stderr[-4000:]
    assert json.loads((cut / "result.json").read_text())["resumed_at"] == [2]
    for key, tensor in _weights(task.root / "runs" / "resume_whole").items():
        assert torch.equal(_weights(cut)[key], tensor), key
    assert _keys(cut) == _keys(task.root / "runs" / "resume_whole")


def _corrupt_copy(shards: Path, out: Path, broken: set[str]) -> None:
    """``shards`` copied to ``out`` with the image of each sample in ``broken`` cut to 20 bytes (it no longer decodes)."""
    import io
    import shutil
    import tarfile

    out.mkdir()
    for tar in sorted(shards.glob("*.tar")):
        with tarfile.open(tar) as src, tarfile.open(out / tar.name, "w") as dst:
            for member in src.getmembers():
                data = src.extractfile(member).read()
                if member.name.split(".")[0] in broken and not member.name.endswith(".json"):
                    data = data[:20]
                info = tarfile.TarInfo(member.name)
                info.size = len(data)
                dst.addfile(info, io.BytesIO(data))
    shutil.copy(shards / "manifest.json", out / "manifest.json")


@pytest.mark.slow
def test_decode_error_budget_holds_for_all_ranks_together(task):
    # x3 and x18 fall to different ranks (each meets one failure), 2 in all: over a budget of 1, as in one process.
    shards = task.root / "broken_shards"
    _corrupt_copy(task.root / "shards", shards, {"x3", "x18"})
    proc = torchrun(task("budget", optim__batch_size=2, data__train=str(shards / "*.tar"), data__max_train_samples=None,
                         data__decode_error_budget=1))
    assert proc.returncode != 0, proc.stderr[-4000:]
    assert "2 samples failed, over data.decode_error_budget=1" in proc.stderr, proc.stderr[-4000:]
    assert not (task.root / "runs" / "budget" / "result.json").exists()


@pytest.mark.slow
def test_a_killed_rank_is_reported_by_the_others_as_theirs_not_as_a_defect(task, monkeypatch):
    monkeypatch.setenv("FAULT_RANK", "1")
    # torchrun SIGTERMs the survivor ~0.05 s after rank 1 dies; a teardown slower than that (as under load in CI) must
    # not cost rank 0 its report
    monkeypatch.setenv("SLOW_TEARDOWN_S", "1")
    proc = torchrun(task("peer_killed", optim__batch_size=2, optim__max_steps=4), fault=("kill-after-optimizer-step", 2))
    assert proc.returncode != 0
    assert "rank 0: another rank of this run stopped first" in proc.stderr, proc.stderr[-4000:]
    assert "--nproc-per-node 2 --no-python mmdomain run" in proc.stderr
    assert "defect in mmdomain" not in proc.stderr, proc.stderr[-4000:]


@pytest.mark.slow
def test_a_stop_asked_of_one_rank_stops_every_rank_at_one_checkpoint_and_names_the_launch_to_resume(task, monkeypatch):
    monkeypatch.setenv("FAULT_RANK", "1")  # only rank 1 gets SIGTERM (a scheduler signalling one process)
    proc = torchrun(task("one_stopped", optim__batch_size=2, optim__max_steps=5), fault=("sigterm-after-optimizer-step", 2))
    assert proc.returncode != 0
    run_dir = task.root / "runs" / "one_stopped"
    assert latest_checkpoint(run_dir).name == "step-00000002"  # the save is collective: rank 0 stopped at the same step
    # (whether rank 0 prints its line too depends on torchrun's SIGTERM after rank 1 exits: not asserted)
    assert "stopped by SIGTERM after step 2 of 5" in proc.stderr, proc.stderr[-4000:]
    assert f"torchrun --nproc-per-node 2 --no-python mmdomain run {run_dir} --resume" in proc.stderr, proc.stderr[-4000:]
