"""`mmdomain tiny-llm`: a stand-in LLM whose vocabulary covers every word of one's JSONL (every choice included),
whose tokenizer reloads as the class it was saved as and round-trips its chat template, and which the processor uses."""
from __future__ import annotations

import json

import pytest

from mmdomain.cli import main
from mmdomain.tiny_models import TinyModelError, write_tiny_llm_for

ROWS = [
    # Answer words that appear nowhere but in the choices, punctuation glued to words, a marker glued to a word.
    {"id": "q1", "image": "0.png", "question": "<image>Is there a murmur?", "answer": "Systolic murmur.",
     "choices": ["Systolic murmur.", "diastolic rumble", "no-murmur"]},
    {"id": "c1", "image": "1.png", "caption": "A normal heart sound, S1 and S2."},
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "text", "text": "what <audio> is this"}]},
                  {"role": "assistant", "content": "a wheeze"}]},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_every_choice_and_chat_text_tokenizes_without_unk_and_round_trips(tmp_path):
    import transformers
    from transformers import AutoTokenizer

    summary = write_tiny_llm_for([_jsonl(tmp_path / "d.jsonl", ROWS)], tmp_path / "llm", hidden=32, layers=1)
    tok = AutoTokenizer.from_pretrained(summary["path"], local_files_only=True)
    saved_as = json.loads((tmp_path / "llm" / "tokenizer_config.json").read_text())["tokenizer_class"]
    assert type(tok) is getattr(transformers, saved_as)  # reloads as the class it says it is
    unk = tok.unk_token_id
    for choice in ROWS[0]["choices"]:
        ids = tok(choice, add_special_tokens=False).input_ids
        assert ids and unk not in ids, choice
    conversation = [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "<image> Is there a murmur? <audio> what is this"},
                    {"role": "assistant", "content": "Systolic murmur."}]
    text = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=False)
    ids = tok(text).input_ids
    assert unk not in ids and tok.eos_token == "<|im_end|>" and ids.count(tok.eos_token_id) == 3
    assert tok.decode(ids) == " ".join(text.split())  # the word-level pre-tokenizer only normalises whitespace
    probe = "hello there , how are you ? fine-ish"  # words the JSONL never held are spelled, not <unk>
    spelled = tok(probe, add_special_tokens=False).input_ids
    assert unk not in spelled and len(spelled) > len(probe.split()) and tok.decode(spelled) == probe
    assert len(tok("Systolic murmur.", add_special_tokens=False).input_ids) == 2  # known words stay whole
    for marker in ("<image>", "<audio>"):  # one special id each, matched inside words too (as in "<image>Is")
        assert tok("a" + marker + "b", add_special_tokens=False).input_ids.count(tok.convert_tokens_to_ids(marker)) == 1


def test_the_processor_supervises_the_answer_with_the_stand_in(tmp_path):
    from mmdomain.builder import build_model
    from mmdomain.processor import IGNORE
    from mmdomain.spec import ModelSpec

    write_tiny_llm_for(_jsonl(tmp_path / "d.jsonl", ROWS), tmp_path / "llm", hidden=32, layers=1)
    model, proc = build_model(ModelSpec.model_validate({"encoder": {"name": "tiny-vit", "options": {"image_size": 32}},
                                                        "llm": {"path": str(tmp_path / "llm")}}))
    assert proc.use_chat_template and len(proc.tokenizer) == model.causal_lm.get_input_embeddings().weight.shape[0]  # <image> was in it
    import torch

    sample = proc([{"role": "user", "content": "<image> Is there a murmur?"}, {"role": "assistant", "content": "Systolic murmur."}],
                  [torch.zeros(3, 32, 32)], key="q1")
    supervised = sample.labels[sample.labels != IGNORE].tolist()
    assert proc.tokenizer.decode(supervised) == "Systolic murmur. <|im_end|>"
    assert proc.tokenizer.unk_token_id not in sample.input_ids.tolist()


def test_cli_writes_refuses_overwrites_and_names_bad_lines(tmp_path, capsys):
    data = _jsonl(tmp_path / "d.jsonl", ROWS[:1])
    more = _jsonl(tmp_path / "more.jsonl", ROWS[1:])
    out = tmp_path / "models" / "tiny"
    assert main(["-q", "tiny-llm", "--jsonl", str(data), "--jsonl", str(more), "--out", str(out), "--hidden", "32", "--layers", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out) and f"model.llm.path={out}" in captured.err
    vocab = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    assert {"diastolic", "rumble", "wheeze", "S2."} <= set(vocab)  # words from both files
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging folder left behind

    assert main(["tiny-llm", "--jsonl", str(data), "--out", str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err and (out / "config.json").is_file()
    assert main(["-q", "tiny-llm", "--jsonl", str(data), "--out", str(out), "--overwrite", "--hidden", "32"]) == 0
    assert "wheeze" not in json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]  # replaced, not merged
    capsys.readouterr()

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    assert main(["tiny-llm", "--jsonl", str(data), "--out", str(tmp_path / "mine"), "--overwrite"]) == 2
    assert "not a model folder" in capsys.readouterr().err and (tmp_path / "mine" / "notes.txt").is_file()

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n\n{not json\n")
    assert main(["tiny-llm", "--jsonl", str(bad), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:3: not valid JSON" in err and len(err.strip().splitlines()) == 1
    assert main(["tiny-llm", "--jsonl", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x")]) == 2
    assert "missing.jsonl' does not exist" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_a_line_without_text_is_named(tmp_path):
    with pytest.raises(TinyModelError, match=r"d.jsonl:2: no text found"):
        write_tiny_llm_for(_jsonl(tmp_path / "d.jsonl", [ROWS[1], {"image": "x.png"}]), tmp_path / "llm")


def test_long_words_and_html_in_answers_stay_text(tmp_path):
    """A word over WordPiece's 100-character default became <unk> although it was in the vocabulary, and any <word>
    (HTML in an answer) became a special token that skip_special_tokens then dropped from generated answers."""
    from transformers import AutoTokenizer

    url = "https://example.org/" + "a" * 140
    answer = f"see <b>bold</b> at {url}"
    (tmp_path / "s.jsonl").write_text(json.dumps({"image": "a.png", "question": "<image> where ?", "answer": answer}) + "\n")
    tok = AutoTokenizer.from_pretrained(write_tiny_llm_for([tmp_path / "s.jsonl"], tmp_path / "llm")["path"])
    ids = tok(answer, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == answer
    assert tok("<image>", add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids("<image>")]
