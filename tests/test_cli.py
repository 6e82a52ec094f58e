"""The command line: every error a user can cause is one line naming the thing and the fix, with a non-zero exit;
a traceback only with --debug; a defect says it is one."""
from __future__ import annotations

import json

import pytest

import mmdomain.train as train_module
from mmdomain.cli import main

MINIMAL = {"model": {"encoder": {"name": "tiny-vit"}, "llm": {"path": "/models/x"}}, "data": {"train": "s/*.tar"},
           "optim": {"max_steps": 1}, "output_dir": "runs/x"}


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(MINIMAL))
    return str(path)


@pytest.mark.parametrize("override,message", [
    ("model.encoder.options.x=!!python/object/apply:os.system [ls]", "override 'model.encoder.options.x=!!python/object/apply:os.system [ls]': "
                                                                      "the value is not plain YAML"),
    ("optim.lr=1e9", "optim.lr: Input should be less than or equal to 1"),
    ("lr.connector=5", "lr.connector: Input should be less than or equal to 1"),
    ("resume=sometimes", "resume"),
])
def test_bad_overrides_are_one_line(recipe, capsys, override, message):
    assert main(["validate", recipe, override]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.startswith("mmdomain validate: error:")


def test_half_precision_weights_that_train_are_refused(tmp_path, tiny_llm_dir, capsys):
    """`trainable.params: [llm.*]` on a bf16 LLM used to train bf16 weights with AdamW (losing small updates)."""
    data = {**MINIMAL, "model": {"encoder": {"name": "tiny-vit", "options": {"image_size": 32, "channels": 1}},
                                 "llm": {"path": tiny_llm_dir, "dtype": "bfloat16"}},
            "trainable": {"params": ["llm.*"]}, "output_dir": str(tmp_path / "run")}
    (tmp_path / "r.yaml").write_text(json.dumps(data))
    assert main(["-q", "run", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err
    assert "trainable parameters are bfloat16" in err and "Keep model.llm.dtype: float32" in err


def test_a_defect_is_named_as_one_and_debug_shows_the_traceback(recipe, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise TypeError("unsupported operand")

    monkeypatch.setattr(train_module, "train", broken)
    assert main(["run", recipe]) == 1
    err = capsys.readouterr().err
    assert "internal error: TypeError: unsupported operand" in err and "--debug" in err and "Traceback" not in err
    with pytest.raises(TypeError, match="unsupported operand"):
        main(["--debug", "run", recipe])


def test_a_run_directory_can_be_named_instead_of_its_recipe(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "recipe.yaml").write_text(json.dumps(MINIMAL))
    assert main(["validate", str(tmp_path / "run")]) == 0
    assert f"output_dir: {tmp_path / 'run'}\n" in capsys.readouterr().out  # the run is where it now is


def test_overrides_may_follow_flags(recipe, capsys):
    assert main(["validate", recipe, "optim.max_steps=7"]) == 0
    from mmdomain.cli import build_parser

    assert "  max_steps: 7\n" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["run", recipe, "--resume", "--no-such-flag"])
    args = build_parser().parse_known_args(["run", recipe, "--resume", "optim.max_steps=3"])
    assert args[1] == ["optim.max_steps=3"]  # what main() adds to the overrides


def test_machine_problems_are_user_errors_with_the_fix(tmp_path, tiny_llm_dir, capsys, monkeypatch):
    import torch

    data = {**MINIMAL, "model": {"encoder": {"name": "tiny-vit"}, "llm": {"path": tiny_llm_dir}}, "device": "cuda",
            "output_dir": str(tmp_path / "run")}
    (tmp_path / "r.yaml").write_text(json.dumps(data))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["-q", "run", str(tmp_path / "r.yaml")]) == 2
    assert "device: cuda, but torch sees no CUDA GPU here" in capsys.readouterr().err

    def missing(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'pydicom'", name="pydicom")

    monkeypatch.setattr(train_module, "train", missing)
    assert main(["run", str(tmp_path / "r.yaml")]) == 2
    assert "this needs pydicom, which comes with an optional extra: pip install 'mmdomain[medical]'" in capsys.readouterr().err
