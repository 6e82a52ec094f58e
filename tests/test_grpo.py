"""GRPO: advantages, the clipped objective and the k3 KL against hand-computed values; sampling and scoring on a tiny
model (rollout rows, metrics, the reference untouched); prompts that would not fit are refused by key; and an
end-to-end run from an under-trained stage 2 on the demo task that raises held-out closed accuracy."""
from __future__ import annotations

import json
import math

import pytest
import torch

from mmdomain.builder import build_model
from mmdomain.objectives.grpo import GRPOObjective, clipped_surrogate, group_advantages, k3_kl
from mmdomain.processor import SampleError
from mmdomain.recipe import validate_recipe
from mmdomain.trainability import apply_trainable

from .test_dpo import _pair, _spec


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    # group 1: mean 0.25, population std sqrt(0.25 * 0.75) = 0.4330127; group 2 all equal: nothing to learn
    adv = group_advantages(rewards, 4)
    assert adv[:4].tolist() == pytest.approx([0.75 / (0.4330127 + 1e-4)] + [-0.25 / (0.4330127 + 1e-4)] * 3, rel=1e-6)
    assert adv[4:].tolist() == [0.0] * 4
    assert group_advantages(rewards, 4, scale=False).tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0])


def test_clipped_objective_by_hand():
    logp = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5, 1.1])).requires_grad_()
    old = torch.zeros(5)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0])
    loss = clipped_surrogate(logp, old, adv, 0.2)
    # ratio 1.5, A=+1: min(1.5, 1.2) -> -1.2 ; A=-1: min(-1.5, -1.2) -> 1.5 ; ratio 0.5, A=+1: min(0.5, 0.8) -> -0.5 ;
    # A=-1: min(-0.5, -0.8) -> 0.8 ; ratio 1.1 inside the clip, A=2: -2.2
    assert loss.tolist() == pytest.approx([-1.2, 1.5, -0.5, 0.8, -2.2], rel=1e-6)
    loss.sum().backward()
    # clipped terms pass no gradient; unclipped ones pass -A * ratio
    assert logp.grad.tolist() == pytest.approx([0.0, 1.5, -0.5, 0.0, -2.2], rel=1e-6)


def test_k3_kl_by_hand():
    value = k3_kl(torch.log(torch.tensor([0.5, 0.3])), torch.log(torch.tensor([0.25, 0.3])))
    assert value.tolist() == pytest.approx([0.5 + math.log(2) - 1, 0.0], abs=1e-7)


def _objective(llm_dir, **grpo):
    recipe = validate_recipe({"model": {**_spec(llm_dir), "max_length": 40}, "data": {"train": "x"}, "optim": {"max_steps": 1},
                              "output_dir": "o", "objective": "grpo", "trainable": {"connector": True, "llm": "full"},
                              "grpo": {"group_size": 3, "max_new_tokens": 4, "verifier": {"name": "exact_choice"}, **grpo}})
    model, processor = build_model(recipe.model)
    apply_trainable(model, recipe.trainable)
    objective = GRPOObjective(recipe.grpo, max_length=recipe.model.max_length)
    objective.prepare(model, processor)
    return objective, model, processor


