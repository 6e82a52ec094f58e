"""The lmms-eval plugin: a task written by `mmdomain lmms-task` over a trained tiny run's shards, run through
lmms-eval's own Python API fully offline, scores exactly what `mmdomain eval` scores on the same shards."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from mmdomain.cli import main

from .conftest import write_side_task

ROOT = Path(__file__).resolve().parents[1]


def test_the_entry_point_and_the_task_templates_are_declared():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["entry-points"]["lmms_eval.models"] == {"mmdomain": "mmdomain.lmms_plugin:manifest"}
    assert "lmms_tasks/*.yaml" in project["tool"]["setuptools"]["package-data"]["mmdomain"]
    templates = sorted(p.name for p in (ROOT / "mmdomain" / "lmms_tasks").glob("*.yaml"))
    assert templates == ["medical_vqa.yaml", "scene_classification.yaml"]


@pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None, reason="lmms_eval is not importable: pip install 'mmdomain[lmms-eval]'")
def test_lmms_eval_finds_the_model_through_the_entry_point(tmp_path, monkeypatch):
    """What `pip install mmdomain` declares (an entry point in group lmms_eval.models), given to lmms-eval's own loader."""
    dist = tmp_path / "mmdomain_entry-0.0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mmdomain-entry\nVersion: 0.0.0\n")
    (dist / "entry_points.txt").write_text("[lmms_eval.models]\nmmdomain = mmdomain.lmms_plugin:manifest\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    from mmdomain.lmms_model import MmdomainLMM

    registry = ModelRegistryV2()
    registry.load_entrypoint_manifests()
    assert registry.get_model_class("mmdomain") is MmdomainLMM


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None,
                    reason="lmms_eval is not importable: pip install 'mmdomain[lmms-eval]' (CI installs it with the dev extra)")
def test_lmms_eval_scores_a_run_as_mmdomain_eval_does(tmp_path, tiny_llm_dir, monkeypatch, capsys):
    # Fully offline, and lmms-eval's dataset cache inside tmp_path (datasets reads these when first imported).
    for name, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
                        "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets")}.items():
        monkeypatch.setenv(name, value)
    write_side_task(tmp_path, n=12)
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):  # half closed (choices: scored by likelihood), half open (generated, token F1)
        if i % 2:
            row.pop("choices")
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["-q", "make-shards", "--jsonl", str(tmp_path / "mixed.jsonl"), "--media", str(tmp_path / "media"),
                 "--out", str(tmp_path / "s"), "--prefix", "test", "--samples-per-shard", "5"]) == 0
    shards = str(tmp_path / "s" / "test-*.tar")
    recipe = {"model": {"encoder": {"name": "tiny-vit", "options": {"image_size": 32, "channels": 1}}, "llm": {"path": tiny_llm_dir}},
              "data": {"train": shards}, "optim": {"max_steps": 2, "batch_size": 4}, "eval": {"max_new_tokens": 4},
              "output_dir": str(tmp_path / "run"), "device": "cpu"}
    (tmp_path / "r.yaml").write_text(json.dumps(recipe))
    assert main(["-q", "run", str(tmp_path / "r.yaml")]) == 0
    assert main(["-q", "eval", str(tmp_path / "run"), "--data", shards, "--out", str(tmp_path / "eval.json")]) == 0
    ours = json.loads((tmp_path / "eval.json").read_text())
    assert ours["closed"]["samples"] == 6 and ours["open"]["samples"] == 6

    assert main(["-q", "lmms-task", str(tmp_path / "run"), "--data", shards, "--out", str(tmp_path / "tasks"), "--name", "tiny_vqa"]) == 0
    assert len((tmp_path / "tasks" / "tiny_vqa.jsonl").read_text().splitlines()) == 12

    from lmms_eval import evaluator, models
    from lmms_eval.tasks import TaskManager

    from mmdomain.lmms_plugin import MODEL_ID, manifest

    if MODEL_ID not in models.list_available_models():
        # Installed from another checkout (an editable install of the main tree): register the manifest the entry point gives.
        models.MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)
    results = evaluator.simple_evaluate(model=MODEL_ID, model_args=f"run={tmp_path / 'run'},device=cpu", tasks=["tiny_vqa"],
                                        task_manager=TaskManager(include_path=str(tmp_path / "tasks")), batch_size=4,
                                        log_samples=True, bootstrap_iters=0, verbosity="WARNING")
    assert results is not None, "lmms-eval returned no results (it logs errors and carries on: see the captured log)"
    scores = results["results"]["tiny_vqa"]
    assert scores["exact_match,none"] == pytest.approx(ours["exact_match"], abs=1e-12)
    assert scores["closed_accuracy,none"] == pytest.approx(ours["closed"]["accuracy"], abs=1e-12)
    assert scores["open_token_f1,none"] == pytest.approx(ours["open"]["token_f1"], abs=1e-12)
    assert scores["open_token_recall,none"] == pytest.approx(ours["open"]["token_recall"], abs=1e-12)
    assert sys.modules.get("mmdomain.lmms_model") is not None  # the plugin class really answered
    # Sample by sample, not only the means: after two steps both scores may well be 0, which equal means would not tell.
    predicted = {json.loads(line)["key"]: json.loads(line)["prediction"]
                 for line in (tmp_path / "eval.predictions.jsonl").read_text().splitlines()}
    theirs = {row["doc"]["mmdomain_key"]: row["filtered_resps"][0] for row in results["samples"]["tiny_vqa"]}
    assert len(theirs) == 12 and theirs == predicted
