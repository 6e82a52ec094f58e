"""MultimodalLM: the splice equals HF Llava's, the supervised-only loss equals the full loss, checkpoints round-trip."""
from __future__ import annotations

import json
import pickletools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmdomain.builder import build_model, load_pretrained, save_pretrained
from mmdomain.errors import CheckpointError
from mmdomain.media import MediaBatch
from mmdomain.processor import IGNORE
from mmdomain.spec import ModelSpec
from mmdomain.tiny_models import word_tokenizer

from .conftest import WORDS

CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8)


def _conversations(n):
    answers = ["upper left", "lower right quadrant .", "left", "a lesion in the upper left"]
    return [
        [{"role": "user", "content": [{"type": "image", "image": torch.rand(3, 32, 32)}, {"type": "text", "text": "where is the lesion ?"}]},
         {"role": "assistant", "content": answers[i % len(answers)]}]
        for i in range(n)
    ]


def test_splice_matches_hf_llava_loss_and_connector_grads(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration

    tok = word_tokenizer(WORDS)
    media_id = len(tok)  # mmdomain adds "<image>" as the next id
    text = LlamaConfig(vocab_size=media_id + 1, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    llava = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=CLIPVisionConfig(**CLIP), text_config=text, image_token_index=media_id,
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )).float()
    # Export the same weights as a local vision tower directory and a local LLM directory.
    vision = CLIPVisionModel(CLIPVisionConfig(**CLIP))
    vision.load_state_dict(llava.model.vision_tower.state_dict())
    vision.save_pretrained(str(tmp_path / "vision"))
    lm = LlamaForCausalLM(text)
    lm.model.load_state_dict(llava.model.language_model.state_dict())
    lm.lm_head.load_state_dict(llava.lm_head.state_dict())
    lm.save_pretrained(str(tmp_path / "llm"))
    tok.save_pretrained(str(tmp_path / "llm"))

    spec = ModelSpec.model_validate({
        "encoder": {"name": f"hf:{tmp_path / 'vision'}", "options": {"layer": -2, "keep_cls": False}},
        "connector": {"name": "mlp", "options": {"depth": 2}},
        "llm": {"path": str(tmp_path / "llm")},
    })
    model, proc = build_model(spec)
    assert model.media_token_id == media_id and model.tokens_per_item == 16
    proj = llava.model.multi_modal_projector
    model.connector.load_state_dict({
        "layers.0.weight": proj.linear_1.weight, "layers.0.bias": proj.linear_1.bias,
        "layers.2.weight": proj.linear_2.weight, "layers.2.bias": proj.linear_2.bias,
    })
    batch = proc.collate([proc(c, key=f"s{i}") for i, c in enumerate(_conversations(3))])
    assert batch["attention_mask"].min() == 0  # the batch really is padded

    ours = model(**batch)
    theirs = llava(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["media"][0].values, labels=batch["labels"])
    assert abs(ours.loss.item() - theirs.loss.item()) < 1e-5
    ours.loss.backward()
    theirs.loss.backward()
    for mine, ref in ((model.connector.layers[0], proj.linear_1), (model.connector.layers[2], proj.linear_2)):
        assert torch.allclose(mine.weight.grad, ref.weight.grad, atol=1e-5)
        assert torch.allclose(mine.bias.grad, ref.bias.grad, atol=1e-5)


@pytest.fixture
def tiny_spec(tiny_llm_dir):
    return ModelSpec.model_validate({
        "encoder": {"name": "tiny-vit", "options": {"image_size": 32, "patch_size": 8, "dim": 32}},
        "connector": {"name": "mlp"},
        "llm": {"path": tiny_llm_dir},
    })


def test_supervised_only_loss_equals_full_logit_loss(tiny_spec):
    model, proc = build_model(tiny_spec)
    batch = proc.collate([proc(c, key=str(i)) for i, c in enumerate(_conversations(4))])
    out = model(**batch, return_logits=True)
    full = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE)
    assert torch.allclose(out.loss, full, atol=1e-6)
    assert out.num_supervised == int((batch["labels"][:, 1:] != IGNORE).sum())
    assert torch.allclose(out.loss_sum / out.num_supervised, out.loss)
    assert model(**batch).logits is None  # training never materialises [B, T, V]


