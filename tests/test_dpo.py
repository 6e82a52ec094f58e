"""DPO: the loss against hand-computed values, the reference really frozen (snapshot and LoRA adapters off), media that
do not fit refused by key, and a tiny end-to-end run whose held-out preference accuracy rises well above 0.5."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from mmdomain.builder import build_model
from mmdomain.data import Record
from mmdomain.objective_spec import DPOSpec
from mmdomain.objectives.dpo import DPOObjective, dpo_loss
from mmdomain.processor import SampleError
from mmdomain.recipe import RecipeError, validate_recipe
from mmdomain.trainability import apply_trainable

from .conftest import with_changes


def test_dpo_loss_matches_hand_computed_values_on_two_pairs():
    # pair 1: margin = 0.5 * ((-1 + 1.5) - (-2 + 1.5)) = 0.5; pair 2: 0.5 * ((-3 + 2) - (-1 + 2)) = -1
    losses, margins = dpo_loss(torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0]), torch.tensor([-1.5, -2.0]),
                               torch.tensor([-1.5, -2.0]), beta=0.5)
    assert margins.tolist() == pytest.approx([0.5, -1.0])
    assert losses.tolist() == pytest.approx([math.log(1 + math.exp(-0.5)), math.log(1 + math.exp(1.0))])
    assert losses.mean().item() == pytest.approx(0.8936693, abs=1e-6)


def _spec(llm_dir, **llm):
    return {"encoder": {"name": "tiny-vit", "options": {"image_size": 32, "patch_size": 8, "dim": 32, "channels": 1}},
            "llm": {"path": llm_dir, **llm}, "max_length": 64}


def _image(side: str, seed: int) -> Image.Image:
    """The answer is in the image's overall brightness, which even a frozen random encoder passes on."""
    img = np.random.default_rng(seed).normal(200 if side == "left" else 60, 15, (32, 32))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _pair(i: int) -> Record:
    side = ["left", "right"][i % 2]
    return Record(f"p{i}", [{"role": "user", "content": "<image> where is the lesion ?"}, {"role": "assistant", "content": side}],
                  [_image(side, i)], rejected="right" if side == "left" else "left")


def _objective_and_model(llm_dir, trainable, **llm):
    recipe = validate_recipe({"model": _spec(llm_dir, **llm), "data": {"train": "x"}, "optim": {"max_steps": 1}, "output_dir": "o",
                              "objective": "dpo", "trainable": trainable, "dpo": {"beta": 0.5, "sft_weight": 0.3}})
    model, processor = build_model(recipe.model)
    apply_trainable(model, recipe.trainable)
    objective = DPOObjective(recipe.dpo)
    objective.prepare(model, processor)
    return objective, model, processor


