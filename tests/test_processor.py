"""Processor: assistant-only labels, media expansion to the connector's count, named errors for bad samples."""
from __future__ import annotations

import pytest
import torch

from mmdomain.builder import build_model
from mmdomain.processor import IGNORE, SampleError
from mmdomain.spec import ModelSpec

CONV = [
    {"role": "user", "content": [{"type": "image", "image": torch.rand(3, 32, 32)}, {"type": "text", "text": "where is the lesion ?"}]},
    {"role": "assistant", "content": "upper left"},
    {"role": "user", "content": "describe the scan"},
    {"role": "assistant", "content": "a lesion in the upper left quadrant ."},
]


def _processor(llm_dir, connector="mlp", max_length=512):
    spec = ModelSpec.model_validate({
        "encoder": {"name": "tiny-vit", "options": {"image_size": 32, "patch_size": 8}},
        "connector": {"name": connector},
        "llm": {"path": llm_dir},
        "max_length": max_length,
    })
    return build_model(spec)


def _supervised_text(proc, sample):
    return proc.tokenizer.convert_ids_to_tokens(sample.input_ids[sample.labels != IGNORE].tolist())


def test_plain_template_supervises_exactly_assistant_replies_and_eos(tiny_llm_dir):
    _, proc = _processor(tiny_llm_dir)
    s = proc(CONV, key="s1")
    assert _supervised_text(proc, s) == ["upper", "left", "</s>", "a", "lesion", "in", "the", "upper", "left", "quadrant", ".", "</s>"]
    sup = s.labels != IGNORE
    assert torch.equal(s.labels[sup], s.input_ids[sup])
    assert s.input_ids[0] == proc.tokenizer.bos_token_id
    assert int((s.input_ids == proc.media_token_id).sum()) == 16  # 4x4 patches, mlp keeps the count


def test_chat_template_supervises_replies_through_end_of_turn(chat_llm_dir):
    _, proc = _processor(chat_llm_dir)
    assert proc.use_chat_template
    s = proc(CONV, key="s2")
    assert _supervised_text(proc, s) == ["upper", "left", "<|im_end|>", "a", "lesion", "in", "the", "upper", "left", "quadrant", ".", "<|im_end|>"]
    tokens = proc.tokenizer.convert_ids_to_tokens(s.input_ids.tolist())
    assert tokens.count("assistant") == 2 and all(s.labels[i] == IGNORE for i, t in enumerate(tokens) if t == "assistant")


def test_placeholders_expand_to_each_connectors_count(tiny_llm_dir):
    for connector, expected in (("mlp", 16), ("pixel_shuffle", 4)):
        model, proc = _processor(tiny_llm_dir, connector)
        assert model.tokens_per_item == expected
        s = proc(CONV, key="k")
        assert int((s.input_ids == proc.media_token_id).sum()) == expected
        out = model(**proc.collate([s]))  # the model's count check agrees with the processor's expansion
        assert torch.isfinite(out.loss)


def test_overlong_sample_through_media_is_a_named_error(tiny_llm_dir):
    _, proc = _processor(tiny_llm_dir, max_length=10)
    with pytest.raises(SampleError, match=r"sample scan-0042: .*max_length=10.*split a media block"):
        proc(CONV, key="scan-0042")
    _, proc = _processor(tiny_llm_dir, max_length=27)
    cut = proc(CONV, key="k")  # cut after the media and the first reply: allowed, and counted
    assert len(cut.input_ids) == 27 and cut.truncated_tokens == 14 and (cut.labels != IGNORE).any()
    _, proc = _processor(tiny_llm_dir, max_length=24)
    with pytest.raises(SampleError, match="removes every supervised token"):
        proc(CONV, key="k")


def test_marker_count_and_roles_are_checked(tiny_llm_dir):
    _, proc = _processor(tiny_llm_dir)
    with pytest.raises(SampleError, match="sample x: 1 '<image>' markers .* 2 media items"):
        proc([{"role": "user", "content": "<image> where ?"}, {"role": "assistant", "content": "left"}], [torch.rand(3, 32, 32)] * 2, key="x")
    with pytest.raises(SampleError, match="role 'bot'"):
        proc([{"role": "bot", "content": "hi"}], key="y")
    with pytest.raises(SampleError, match="no assistant turn"):
        proc([{"role": "user", "content": "where ?"}], key="z")


def test_collate_pads_and_orders_media(tiny_llm_dir):
    _, proc = _processor(tiny_llm_dir)
    a = proc([{"role": "user", "content": "<image> where ?"}, {"role": "assistant", "content": "left"}], [torch.zeros(3, 32, 32)], key="a")
    b = proc(CONV, key="b")
    batch = proc.collate([a, b])
    assert batch["input_ids"].shape == (2, len(b.input_ids)) and batch["media"][0].values.shape[0] == 2
    assert batch["attention_mask"][0].sum() == len(a.input_ids) and (batch["labels"][0, len(a.input_ids):] == IGNORE).all()
    left = proc.collate([a, b], padding_side="left")
    assert left["attention_mask"][0, -1] == 1 and left["attention_mask"][0, 0] == 0
