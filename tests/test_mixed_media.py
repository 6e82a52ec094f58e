"""Several media kinds in one conversation: an image and an audio clip, each with its own encoder, connector,
domain and placeholder block; through make-shards, training, evaluation and a checkpoint round trip."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from mmdomain.builder import build_model, load_pretrained
from mmdomain.checkpoint import latest_checkpoint
from mmdomain.spec import ModelSpec

WHISPER = dict(d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64, num_mel_bins=80, max_source_positions=50)


def _spec(llm_dir):
    return {
        "encoder": {"name": "tiny-vit", "options": {"image_size": 32, "channels": 1}},
        "llm": {"path": llm_dir},
        "extra_kinds": [{"name": "audio", "token": "<audio>", "encoder": {"name": "hf_audio:whisper", "options": {"random_init": True, "config": WHISPER}},
                         "connector": {"name": "frame_stack", "options": {"k": 10}}, "domain": {"name": "audio"}}],
    }


def _wav(seconds=0.5, rate=22050):
    buf = io.BytesIO()
    sf.write(buf, (0.1 * np.sin(np.arange(int(rate * seconds)) * 0.05)).astype(np.float32), rate, format="WAV")
    return buf.getvalue()


def _png():
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((32, 32)) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_each_kind_gets_its_own_block(tiny_llm_dir):
    model, proc = build_model(ModelSpec.model_validate(_spec(tiny_llm_dir)))
    assert model.tokens_per_item == 16 and model.extra_kinds[0].tokens_per_item == 5
    conv = [{"role": "user", "content": "<image> <audio> where is the lesion ?"}, {"role": "assistant", "content": "left"}]
    conv, media = proc.decode_media(conv, [("x.png", _png()), ("y.wav", _wav())])
    sample = proc(conv, media, key="k")
    ids = sample.input_ids.tolist()
    image_id, audio_id = proc.media_token_id, proc.kinds[1].token_id
    # The 0.5 s clip fills half of the 1 s window: ceil(25 frames / k=10) = 3 of the window's 5 tokens.
    assert ids.count(image_id) == 16 and ids.count(audio_id) == 3 and ids.index(audio_id) > ids.index(image_id)
    assert sample.media[0].shape == (1, 1, 32, 32) and sample.media[1].shape == (1, 16000)
    # Parts work too, and a batch may mix samples with and without audio.
    parts = [{"role": "user", "content": [{"type": "audio", "audio": media[1]}, {"type": "text", "text": "where ?"}]},
             {"role": "assistant", "content": "right"}]
    batch = proc.collate([sample, proc(parts, key="p"), proc([{"role": "user", "content": "where ?"}, {"role": "assistant", "content": "left"}], key="t")])
    assert batch["media"][0].values.shape[0] == 1 and batch["media"][1].values.shape[0] == 2
    out = model(**batch)
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.extra_kinds[0].connector.mlp.layers[0].weight.grad is not None
    with pytest.raises(ValueError, match="no media of that kind"):
        model(batch["input_ids"], batch["attention_mask"], batch["labels"], [batch["media"][0], None])


def test_spec_refuses_clashing_tokens(tiny_llm_dir):
    data = _spec(tiny_llm_dir)
    data["extra_kinds"][0]["token"] = "<image>"
    with pytest.raises(ValueError, match="distinct"):
        ModelSpec.model_validate(data)


@pytest.mark.slow
def test_image_and_audio_samples_train_save_and_reload(tmp_path, tiny_llm_dir):
    from mmdomain.cli import main

    (tmp_path / "media").mkdir()
    rows = []
    for i in range(6):
        (tmp_path / "media" / f"{i}.png").write_bytes(_png())
        (tmp_path / "media" / f"{i}.wav").write_bytes(_wav(0.3 + 0.1 * i))
        rows.append({"id": f"m{i}", "media": [f"{i}.png", f"{i}.wav"], "choices": ["left", "right"],
                     "conversations": [{"role": "user", "content": "<image> <audio> where is the lesion ?"},
                                       {"role": "assistant", "content": ["left", "right"][i % 2]}]})
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {"model": _spec(tiny_llm_dir), "data": {"train": str(tmp_path / "shards" / "*.tar"), "eval": str(tmp_path / "shards" / "*.tar")},
              "trainable": {"encoder": True}, "optim": {"max_steps": 3, "batch_size": 3}, "output_dir": str(tmp_path / "run")}
    (tmp_path / "r.yaml").write_text(json.dumps(recipe))
    assert main(["-q", "make-shards", "--recipe", str(tmp_path / "r.yaml"), "--jsonl", str(tmp_path / "s.jsonl"),
                 "--media", str(tmp_path / "media"), "--out", str(tmp_path / "shards")]) == 0
    assert main(["-q", "run", str(tmp_path / "r.yaml")]) == 0
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["eval"]["samples"] == 6 and result["skipped_samples"] == 0
    config = json.loads((latest_checkpoint(tmp_path / "run") / "mmdomain_config.json").read_text())
    assert config["stored"]["extra_kinds.0.connector"] == "all" and config["stored"]["extra_kinds.0.encoder"] == "all"

    model, proc = load_pretrained(tmp_path / "run")
    again, _ = load_pretrained(tmp_path / "run")
    conv, media = proc.decode_media([{"role": "user", "content": "<image> <audio> where ?"}, {"role": "assistant", "content": "left"}],
                                    [("a.png", _png()), ("b.wav", _wav())])
    batch = proc.collate([proc(conv, media, key="k")])
    with torch.no_grad():
        assert torch.equal(model.eval()(**batch, return_logits=True).logits, again.eval()(**batch, return_logits=True).logits)
