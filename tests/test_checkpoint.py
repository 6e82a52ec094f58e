"""Checkpoints: complete or invisible, verified before use, tied to the base models they were made with."""
from __future__ import annotations

import json
import shutil
import stat

import pytest

import mmdomain.train as train_module
from mmdomain.builder import check_handoff, build_model, load_pretrained, save_pretrained
from mmdomain.checkpoint import CheckpointWriter, complete_checkpoints, prune, resolve_checkpoint, step_directory, verify
from mmdomain.errors import CheckpointError
from mmdomain.recipe import validate_recipe
from mmdomain.spec import ModelSpec
from mmdomain.tiny_models import write_tiny_llm

from .conftest import WORDS


def _spec(llm_dir):
    return ModelSpec.model_validate({"encoder": {"name": "tiny-vit", "options": {"image_size": 32, "patch_size": 8, "dim": 32}},
                                     "llm": {"path": str(llm_dir)}})


@pytest.fixture
def saved(tmp_path, tiny_llm_dir):
    model, proc = build_model(_spec(tiny_llm_dir))
    return save_pretrained(model, proc, tmp_path / "ckpt")


def test_a_checkpoint_lists_its_files_and_is_readable_by_teammates(saved):
    marker = verify(saved)
    assert {"model.safetensors", "mmdomain_config.json"} <= set(marker["files"]) and any(f.startswith("tokenizer/") for f in marker["files"])
    assert stat.S_IMODE(saved.stat().st_mode) & 0o055 == 0o055  # not mkdtemp's 0700


def test_truncated_or_corrupt_weights_are_named(saved):
    weights = saved / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=rf"{weights} has {len(data) - 100} bytes but was written with {len(data)}: the file is truncated"):
        load_pretrained(saved)
    weights.write_bytes(b"\xff" * 16 + data[16:])  # same size, header destroyed
    with pytest.raises(CheckpointError, match=rf"{weights} is not a readable safetensors file .*truncated or corrupt"):
        load_pretrained(saved)


def test_incomplete_and_interrupted_checkpoints_are_reported(tmp_path, saved):
    (saved / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="has no COMPLETE marker, so it was never completely written"):
        resolve_checkpoint(saved)
    with pytest.raises(CheckpointError, match="not a complete checkpoint .*interrupted while being written"):
        verify(saved)
    # A save killed between its two renames leaves the complete old directory under a hidden name.
    model, proc = build_model(_spec(json.loads((saved / "mmdomain_config.json").read_text())["spec"]["llm"]["path"]))
    save_pretrained(model, proc, tmp_path / "other")
    shutil.move(tmp_path / "other", tmp_path / ".other.old-4242")
    with pytest.raises(CheckpointError, match=r"other is missing, but .*\.other\.old-4242 is a complete checkpoint .*rename it"):
        resolve_checkpoint(tmp_path / "other")
    (tmp_path / "run" / "checkpoints" / ".step-00000002.tmp-1").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="has no complete checkpoint yet"):
        resolve_checkpoint(tmp_path / "run")


def test_retention_keeps_the_newest(tmp_path):
    for step in (2, 4, 6, 8):
        with CheckpointWriter(step_directory(tmp_path, step), step=step) as writer:
            writer.json("x.json", {"step": step})
    prune(tmp_path, keep_last=2)
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [6, 8]
    prune(tmp_path, keep_last=0)  # never below one: the newest always stays
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [8]


def _other_llm(tmp_path, hidden, seed):
    return write_tiny_llm(tmp_path / f"llm-{hidden}-{seed}", WORDS, hidden=hidden, ffn=2 * hidden, layers=2, seed=seed)


