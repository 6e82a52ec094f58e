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
def recipe(tmp_path, tiny_llm_dir):
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps({**MINIMAL, "model": {**MINIMAL["model"], "llm": {"path": tiny_llm_dir}}}))
    return str(path)


def _shard(tmp_path) -> str:
    """One training shard of one sample, so a run gets past its pre-flight checks."""
    from .conftest import write_tar

    write_tar(tmp_path / "s-0.tar", [("a.json", json.dumps({"conversations": [{"role": "user", "content": "hi"}]}).encode())])
    return str(tmp_path / "s-*.tar")


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
            "trainable": {"params": ["llm.*"]}, "output_dir": str(tmp_path / "run"), "data": {"train": _shard(tmp_path)}}
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


def test_a_run_directory_can_be_named_instead_of_its_recipe(tmp_path, tiny_llm_dir, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "recipe.yaml").write_text(json.dumps({**MINIMAL, "model": {**MINIMAL["model"], "llm": {"path": tiny_llm_dir}}}))
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
            "output_dir": str(tmp_path / "run"), "data": {"train": _shard(tmp_path)}}
    (tmp_path / "r.yaml").write_text(json.dumps(data))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["-q", "run", str(tmp_path / "r.yaml")]) == 2
    assert "device: cuda, but torch sees no CUDA GPU here" in capsys.readouterr().err

    def missing(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'pydicom'", name="pydicom")

    monkeypatch.setattr(train_module, "train", missing)
    assert main(["run", str(tmp_path / "r.yaml")]) == 2
    assert "this needs pydicom, which comes with an optional extra: pip install 'mmdomain[medical]'" in capsys.readouterr().err


def test_validate_and_run_check_model_files_before_anything_loads_or_is_written(tmp_path, tiny_llm_dir, capsys):
    """validate used to say valid for paths that did not exist; run failed after the encoder loaded, leaving a run
    directory with recipe.yaml behind."""
    run_dir = tmp_path / "run"
    base = {**MINIMAL, "output_dir": str(run_dir), "data": {"train": _shard(tmp_path)}}
    cases = [
        ({"encoder": {"name": f"hf:{tmp_path / 'no-siglip'}"}, "llm": {"path": tiny_llm_dir}}, "does not exist. mmdomain never downloads"),
        ({"encoder": {"name": "tiny-vit"}, "llm": {"path": str(tmp_path / "no-qwen")}}, "model.llm.path"),
        ({"encoder": {"name": "hf:siglip"}, "llm": {"path": tiny_llm_dir}}, "random_init"),
        ({"encoder": {"name": "timm:vit_tiny_patch16_224", "options": {"weights": str(tmp_path / "vit.safetensors")}},
          "llm": {"path": tiny_llm_dir}}, "vit.safetensors"),
    ]
    for model, message in cases:
        (tmp_path / "r.yaml").write_text(json.dumps({**base, "model": model}))
        for command in ("validate", "run"):
            assert main(["-q", command, str(tmp_path / "r.yaml")]) == 2, (command, model)
            err = capsys.readouterr().err
            assert message in err and "Traceback" not in err, (command, err)
            assert not run_dir.exists(), "a refused run must leave no run directory behind"


def test_validate_notes_what_is_not_there_yet_and_run_refuses_it(tmp_path, tiny_llm_dir, capsys):
    data = {**MINIMAL, "model": {**MINIMAL["model"], "llm": {"path": tiny_llm_dir}}, "init_from": str(tmp_path / "align"),
            "data": {"train": str(tmp_path / "none-*.tar")}, "output_dir": str(tmp_path / "run")}
    (tmp_path / "r.yaml").write_text(json.dumps(data))
    assert main(["validate", str(tmp_path / "r.yaml")]) == 0  # the previous stage may simply not have run yet
    err = capsys.readouterr().err
    assert "# not there yet: init_from:" in err and "# not there yet: data.train:" in err and "valid" in err
    assert main(["-q", "run", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err
    assert "the run cannot start" in err and "run the previous stage first" in err and not (tmp_path / "run").exists()


def test_a_tokenizer_that_garbles_text_is_refused_when_the_llm_loads(tmp_path):
    """A word-level tokenizer saved beside a qwen2 config.json reloads as a Qwen2 BPE tokenizer without merges and
    encodes 'is there a lesion' to one wrong id, silently."""
    from transformers import Qwen2Config

    from mmdomain.errors import ModelLoadError
    from mmdomain.llm import load_tokenizer
    from mmdomain.tiny_models import word_tokenizer

    import transformers
    from tokenizers import Regex, pre_tokenizers

    from mmdomain.llm import check_tokenizer

    word_tokenizer(["is", "there", "a", "lesion", "yes", "no"]).save_pretrained(str(tmp_path))
    Qwen2Config(vocab_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                intermediate_size=64).save_pretrained(str(tmp_path))
    if int(transformers.__version__.split(".")[0]) >= 5:  # 5.x picks the tokenizer class from config.json's model_type
        with pytest.raises(ModelLoadError, match="does not reproduce text"):
            load_tokenizer(tmp_path)
    else:  # 4.x keeps the class the tokenizer was saved as, which is faithful
        tok = load_tokenizer(tmp_path)
        assert tok.decode(tok("is there a lesion", add_special_tokens=False)["input_ids"]) == "is there a lesion"
    # The same loss on any version: a tokenizer that splits words into characters its vocabulary does not hold.
    lossy = word_tokenizer(["is", "there", "a", "lesion", "yes", "no"])
    lossy.backend_tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    with pytest.raises(ModelLoadError, match="does not reproduce text"):
        check_tokenizer(lossy, "a lossy tokenizer")


def test_eval_and_generate_score_with_the_runs_eval_settings_and_say_when_the_answer_is_empty(tmp_path, tiny_llm_dir, capsys,
                                                                                               monkeypatch):
    """eval used its own defaults (32 new tokens) whatever the recipe said (64); generate printed a bare empty line when
    the model's first token ended its answer."""
    import torch

    from mmdomain.model import MultimodalLM

    from .conftest import write_side_task

    write_side_task(tmp_path, n=8)
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    (tmp_path / "open.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "choices"}) + "\n" for r in rows))
    assert main(["-q", "make-shards", "--jsonl", str(tmp_path / "open.jsonl"), "--media", str(tmp_path / "media"), "--out", str(tmp_path / "s")]) == 0
    data = {**MINIMAL, "model": {"encoder": {"name": "tiny-vit", "options": {"image_size": 32, "channels": 1}}, "llm": {"path": tiny_llm_dir}},
            "data": {"train": str(tmp_path / "s" / "*.tar")}, "optim": {"max_steps": 1, "batch_size": 4},
            "eval": {"max_new_tokens": 3, "choice_score": "sum"}, "output_dir": str(tmp_path / "run")}
    (tmp_path / "r.yaml").write_text(json.dumps(data))
    assert main(["-q", "run", str(tmp_path / "r.yaml")]) == 0
    asked = []
    real = MultimodalLM.generate

    def spy(self, *args, **kwargs):
        asked.append(kwargs["max_new_tokens"])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MultimodalLM, "generate", spy)
    capsys.readouterr()
    assert main(["-q", "eval", str(tmp_path / "run"), "--data", str(tmp_path / "s" / "*.tar")]) == 0
    report = json.loads((tmp_path / "run" / "eval_report.json").read_text())
    assert report["settings"]["max_new_tokens"] == 3 and report["settings"]["choice_score"] == "sum" and set(asked) == {3}
    asked.clear()
    assert main(["-q", "eval", str(tmp_path / "run"), "--data", str(tmp_path / "s" / "*.tar"), "--max-new-tokens", "5"]) == 0
    assert set(asked) == {5}

    def ends_at_once(self, input_ids, *args, **kwargs):
        return torch.full((input_ids.shape[0], 1), kwargs["eos_token_id"])

    monkeypatch.setattr(MultimodalLM, "generate", ends_at_once)
    capsys.readouterr()
    assert main(["-q", "generate", str(tmp_path / "run"), "--image", str(tmp_path / "media" / "0.png"), "--question", "where ?"]) == 0
    out, err = capsys.readouterr()
    assert out == "\n" and "the model answered nothing: its first new token was '</s>', which ends the answer" in err


def test_a_lowercasing_tokenizer_is_accepted_and_a_failing_chat_template_is_named(tmp_path):
    from tokenizers import normalizers

    from mmdomain.errors import ModelLoadError
    from mmdomain.llm import check_tokenizer
    from mmdomain.tiny_models import word_tokenizer

    tok = word_tokenizer(["is", "there", "a", "lesion", "user:", "assistant:"],
                         chat_template="{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }} {% endfor %}")
    tok.backend_tokenizer.normalizer = normalizers.Lowercase()  # gives "user:" back for "USER:", as it should
    check_tokenizer(tok, "lowercasing tokenizer")
    tok.chat_template = "{{ raise_exception('only one turn') }}"
    with pytest.raises(ModelLoadError, match="its chat template fails on a plain user/assistant exchange.*only one turn"):
        check_tokenizer(tok, "tokenizer")
