"""Feature cache: cached features reproduce the loss of the full pipeline, and a cache made for another encoder,
weights or preprocessing is refused."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmdomain.cli import main
from mmdomain.data import FailureBudget, expand_shards, iter_records
from mmdomain.feature_cache import FeatureCacheError, open_cache
from mmdomain.builder import build_model
from mmdomain.recipe import load_recipe


@pytest.fixture
def setup(tmp_path, tiny_llm_dir):
    (tmp_path / "media").mkdir()
    rows = []
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray((rng.random((32, 32)) * 255).astype(np.uint8)).save(tmp_path / "media" / f"{i}.png")
        rows.append({"id": f"c{i}", "image": f"{i}.png", "question": "where is the lesion ?", "answer": ["left", "right"][i % 2],
                     "choices": ["left", "right"]})
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["-q", "make-shards", "--jsonl", str(tmp_path / "s.jsonl"), "--media", str(tmp_path / "media"), "--out", str(tmp_path / "shards")]) == 0
    recipe = {"model": {"encoder": {"name": "tiny-vit", "options": {"image_size": 32, "dim": 32, "channels": 1}}, "llm": {"path": tiny_llm_dir}},
              "data": {"train": str(tmp_path / "shards" / "*.tar"), "eval": str(tmp_path / "shards" / "*.tar"), "shuffle_buffer": 0},
              "optim": {"max_steps": 3, "batch_size": 8}, "output_dir": str(tmp_path / "run"), "seed": 3}
    (tmp_path / "r.yaml").write_text(json.dumps(recipe))
    assert main(["-q", "cache-features", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "cache")]) == 0
    return tmp_path


def test_cached_features_give_the_same_loss(setup):
    recipe = load_recipe(setup / "r.yaml")
    torch.manual_seed(recipe.seed)  # as training builds it: the random encoder the cache was made with
    model, proc = build_model(recipe.model)
    raw = list(iter_records(expand_shards(recipe.data.train), proc.domains, failures=FailureBudget(0)))
    full = model(**proc.collate([proc(r.conversations, r.media, key=r.key) for r in raw[:8]]))
    train_patterns, _ = open_cache(setup / "cache", model, proc, recipe)
    cached = list(iter_records(expand_shards(train_patterns), proc.domains, failures=FailureBudget(0)))
    assert [r.conversations for r in cached[:8]] == [r.conversations for r in raw[:8]]
    batch = proc.collate([proc(r.conversations, r.media, key=r.key) for r in cached[:8]])
    assert batch["media"][0].encoded and batch["media"][0].values.shape == (8, 16, 32)
    assert abs(model(**batch).loss.item() - full.loss.item()) < 1e-3  # fp16 storage of the features


def test_training_runs_from_the_cache_and_mismatches_are_refused(setup, capsys):
    assert main(["-q", "run", str(setup / "r.yaml"), f"data.feature_cache={setup / 'cache'}"]) == 0
    result = json.loads((setup / "run" / "result.json").read_text())
    assert result["eval"]["samples"] == 24
    for change, named in (("seed=4", "other encoder weights"), ("model.encoder.options.layer=1", "model.encoder.options.layer: None in the cache, 1 here"),
                          ("model.encoder.options.image_size=64", "model.encoder.options.image_size: 32 in the cache, 64 here")):
        assert main(["-q", "run", str(setup / "r.yaml"), f"data.feature_cache={setup / 'cache'}", change, f"output_dir={setup / 'x'}", "overwrite=true"]) == 2
        assert named in capsys.readouterr().err  # the difference is named, not two hashes
    assert main(["-q", "run", str(setup / "r.yaml"), f"data.feature_cache={setup / 'cache'}", "trainable.encoder=true",
                 f"output_dir={setup / 'y'}"]) == 2
    assert "trains the encoder" in capsys.readouterr().err
    with pytest.raises(FeatureCacheError, match="not a complete feature cache"):
        recipe = load_recipe(setup / "r.yaml")
        model, proc = build_model(recipe.model)
        open_cache(setup / "shards", model, proc, recipe)


def test_the_cache_must_come_from_the_recipes_data(setup, capsys):
    """A cache stands for the shards it was made from: other data.train, or a data.eval it has no split for, is refused
    (it used to train on the cache's data and skip evaluation silently)."""
    import shutil

    other = setup / "other"
    shutil.copytree(setup / "shards", other)
    (other / "train-000000.tar").write_bytes((other / "train-000000.tar").read_bytes()[:-10240])  # other content, same name
    base = ["-q", "run", str(setup / "r.yaml"), f"data.feature_cache={setup / 'cache'}", "overwrite=true"]
    assert main([*base, f"data.train={other / '*.tar'}", f"output_dir={setup / 'a'}"]) == 2
    assert "was made from data.train=" in capsys.readouterr().err
    recipe = json.loads((setup / "r.yaml").read_text())
    recipe["data"]["eval"] = None
    (setup / "no_eval.yaml").write_text(json.dumps(recipe))
    assert main(["-q", "cache-features", str(setup / "no_eval.yaml"), "--out", str(setup / "cache2")]) == 0
    capsys.readouterr()
    assert main(["-q", "run", str(setup / "r.yaml"), f"data.feature_cache={setup / 'cache2'}", f"output_dir={setup / 'b'}"]) == 2
    assert "has no eval split" in capsys.readouterr().err
    assert main(["-q", "run", str(setup / "r.yaml"), f"data.feature_cache={setup / 'cache2'}", f"output_dir={setup / 'c'}", "data.eval=null"]) == 0
    assert json.loads((setup / "c" / "result.json").read_text())["eval"] is None


def test_the_printed_follow_up_command_keeps_the_overrides_and_works(setup, capsys):
    """The hint used to drop the overrides the cache was made with, so the copied command was refused."""
    import shlex

    out = setup / "cache-wide"
    overrides = ["model.encoder.options.dim=48", f"output_dir={setup / 'run wide'}"]
    assert main(["-q", "cache-features", str(setup / "r.yaml"), *overrides, "--out", str(out)]) == 0
    hint = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("# train from it: "))
    command = shlex.split(hint.removeprefix("# train from it: "))
    assert command[:2] == ["mmdomain", "run"] and command[3:] == [*overrides, f"data.feature_cache={out}"]
    assert main(["-q", *command[1:]]) == 0
    assert json.loads((setup / "run wide" / "result.json").read_text())["steps"] == 3
    # From a run directory: the hint starts a new run beside it (the run directory itself holds a finished run).
    assert main(["-q", "cache-features", str(setup / "run wide"), "--out", str(setup / "cache-again")]) == 0
    hint = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("# train from it: "))
    command = shlex.split(hint.removeprefix("# train from it: "))
    assert command[2] == str(setup / "run wide" / "recipe.yaml") and f"output_dir={setup / 'run wide'}-cached" in command
    assert main(["-q", *command[1:]]) == 0


@pytest.mark.parametrize("parts", [{"last_blocks": 1}, "lora", {"norms": True}, True])
def test_a_cache_refuses_every_way_of_training_the_encoder(parts):
    """The last blocks, LoRA adapters or norms change the features as training the whole encoder does."""
    from mmdomain.feature_cache import check_cacheable
    from mmdomain.recipe import validate_recipe

    encoder = {"name": "tiny-vit", **({"lora": {"r": 4}} if parts == "lora" else {})}
    recipe = validate_recipe({"model": {"encoder": encoder, "llm": {"path": "llm"}}, "data": {"train": "x", "feature_cache": "c"},
                              "optim": {"max_steps": 1}, "output_dir": "o", "trainable": {"encoder": parts}})
    with pytest.raises(FeatureCacheError, match="trains (part of )?the encoder.*a feature cache cannot serve it"):
        check_cacheable(recipe)
