"""The model card written into every export: bases and licences, data licence and use, medical warning, eval regime, cost."""
from __future__ import annotations

import json
import shutil

import yaml

from mmdomain.checkpoint import step_directory
from mmdomain.export import export
from mmdomain.recipe import validate_recipe

from .export_helpers import make_checkpoint

TINY = {"name": "tiny-vit", "options": {"image_size": 32, "patch_size": 8, "dim": 32}}


def _run(tmp_path, llm_dir, *, card=None, domain="medical"):
    """A run directory as `mmdomain run` leaves it: recipe.yaml, result.json and checkpoints/step-N."""
    run = tmp_path / "run"
    checkpoint = make_checkpoint(step_directory(run, 6), llm_dir, None, encoder=TINY, domain={"name": domain})
    recipe = {"stage": "instruct", "model": json.loads((checkpoint / "mmdomain_config.json").read_text())["spec"],
              "data": {"train": "shards/train-*.tar", "eval": "shards/vqa-rad-test-*.tar"}, "optim": {"max_steps": 6},
              "output_dir": str(run), "init_from": "runs/align", **({"card": card} if card else {})}
    validate_recipe(recipe)  # the card block is part of the recipe schema
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (run / "result.json").write_text(json.dumps({"stage": "instruct", "steps": 6, "seconds": 12.5, "first_loss": 3.2, "final_loss": 1.1,
                                                 "eval": {"closed": {"samples": 40, "accuracy": 0.725}, "open": {"samples": 0}},
                                                 "checkpoint": str(checkpoint)}))
    return run


def test_the_card_states_licences_use_evaluation_regime_and_cost(tmp_path, tiny_llm_dir):
    readme = "---\nlicense: apache-2.0\nlanguage: [en]\n---\n# a model\n"  # as Hugging Face model cards declare it
    llm = tmp_path / "llm"
    shutil.copytree(tiny_llm_dir, llm)
    (llm / "README.md").write_text(readme)
    card = {"data_license": "CC-BY-4.0", "intended_use": "research on chest radiograph VQA", "eval_regime": "fine-tuned"}
    run = _run(tmp_path, str(llm), card=card)
    text = (export(run, tmp_path / "out", "encoder") / "README.md").read_text()
    assert "**Not for clinical use.**" in text and "Out of scope: clinical use" in text
    assert f"| LLM | `{llm}` (float32) | apache-2.0 |" in text
    assert "| encoder (<image>) | `tiny-vit` layer -1, 32-d, input 32x32 | n/a (random init) |" in text
    assert "Training data licence: CC-BY-4.0" in text and "Intended use: research on chest radiograph VQA" in text
    assert "Regime: fine-tuned on that benchmark's train split" in text and "| closed.accuracy | 0.725 |" in text
    assert "Evaluation data: `shards/vqa-rad-test-*.tar`" in text
    assert "Stage `instruct`: 6 steps in 12.5 s" in text and "Initialised from `runs/align`" in text


def test_a_card_without_declarations_says_what_is_missing(tmp_path, tiny_llm_dir):
    run = _run(tmp_path, tiny_llm_dir, domain="generic")
    text = (export(run, tmp_path / "out", "native") / "README.md").read_text()
    assert "Not for clinical use" not in text
    assert "| LLM |" in text and "unknown: check the source" in text
    assert "not declared in the recipe (card.data_license)" in text and "Regime: not declared (set card.eval_regime" in text
