"""`mmdomain export --format native`: a checkpoint that needs nothing outside its folder, adapters PEFT loads, --merge-lora."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from mmdomain.builder import load_pretrained
from mmdomain.errors import CheckpointError
from mmdomain.export import export
from mmdomain.tiny_models import write_tiny_llm

from .conftest import WORDS
from .export_helpers import make_checkpoint, sample_image, write_tower


def _logits(checkpoint):
    model, processor = load_pretrained(checkpoint)
    model.eval()
    sample = processor([{"role": "user", "content": [{"type": "image", "image": sample_image()}, {"type": "text", "text": "where is the lesion ?"}]},
                        {"role": "assistant", "content": "left"}])
    batch = processor.collate([sample])
    with torch.no_grad():
        return model(batch["input_ids"], batch["attention_mask"], media=batch["media"], return_logits=True).logits, model


@pytest.fixture
def lora_run(tmp_path):
    """A checkpoint with LoRA on the LLM and the encoder, whose base LLM and tower live in folders of their own."""
    llm = write_tiny_llm(tmp_path / "llm", WORDS, hidden=64, ffn=128, layers=2)
    tower = write_tower(tmp_path / "clip")
    return make_checkpoint(tmp_path / "run", str(llm), tower, llm_lora=True, encoder_lora=True), llm, tower


def test_native_export_carries_its_bases_and_peft_loads_its_adapters(tmp_path, lora_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, CLIPVisionModel

    checkpoint, llm_dir, tower = lora_run
    expected, model = _logits(checkpoint)
    out = export(checkpoint, tmp_path / "native", "native")
    # PEFT's own format: the LLM adapter applies to the base LLM as it lies on disk
    assert {p.name for p in (out / "adapters" / "llm").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    base = AutoModelForCausalLM.from_pretrained(str(llm_dir)).eval()
    merged = PeftModel.from_pretrained(base, str(out / "adapters" / "llm")).merge_and_unload().eval()
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        vocab = merged.get_input_embeddings().weight.shape[0]  # ours also has the media token's row
        torch.testing.assert_close(merged(ids).logits, model.llm(input_ids=ids).logits[..., :vocab], atol=1e-5, rtol=0)
        # ... and the encoder adapter to the transformers tower itself (layer -2 of 3, CLS dropped)
        pixels = torch.randn(2, 3, 32, 32)
        clip = PeftModel.from_pretrained(CLIPVisionModel.from_pretrained(str(tower)), str(out / "adapters" / "encoder-0")).eval()
        torch.testing.assert_close(clip(pixel_values=pixels, output_hidden_states=True).hidden_states[2][:, 1:], model.encoder(pixels),
                                   atol=1e-5, rtol=1e-5)
    # self-contained: moved elsewhere, with the original bases gone, it loads and computes the same
    moved = tmp_path / "elsewhere" / "native"
    shutil.move(str(out), str(moved))
    shutil.rmtree(llm_dir)
    shutil.rmtree(tower)
    got, _ = _logits(moved)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert "bases/llm" == json.loads((moved / "mmdomain_config.json").read_text())["spec"]["llm"]["path"]


def test_merge_lora_writes_merged_weights_with_the_same_logits(tmp_path, lora_run):
    checkpoint = lora_run[0]
    expected, _ = _logits(checkpoint)
    out = export(checkpoint, tmp_path / "merged", "native", merge_lora=True)
    config = json.loads((out / "mmdomain_config.json").read_text())
    assert config["spec"]["llm"].get("lora") is None and config["spec"]["encoder"].get("lora") is None
    assert not (out / "adapters").exists()
    got, model = _logits(out)
    assert not any("lora_" in name for name, _ in model.named_parameters())  # plain weights, no adapter left
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_referenced_bases_are_checked_by_sha256(tmp_path, lora_run):
    checkpoint, llm_dir, _ = lora_run
    expected, _ = _logits(checkpoint)
    out = export(checkpoint, tmp_path / "ref", "native", bases="reference")
    assert not (out / "bases").exists()
    got, _ = _logits(out)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    generation = llm_dir / "generation_config.json"
    generation.write_text(generation.read_text().replace("{", '{\n  "max_length": 7,', 1))
    with pytest.raises(CheckpointError, match=r"references base file .*generation_config.json with sha256 .* changed since the export"):
        load_pretrained(out)