def test_dpo_objective_on_a_real_batch_is_the_formula(tiny_llm_dir):
    objective, model, processor = _objective_and_model(tiny_llm_dir, {"connector": True, "llm": "full"})
    batch = objective.examples.collate(processor, [objective.examples.build(processor, _pair(i)) for i in range(2)])
    assert batch["pairs"] == 2 and len(batch["input_ids"]) == 4 and batch["keys"] == ["p0", "p1"]
    # At the start the policy is the reference: each margin is 0 and each pair costs log 2, plus the SFT term.
    chosen = {k: (v[:2] if k in ("input_ids", "attention_mask", "labels") else v) for k, v in batch.items()}
    chosen["media"] = [type(batch["media"][0])(batch["media"][0].values[:2])]
    nll = model.sequence_logprobs(chosen["input_ids"], chosen["attention_mask"], chosen["labels"], chosen["media"], mean=True)
    loss = objective.loss(model, batch)
    assert loss.detach().item() == pytest.approx(2 * math.log(2) + 0.3 * float(-nll.detach().sum()), rel=1e-5)
    metrics = objective.metrics()
    assert metrics["reward_margin"] == pytest.approx(0.0, abs=1e-6) and metrics["preference_accuracy"] == 0.5
    assert metrics["kl_to_reference"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("setup", [({"connector": True, "llm": "full"}, {}), ({"connector": False, "llm": "lora"}, {"lora": {"r": 4, "alpha": 8}})],
                         ids=["snapshot", "lora-adapters-off"])
def test_reference_stays_frozen_while_the_policy_trains(tiny_llm_dir, setup):
    trainable, llm = setup
    objective, model, processor = _objective_and_model(tiny_llm_dir, trainable, **llm)
    assert objective.reference.adapters_off == ("lora" in llm)
    batch = objective.examples.collate(processor, [objective.examples.build(processor, _pair(i)) for i in range(4)])

    def logits():  # in eval mode: LoRA dropout would make two forwards differ
        model.eval()
        with torch.no_grad():
            out = model(batch["input_ids"], batch["attention_mask"], media=batch["media"], return_logits=True).logits.clone()
        model.train()
        return out

    start = logits()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        (objective.loss(model, batch) / 4).backward()
        optimizer.step()
        optimizer.zero_grad()
    trained = logits()
    with objective.reference.active(model):
        reference = logits()
    assert not torch.allclose(trained, start, atol=1e-4)  # the policy moved
    assert torch.equal(reference, start)  # the reference did not, bit for bit
    assert torch.equal(logits(), trained)  # and leaving the reference restores the policy


def test_a_pair_whose_media_would_not_fit_is_refused_by_key(tiny_llm_dir):
    objective, _, processor = _objective_and_model(tiny_llm_dir, {"connector": True})
    processor.max_length = 12  # the image alone is 16 tokens
    with pytest.raises(SampleError, match="sample p3: .*media block"):
        objective.examples.build(processor, _pair(3))
    record = _pair(1)
    record.rejected = None
    with pytest.raises(SampleError, match="sample p1: no rejected answer"):
        objective.examples.build(processor, record)


def test_recipe_objective_blocks_are_checked(tiny_llm_dir):
    base = {"model": _spec(tiny_llm_dir), "data": {"train": "x"}, "optim": {"max_steps": 1}, "output_dir": "o"}
    assert validate_recipe(base).objective == "sft" and validate_recipe(base).dpo is None
    assert validate_recipe({**base, "objective": "dpo"}).dpo == DPOSpec()
    with pytest.raises(RecipeError, match="a dpo: block is given but objective is 'sft'"):
        validate_recipe({**base, "dpo": {"beta": 0.2}})
    with pytest.raises(RecipeError, match="pack_length"):
        validate_recipe(with_changes({**base, "objective": "grpo"}, {"data__pack_length": 64}))
    with pytest.raises(RecipeError, match="beta"):
        validate_recipe({**base, "objective": "dpo", "dpo": {"beta": 0}})


def _write_pairs(root, n: int, start: int) -> None:
    (root / "media").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(start, start + n):
        side = ["left", "right"][i % 2]
        _image(side, i).save(root / "media" / f"{i}.png")
        rows.append({"id": f"q{i}", "media": [f"{i}.png"], "prompt": "where is the lesion ?", "chosen": side,
                     "rejected": "right" if side == "left" else "left"})
    rows.append({"media": [f"{start}.png"], "prompt": "where is the lesion ?", "flagged": True})  # an unjudged review line
    (root / f"pairs{start}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.slow
def test_dpo_end_to_end_raises_heldout_preference_accuracy(tiny_llm_dir, tmp_path):
    from mmdomain.shards import make_shards
    from mmdomain.train import train

    _write_pairs(tmp_path, 64, 0)
    _write_pairs(tmp_path, 32, 1000)
    for name, prefix in (("pairs0.jsonl", "train"), ("pairs1000.jsonl", "heldout")):
        manifest = make_shards(tmp_path / name, tmp_path / "media", tmp_path / "s", prefix=prefix)
        assert manifest["flagged_skipped"] == 1
    recipe = validate_recipe({"model": _spec(tiny_llm_dir), "objective": "dpo", "dpo": {"beta": 0.5},
                              "trainable": {"connector": True, "llm": "full"},
                              "data": {"train": str(tmp_path / "s" / "train-*.tar"), "eval": str(tmp_path / "s" / "heldout-*.tar"), "shuffle_buffer": 64},
                              "optim": {"max_steps": 20, "batch_size": 8, "lr": 1e-3, "warmup_steps": 3}, "output_dir": str(tmp_path / "run"),
                              "log_every": 5, "seed": 0})
    result = train(recipe)
    assert result["eval"]["dpo"]["pairs"] == 32
    assert result["eval"]["dpo"]["accuracy"] >= 0.85, result["eval"]["dpo"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert {"reward_margin", "preference_accuracy", "kl_to_reference"} <= set(rows[-1])
    assert rows[-1]["reward_margin"] > rows[0]["reward_margin"] and rows[-1]["kl_to_reference"] > 0
