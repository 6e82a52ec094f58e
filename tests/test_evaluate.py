"""Evaluation: choices of different lengths scored fairly, ties reported, and shards of the same name in two folders
kept apart."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmdomain.builder import build_model
from mmdomain.evaluate import evaluate_shards
from mmdomain.processor import IGNORE
from mmdomain.shards import make_shards
from mmdomain.spec import ModelSpec

LONG = "upper left quadrant ."


class PerTokenModel(torch.nn.Module):
    """Scores every answer token -0.5, plus a -1.0 penalty for one-token answers: by the sum a one-token answer
    wins (-1.5 > -2.0), per token the longer one does (-0.5 > -1.5)."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    @property
    def causal_lm(self):
        return self.inner.causal_lm

    def sequence_logprobs(self, input_ids, attention_mask, labels, media=None, *, mean=False, **_):
        count = (labels[:, 1:] != IGNORE).sum(dim=1).float()
        total = -0.5 * count - (count <= 2).float()  # an answer of one word (+ its end token) is penalised
        return total / count if mean else total


@pytest.fixture
def parts(tmp_path, tiny_llm_dir):
    spec = ModelSpec.model_validate({"encoder": {"name": "tiny-vit", "options": {"image_size": 32, "channels": 1}}, "llm": {"path": tiny_llm_dir}})
    model, proc = build_model(spec)
    (tmp_path / "media").mkdir()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "media" / "0.png")
    for folder, answer in (("a", LONG), ("b", "left")):
        rows = [{"id": "same", "image": "0.png", "question": "where is the lesion ?", "answer": answer, "choices": ["left", LONG]}]
        (tmp_path / f"{folder}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        make_shards(tmp_path / f"{folder}.jsonl", tmp_path / "media", tmp_path / folder, prefix="heldout")
    return PerTokenModel(model), proc, tmp_path


def test_choices_are_scored_per_token_by_default(parts):
    model, proc, root = parts
    mean = evaluate_shards(model, proc, str(root / "a" / "*.tar"))
    total = evaluate_shards(model, proc, str(root / "a" / "*.tar"), choice_score="sum")
    assert mean["closed"]["accuracy"] == 1.0 and total["closed"]["accuracy"] == 0.0


def test_shards_of_the_same_name_in_two_folders_stay_apart(parts):
    model, proc, root = parts
    path = root / "predictions.jsonl"
    report = evaluate_shards(model, proc, [str(root / "a" / "*.tar"), str(root / "b" / "*.tar")], predictions_path=path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["key"] for r in rows] == ["a/heldout-000000.tar:same", "b/heldout-000000.tar:same"]
    assert [r["target"] for r in rows] == [LONG, "left"] and [r["prediction"] for r in rows] == [LONG, LONG]
    assert report["samples"] == 2 and report["closed"]["accuracy"] == 0.5


def test_tied_choices_are_counted(parts, caplog):
    model, proc, root = parts
    model.sequence_logprobs = lambda input_ids, *a, **k: torch.zeros(len(input_ids))  # every choice the same
    report = evaluate_shards(model, proc, str(root / "a" / "*.tar"))
    assert report["closed"]["ties"] == 1 and "scored the same" in caplog.text


def test_choices_the_tokenizer_cannot_spell_are_counted_and_tie(tmp_path, tiny_llm_dir, caplog):
    """The tiny LLM's vocabulary misses 'systolic' and 'diastolic': both choices become <unk> + EOS, score the same,
    and the first listed wins on every question; a stand-in from `tiny-llm` on the same JSONL tells them apart."""
    from mmdomain.tiny_models import write_tiny_llm_for

    (tmp_path / "media").mkdir()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "media" / "0.png")
    rows = [{"id": f"q{i}", "image": "0.png", "question": "where is the lesion ?", "answer": answer,
             "choices": ["systolic", "diastolic"]} for i, answer in enumerate(["systolic", "diastolic"] * 2)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    make_shards(tmp_path / "d.jsonl", tmp_path / "media", tmp_path / "shards", prefix="heldout")
    shards = str(tmp_path / "shards" / "*.tar")
    encoder = {"name": "tiny-vit", "options": {"image_size": 32, "channels": 1}}

    model, proc = build_model(ModelSpec.model_validate({"encoder": encoder, "llm": {"path": tiny_llm_dir}}))
    with caplog.at_level("WARNING", logger="mmdomain.evaluate"):
        report = evaluate_shards(model, proc, shards, predictions_path=tmp_path / "p.jsonl")
    closed = report["closed"]
    assert closed["unknown_token_choices"] == 8 and closed["questions_with_unknown_token_choices"] == 4
    predictions = [json.loads(line)["prediction"] for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert closed["ties"] == 4 and predictions == ["systolic"] * 4 and closed["accuracy"] == 0.5  # exactly chance
    assert "4 of 4 closed questions" in caplog.text and "first listed choice won by position" in caplog.text
    assert "'systolic', 'diastolic'" in caplog.text and "mmdomain tiny-llm --jsonl" in caplog.text

    caplog.clear()
    write_tiny_llm_for(tmp_path / "d.jsonl", tmp_path / "stand-in", hidden=32, layers=1)
    model, proc = build_model(ModelSpec.model_validate({"encoder": encoder, "llm": {"path": str(tmp_path / "stand-in")}}))
    with caplog.at_level("WARNING", logger="mmdomain.evaluate"):
        report = evaluate_shards(model, proc, shards)
    assert report["closed"]["unknown_token_choices"] == 0 and report["closed"]["ties"] == 0 and caplog.text == ""