def test_grpo_step_samples_groups_scores_them_and_keeps_the_reference(tiny_llm_dir):
    torch.manual_seed(0)
    objective, model, processor = _objective(tiny_llm_dir)
    records = [_pair(i) for i in range(2)]
    for r in records:
        r.choices = ["left", "right"]
    batch = objective.examples.collate(processor, [objective.examples.build(processor, r) for r in records])
    assert len(batch["input_ids"]) == 6 and batch["keys"] == ["p0", "p1"] and batch["references"] == ["left"] * 3 + ["right"] * 3
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = objective.loss(model, batch)
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # sampling and the reference change nothing
    metrics = objective.metrics()
    assert set(metrics) == {"reward_mean", "reward_std_in_group", "equal_reward_groups", "kl_to_reference", "answer_tokens"}
    assert 0 <= metrics["reward_mean"] <= 1 and 1 <= metrics["answer_tokens"] <= 4
    assert metrics["kl_to_reference"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before any update


def test_a_prompt_that_would_not_fit_is_refused_by_key(tiny_llm_dir):
    objective, _, processor = _objective(tiny_llm_dir, max_new_tokens=30)
    with pytest.raises(SampleError, match="sample p0: its prompt .*max_new_tokens=30 exceed model.max_length=40"):
        objective.examples.build(processor, _pair(0))


def test_unknown_verifier_fails_before_training(tiny_llm_dir):
    from mmdomain.objectives.verifiers import VerifierError

    with pytest.raises(VerifierError, match="no verifier 'exactly'"):
        _objective(tiny_llm_dir, verifier={"name": "exactly"})


@pytest.mark.slow
def test_grpo_from_an_undertrained_stage2_raises_heldout_accuracy(tmp_path):
    """One seed of benchmarks/bench_grpo_stage3.py (which measures three)."""
    from mmdomain.demo_stage3 import run_stage3_demo

    # 40 GRPO steps (the recipe runs 200): enough for the first gain, and the slow suite stays short
    summary = run_stage3_demo(tmp_path, objective="grpo", seed=0, train_samples=1000, stage2_steps=80, stage3_steps=40, threads=1)
    assert summary["heldout_accuracy_after_grpo"] >= summary["heldout_accuracy_after_instruct"] + 0.05, summary
    rewards = [row["reward_mean"] for row in summary["stage3_curve"]]
    assert len(rewards) >= 5 and all(0 <= r <= 1 for r in rewards)
    rows = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert {"reward_mean", "reward_std_in_group", "equal_reward_groups", "kl_to_reference", "answer_tokens"} <= set(rows[-1])


@pytest.mark.slow
def test_grpo_resumed_run_equals_an_uninterrupted_one(tiny_llm_dir, tmp_path):
    """The sampled answers draw from the random streams the checkpoint saves, and a resumed run rebuilds its reference
    from init_from (not from its own checkpoint): 2 steps + resume to 4 gives the weights of 4 steps bit for bit."""
    from mmdomain.builder import load_pretrained
    from mmdomain.shards import make_shards
    from mmdomain.train import train

    from .test_dpo import _write_pairs

    _write_pairs(tmp_path, 16, 0)
    make_shards(tmp_path / "pairs0.jsonl", tmp_path / "media", tmp_path / "s", prefix="train")
    base = {"model": _spec(tiny_llm_dir), "trainable": {"connector": True, "llm": "full"}, "seed": 0, "log_every": 1,
            "data": {"train": str(tmp_path / "s" / "train-*.tar"), "shuffle_buffer": 16},
            "optim": {"max_steps": 3, "batch_size": 4, "lr": 1e-3, "schedule": "constant"}}
    train(validate_recipe({**base, "output_dir": str(tmp_path / "stage2")}))
    grpo = {**base, "objective": "grpo", "init_from": str(tmp_path / "stage2"),
            "grpo": {"group_size": 3, "max_new_tokens": 3, "kl_beta": 0.1}}
    train(validate_recipe({**grpo, "optim": {**base["optim"], "max_steps": 4}, "output_dir": str(tmp_path / "straight")}))
    train(validate_recipe({**grpo, "optim": {**base["optim"], "max_steps": 2}, "output_dir": str(tmp_path / "resumed")}))
    train(validate_recipe({**grpo, "optim": {**base["optim"], "max_steps": 4}, "output_dir": str(tmp_path / "resumed"), "resume": True}))
    straight, resumed = (load_pretrained(tmp_path / name)[0].state_dict() for name in ("straight", "resumed"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["kl_to_reference"] > 0


def test_demo_stages_are_checked(tmp_path, capsys):
    from mmdomain.cli import main

    assert main(["demo", "--out", str(tmp_path), "--stages", "sft,ppo"]) == 2
    assert "--stages sft,ppo: give sft (the default demo), sft,grpo or sft,dpo" in capsys.readouterr().err