def test_splice_count_mismatch_is_an_error(tiny_spec):
    model, proc = build_model(tiny_spec)
    batch = proc.collate([proc(c, key=str(i)) for i, c in enumerate(_conversations(2))])
    with pytest.raises(ValueError, match=r"32 media placeholder tokens \(id 24\) but 1 media items x 16"):
        model(batch["input_ids"], batch["attention_mask"], batch["labels"], [MediaBatch(batch["media"][0].values[:1])])
    with pytest.raises(ValueError, match="no media of that kind were given"):
        model(batch["input_ids"], batch["attention_mask"], batch["labels"], None)


def test_generate_greedy_matches_argmax(tiny_spec):
    model, proc = build_model(tiny_spec)
    model.eval()
    prompt = [{"role": "user", "content": [{"type": "image", "image": torch.rand(3, 32, 32)}, {"type": "text", "text": "where ?"}]}]
    batch = proc.collate([proc(prompt, key="g", add_generation_prompt=True)], padding_side="left")
    new = model.generate(batch["input_ids"], batch["attention_mask"], batch["media"], max_new_tokens=4, min_new_tokens=4)
    assert new.shape == (1, 4) and model.media_token_id not in new.tolist()[0]
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["attention_mask"], media=batch["media"]).logits[0, -1]
    logits[model.media_token_id] = float("-inf")
    assert new[0, 0] == logits.argmax()


def test_generate_ignores_the_llms_sampling_settings_but_keeps_its_stop_tokens(tiny_spec, recwarn, capfd):
    """Qwen ships generation_config with do_sample, temperature, top-p and repetition_penalty 1.1; they used to
    half-apply on top of greedy decoding (the penalty changed answers) with a transformers warning on every call."""
    model, proc = build_model(tiny_spec)
    model.eval()
    prompt = [{"role": "user", "content": [{"type": "image", "image": torch.rand(3, 32, 32)}, {"type": "text", "text": "where ?"}]}]
    batch = proc.collate([proc(prompt, key="g", add_generation_prompt=True)], padding_side="left")
    args = (batch["input_ids"], batch["attention_mask"], batch["media"])
    plain = model.generate(*args, max_new_tokens=6, min_new_tokens=6)
    own = model.llm.generation_config
    own.do_sample, own.temperature, own.top_p, own.top_k, own.repetition_penalty = True, 0.7, 0.8, 20, 50.0
    capfd.readouterr()
    assert torch.equal(model.generate(*args, max_new_tokens=6, min_new_tokens=6), plain)
    assert not [w for w in recwarn.list if "generation" in str(w.message).lower()], [str(w.message) for w in recwarn.list]
    logged = capfd.readouterr().err  # transformers warns through its own logger, straight to stderr
    assert "generation" not in logged.lower() and "deprecated" not in logged, logged
    # The caller may still ask for sampling.
    sampled = {tuple(model.generate(*args, max_new_tokens=6, min_new_tokens=6, do_sample=True, temperature=50.0)[0].tolist()) for _ in range(4)}
    assert len(sampled) > 1
    # Stops at the LLM's end tokens and at one given by the caller (a chat template's end of turn).
    first = int(plain[0, 0])
    assert model.generate(*args, max_new_tokens=6, eos_token_id=first).shape[1] == 1


