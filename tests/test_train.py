"""The training loop: schedule, trainability, exact gradient accumulation, NaN stops, end-to-end through the CLI."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mmdomain.cli import main
from mmdomain.builder import build_model, load_pretrained
from mmdomain.model import MultimodalLM
from mmdomain.recipe import validate_recipe
from mmdomain.train import NonFiniteLossError, lr_factor, train
from mmdomain.trainability import apply_trainable, param_groups, trainable_table

from .conftest import with_changes, write_side_task



def test_lr_schedule_warmup_then_cosine():
    f = lambda s: lr_factor(s, warmup=10, total=110, schedule="cosine", min_ratio=0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5) and f(110) == pytest.approx(0.1)
    assert lr_factor(50, warmup=0, total=100, schedule="linear", min_ratio=0) == pytest.approx(0.5)


def _spec(llm_dir, **llm):
    return {"encoder": {"name": "tiny-vit", "options": {"image_size": 32, "patch_size": 8, "dim": 32, "channels": 1}},
            "llm": {"path": llm_dir, **llm}, "max_length": 64}


def _recipe(llm_dir, shards, out, **extra):
    data = {"model": _spec(llm_dir), "data": {"train": shards, "eval": shards, "shuffle_buffer": 16},
            "optim": {"max_steps": 30, "batch_size": 8, "lr": 3e-3, "warmup_steps": 3}, "output_dir": str(out), "log_every": 5, "seed": 0}
    return validate_recipe(with_changes(data, extra))


def test_trainable_switches_globs_and_groups(tiny_llm_dir):
    recipe = _recipe(tiny_llm_dir, "x", "o", trainable={"connector": True, "llm": False, "params": ["llm.*lm_head*"]}, lr={"llm": 5e-4})
    model, _ = build_model(recipe.model)
    apply_trainable(model, recipe.trainable)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {n for n in trained if n.startswith("connector.")} | {"llm.lm_head.weight"}
    groups = {g["name"]: g for g in param_groups(model, recipe.lr, 1e-3, 0.01)}
    assert groups["llm"]["lr"] == 5e-4 and groups["connector"]["lr"] == 1e-3 and groups["connector.no_decay"]["weight_decay"] == 0.0
    table = trainable_table(model)
    assert "connector" in table and "100.0%" in table and "0.0%" in table.splitlines()[2]
    with pytest.raises(ValueError, match="matches no parameter"):
        apply_trainable(model, recipe.trainable.model_copy(update={"params": ["nothing.*"]}))


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """Tiny learnable task: a bright left or right half; answer 'left' or 'right'."""
    root = tmp_path_factory.mktemp("task")
    write_side_task(root)
    return root


def test_gradient_accumulation_is_token_weighted_and_exact(tiny_llm_dir, shard_dir, tmp_path):
    assert main(["-q", "make-shards", "--jsonl", str(shard_dir / "samples.jsonl"), "--media", str(shard_dir / "media"), "--out", str(tmp_path / "s")]) == 0
    shards = str(tmp_path / "s" / "*.tar")
    weights = {}
    for name, extra in {"one": {"optim__batch_size": 8}, "accum": {"optim__batch_size": 4, "optim__grad_accum": 2}}.items():
        recipe = _recipe(tiny_llm_dir, shards, tmp_path / name, optim__max_steps=2, data__shuffle_buffer=0, data__eval=None, **extra)
        train(recipe)
        weights[name] = load_pretrained(tmp_path / name)[0].connector.state_dict()
    for k in weights["one"]:
        assert torch.allclose(weights["one"][k], weights["accum"][k], atol=1e-6), k


def test_training_with_packing(tiny_llm_dir, shard_dir, tmp_path):
    main(["-q", "make-shards", "--jsonl", str(shard_dir / "samples.jsonl"), "--media", str(shard_dir / "media"), "--out", str(tmp_path / "s")])
    result = train(_recipe(tiny_llm_dir, str(tmp_path / "s" / "*.tar"), tmp_path / "run", optim__max_steps=4, data__pack_length=128))
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert result["steps"] == 4 and all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in rows)


def test_non_finite_loss_stops_with_step_and_keys(tiny_llm_dir, shard_dir, tmp_path, monkeypatch):
    main(["-q", "make-shards", "--jsonl", str(shard_dir / "samples.jsonl"), "--media", str(shard_dir / "media"), "--out", str(tmp_path / "s")])
    recipe = _recipe(tiny_llm_dir, str(tmp_path / "s" / "*.tar"), tmp_path / "run", optim__max_steps=5)
    original = MultimodalLM.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            out.loss_sum = out.loss_sum * float("nan")
        return out

    monkeypatch.setattr(MultimodalLM, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"step 3: loss is nan on samples \['train-000000.tar:x"):
        train(recipe)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_local_model_is_a_clear_cli_error(tiny_llm_dir, shard_dir, tmp_path, capsys):
    main(["-q", "make-shards", "--jsonl", str(shard_dir / "samples.jsonl"), "--media", str(shard_dir / "media"), "--out", str(tmp_path / "s")])
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(json.dumps(_recipe(tiny_llm_dir, str(tmp_path / "s" / "*.tar"), tmp_path / "o").model_dump(mode="json")))
    assert main(["-q", "run", str(recipe_path), "model.llm.path=Qwen/Qwen2.5-0.5B-Instruct"]) == 2
    err = capsys.readouterr().err
    assert "model.llm.path 'Qwen/Qwen2.5-0.5B-Instruct' is not a local directory" in err and "never downloads" in err


@pytest.mark.slow
def test_end_to_end_cli_shards_align_instruct_eval(tiny_llm_dir, shard_dir, tmp_path, capsys):
    out = tmp_path / "shards"
    assert main(["-q", "make-shards", "--jsonl", str(shard_dir / "samples.jsonl"), "--media", str(shard_dir / "media"), "--out", str(out), "--samples-per-shard", "20"]) == 0
    base = _recipe(tiny_llm_dir, str(out / "*.tar"), tmp_path / "align").model_dump(mode="json")
    align_yaml = tmp_path / "align.yaml"
    align_yaml.write_text(json.dumps(base))  # JSON is YAML
    assert main(["-q", "run", str(align_yaml), "optim.max_steps=20"]) == 0
    capsys.readouterr()
    assert main(["-q", "run", str(align_yaml), f"output_dir={tmp_path / 'instruct'}", f"init_from={tmp_path / 'align'}",
                 "trainable.llm=lora", "model.llm.lora.r=8", "model.llm.lora.alpha=16", "trainable.params=[llm.*lm_head*]",
                 "lr.llm=3e-3", "optim.max_steps=40"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["final_loss"] < result["first_loss"] * 0.5
    align_result = json.loads((tmp_path / "align" / "result.json").read_text())
    assert align_result["final_loss"] < align_result["first_loss"]
    metrics = [json.loads(l) for l in (tmp_path / "instruct" / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s"} <= set(metrics[0])
    assert (tmp_path / "instruct" / "recipe.yaml").read_text().count("init_from") == 1

    assert main(["-q", "eval", str(tmp_path / "instruct"), "--data", str(out / "*.tar"), "--out", str(tmp_path / "report.json")]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["samples"] == 64 and report["closed"]["accuracy"] == result["eval"]["closed"]["accuracy"]

    # The checkpoint reloads to identical outputs, and init_from really carried stage 1's connector into stage 2.
    model, proc = load_pretrained(tmp_path / "instruct")
    again, _ = load_pretrained(tmp_path / "instruct")
    sample = proc([{"role": "user", "content": "<image> where is the lesion ?"}, {"role": "assistant", "content": "left"}],
                  [np.zeros((32, 32), np.uint8)], key="k")
    batch = proc.collate([sample])
    with torch.no_grad():
        assert torch.equal(model.eval()(**batch, return_logits=True).logits, again.eval()(**batch, return_logits=True).logits)
    assert main(["-q", "generate", str(tmp_path / "instruct"), "--image", str(shard_dir / "media" / "0.png"), "--question", "where is the lesion ?",
                 "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()