def test_handoff_to_another_llm_is_refused_before_anything_is_built(tmp_path, tiny_llm_dir, monkeypatch):
    model, proc = build_model(_spec(tiny_llm_dir))
    stage1 = save_pretrained(model, proc, tmp_path / "stage1")
    wider = _other_llm(tmp_path, 96, 0)
    with pytest.raises(CheckpointError, match=rf"(?s)init_from {stage1} was made with LLM {tiny_llm_dir} \(model_type llama, hidden_size 64.*"
                                              rf"but this recipe's LLM is {wider} \(model_type llama, hidden_size 96.*its hidden_size is 96, the "
                                              r"checkpoint's LLM had 64"):
        check_handoff(_spec(wider), stage1)
    same_width = _other_llm(tmp_path, 64, 1)  # same architecture, other weights: silently wrong before
    with pytest.raises(CheckpointError, match="its weight files differ"):
        check_handoff(_spec(same_width), stage1)
    moved = shutil.copytree(tiny_llm_dir, tmp_path / "moved-llm")  # the same model elsewhere is fine
    assert check_handoff(_spec(moved), stage1) == stage1
    # Through a training run: refused before the model is built.
    monkeypatch.setattr(train_module, "build_model", lambda *a, **k: pytest.fail("the model was built before the check"))
    recipe = validate_recipe({"model": _spec(wider).model_dump(), "init_from": str(stage1), "data": {"train": "x-*.tar"},
                              "optim": {"max_steps": 1}, "output_dir": str(tmp_path / "run")})
    with pytest.raises(CheckpointError, match="hidden_size is 96"):
        train_module.train(recipe)


def test_a_changed_base_is_refused_when_loading(tmp_path, tiny_llm_dir):
    llm = shutil.copytree(tiny_llm_dir, tmp_path / "llm")
    model, proc = build_model(_spec(llm))
    saved = save_pretrained(model, proc, tmp_path / "ckpt")
    replacement = _other_llm(tmp_path, 64, 3)
    for name in ("model.safetensors",):
        shutil.copy(replacement / name, llm / name)  # the folder now holds other weights under the same path
    with pytest.raises(CheckpointError, match="its weight files differ"):
        load_pretrained(saved)


def test_writer_failure_leaves_nothing_and_names_the_target(tmp_path):
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*step-00000001: Permission denied"):
        with CheckpointWriter(step_directory(tmp_path, 1), step=1) as writer:
            writer.json("a.json", {})
            raise PermissionError(13, "Permission denied")
    assert not list((tmp_path / "checkpoints").iterdir())
    with pytest.raises(ValueError, match="boom"):  # other errors pass unchanged, and still leave nothing
        with CheckpointWriter(step_directory(tmp_path, 2), step=2):
            raise ValueError("boom")
    assert not list((tmp_path / "checkpoints").iterdir())


def test_an_encoder_whose_weights_changed_is_refused(tmp_path, tiny_llm_dir):
    """The encoder is referenced by path: other weights saved there since would silently change the model."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
    CLIPVisionModel(config).save_pretrained(str(tmp_path / "vision"))
    spec = ModelSpec.model_validate({"encoder": {"name": f"hf:{tmp_path / 'vision'}"}, "llm": {"path": tiny_llm_dir}})
    model, proc = build_model(spec)
    stage1 = save_pretrained(model, proc, tmp_path / "stage1")
    CLIPVisionModel(config).save_pretrained(str(tmp_path / "vision"))  # re-initialised: same config, other weights
    with pytest.raises(CheckpointError, match=rf"init_from {stage1} was made with encoder {tmp_path / 'vision'}.*its weight files differ"):
        check_handoff(spec, stage1)
    with pytest.raises(CheckpointError, match="its weight files differ"):
        load_pretrained(stage1)


def test_a_full_disk_reported_by_safetensors_is_named(tmp_path, monkeypatch):
    """safetensors raises its own SafetensorError for I/O failures (ENOSPC included), not an OSError."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*step-00000003: the disk is full"):
        with CheckpointWriter(step_directory(tmp_path, 3), step=3) as writer:
            writer.tensors("model.safetensors", {})
    assert not list((tmp_path / "checkpoints").iterdir())


def test_saving_over_a_folder_that_is_not_a_checkpoint_is_refused(tmp_path, tiny_llm_dir):
    model, proc = build_model(_spec(tiny_llm_dir))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="mine exists and is not an mmdomain checkpoint"):
        save_pretrained(model, proc, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    save_pretrained(model, proc, tmp_path / "ckpt")
    save_pretrained(model, proc, tmp_path / "ckpt")  # a checkpoint is replaced whole, atomically
    verify(tmp_path / "ckpt")