def _assert_not_pickle(path: Path):
    data = path.read_bytes()
    if data[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05") or data[:4] == b"PK\x03\x04":
        ops = {op.name for op, _, _ in pickletools.genops(data)} if data[:1] == b"\x80" else {"zip"}
        raise AssertionError(f"{path} looks like a pickle/torch.save file ({sorted(ops)[:3]})")


@pytest.mark.parametrize("variant", ["connector-only", "lora", "encoder-and-full-llm"])
def test_save_load_round_trip_identical_logits(tmp_path, tiny_spec, variant):
    if variant == "lora":
        data = tiny_spec.model_dump()
        data["llm"]["lora"] = {"r": 4, "alpha": 8}
        tiny_spec = ModelSpec.model_validate(data)
    model, proc = build_model(tiny_spec)
    if variant == "encoder-and-full-llm":
        model.encoder.requires_grad_(True)
        model.llm.requires_grad_(True)
    with torch.no_grad():  # move every trainable weight away from its initial value, as training would
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    batch = proc.collate([proc(c, key=str(i)) for i, c in enumerate(_conversations(2))])
    model.eval()
    expected = model(**batch, return_logits=True).logits

    save_pretrained(model, proc, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "mmdomain_config.json").read_text())
    assert config["stored"]["connector"] == "all" and config["stored"]["encoder"] == "all"  # tiny-vit has no local weights
    assert config["stored"]["llm"] == {"connector-only": "none", "lora": "trained", "encoder-and-full-llm": "trained"}[variant]
    for f in (tmp_path / "ckpt").rglob("*"):
        if f.is_file():
            _assert_not_pickle(f)
    assert not list(tmp_path.glob(".ckpt.tmp-*"))

    loaded, proc2 = load_pretrained(tmp_path / "ckpt")
    loaded.eval()
    assert torch.equal(loaded(**batch, return_logits=True).logits, expected)
    assert proc2.tokens_per_item == proc.tokens_per_item and proc2.media_token_id == proc.media_token_id
    # A second save of the loaded model keeps what it restored even though those weights are frozen now.
    loaded.requires_grad_(False)
    save_pretrained(loaded, proc2, tmp_path / "ckpt2")
    again, _ = load_pretrained(tmp_path / "ckpt2")
    assert torch.equal(again.eval()(**batch, return_logits=True).logits, expected)


def test_referenced_encoder_is_not_copied(tmp_path, tiny_llm_dir):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    CLIPVisionModel(CLIPVisionConfig(**CLIP)).save_pretrained(str(tmp_path / "vision"))
    spec = ModelSpec.model_validate({"encoder": {"name": f"hf:{tmp_path / 'vision'}", "options": {"layer": -2}}, "llm": {"path": tiny_llm_dir}})
    model, proc = build_model(spec)
    save_pretrained(model, proc, tmp_path / "ckpt")
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "ckpt" / "model.safetensors")).keys()
    assert keys and all(k.startswith("connector.") for k in keys)


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, tiny_spec, monkeypatch):
    model, proc = build_model(tiny_spec)
    save_pretrained(model, proc, tmp_path / "ckpt")
    before = (tmp_path / "ckpt" / "model.safetensors").read_bytes()
    import safetensors.torch

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*ckpt: the disk is full"):
        save_pretrained(model, proc, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_per_sample_media_counts_differ_within_a_batch(tiny_spec):
    """Samples with 2, 0 and 1 images in one batch: each image lands in its own sample's block, in order, so the
    batch's per-token log-likelihoods equal those of each sample run alone."""
    model, proc = build_model(tiny_spec)
    model.eval()
    img = lambda: {"type": "image", "image": torch.rand(3, 32, 32)}  # noqa: E731
    convs = [
        [{"role": "user", "content": [img(), {"type": "text", "text": "compare"}, img()]}, {"role": "assistant", "content": "left"}],
        [{"role": "user", "content": "where is the lesion ?"}, {"role": "assistant", "content": "upper left"}],
        [{"role": "user", "content": [img(), {"type": "text", "text": "where ?"}]}, {"role": "assistant", "content": "right"}],
    ]
    samples = [proc(c, key=str(i)) for i, c in enumerate(convs)]
    batch = proc.collate(samples)
    assert batch["media"][0].values.shape[0] == 3
    with torch.no_grad():
        together = model.sequence_logprobs(**batch)
        alone = torch.cat([model.sequence_logprobs(**proc.collate([s])) for s in samples])
    assert torch.allclose(together, alone, atol=1e-5)


def test_packed_batch_gives_the_padded_loss(tiny_spec):
    """Packing several samples per row (positions restarting, block-diagonal attention) changes no token's loss."""
    model, proc = build_model(tiny_spec)
    model.eval()
    convs = _conversations(5) + [[{"role": "user", "content": "where is the lesion ?"}, {"role": "assistant", "content": "upper left"}]]
    samples = [proc(c, key=str(i)) for i, c in enumerate(convs)]
    padded = proc.collate(samples)
    packed = proc.collate_packed(samples, pack_length=64)
    assert packed["input_ids"].shape[0] < len(samples) and packed["attention_mask"] is None
    assert packed["num_tokens"] == padded["num_tokens"] and sorted(packed["keys"]) == sorted(padded["keys"])
    with torch.no_grad():
        a, b = model(**padded), model(**packed)
        assert a.num_supervised == b.num_supervised
        assert abs(a.loss.item() - b.loss.item()) < 1e-5  # fails if any sample attends across its row
    with pytest.raises(Exception, match="do not fit data.pack_length=8"):
        proc.collate_packed(samples, pack_length=8)


def _granite_dir(tmp_path, scaling=8.0):
    from transformers import GraniteConfig, GraniteForCausalLM

    tok = word_tokenizer(WORDS)
    config = GraniteConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4, logits_scaling=scaling, embedding_multiplier=2.0, residual_multiplier=0.5,
                           attention_multiplier=0.1, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    GraniteForCausalLM(config).save_pretrained(str(tmp_path / "granite"))
    tok.save_pretrained(str(tmp_path / "granite"))
    return tmp_path / "granite"


def test_granite_logit_scaling_gives_hf_loss(tmp_path):
    """Granite divides its logits by logits_scaling: the supervised-only head must too, or the loss is wrong."""
    spec = ModelSpec.model_validate({"encoder": {"name": "tiny-vit", "options": {"image_size": 32, "patch_size": 8, "dim": 32}},
                                     "llm": {"path": str(_granite_dir(tmp_path))}})
    model, proc = build_model(spec)
    model.eval()
    batch = proc.collate([proc(c, key=str(i)) for i, c in enumerate(_conversations(3))])
    with torch.no_grad():
        ours = model(**batch).loss
        embeds = model.embed(batch["input_ids"], batch["media"])
        theirs = model.causal_lm(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert abs(ours.item() - theirs.item()) < 1e-5


def test_an_llm_whose_logits_the_head_would_not_reproduce_is_refused(tmp_path, monkeypatch):
    import mmdomain.builder as builder
    from mmdomain.errors import ModelLoadError

    monkeypatch.setattr(builder, "head_transform", lambda config: (lambda logits: logits))  # as if granite were unknown
    spec = ModelSpec.model_validate({"encoder": {"name": "tiny-vit", "options": {"image_size": 32, "patch_size": 8, "dim": 32}},
                                     "llm": {"path": str(_granite_dir(tmp_path))}})
    with pytest.raises(ModelLoadError, match=r"LLM .*granite \(granite\): mmdomain's loss head differs from the model's own logits"):
        build_model(spec)


def test_a_frozen_encoder_stays_in_eval_mode_while_training(tiny_llm_dir):
    """wav2vec2 masks time steps (SpecAugment) and applies dropout in training mode: a frozen one must not, or its
    features differ between calls, and between training and evaluation."""
    spec = ModelSpec.model_validate({
        "encoder": {"name": "hf_audio:wav2vec2", "options": {"random_init": True, "clip_seconds": 1.0, "config": dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, conv_dim=[32, 32], conv_stride=[5, 4],
            conv_kernel=[10, 4], num_feat_extract_layers=2, mask_time_prob=0.5, mask_time_length=2, hidden_dropout=0.3,
            apply_spec_augment=True)}},
        "connector": {"name": "frame_stack", "options": {"k": 8}}, "domain": {"name": "audio"}, "llm": {"path": tiny_llm_dir}})
    model, _ = build_model(spec)
    model.train()
    assert not model.encoder.training and model.connector.training and model.llm.training
    clip = MediaBatch(torch.randn(2, 16000))
    with torch.no_grad():
        assert torch.equal(model.encode(0, clip), model.encode(0, clip))
    model.encoder.requires_grad_(True)  # an encoder that trains gets training mode
    assert model.train().encoder.training
