"""LLM loading: local directories only, the media token added without noise, LoRA through peft."""
from __future__ import annotations

import pytest
import torch

from mmdomain.llm import add_media_token, apply_lora, load_llm
from mmdomain.spec import LLMSpec, LoraSpec


def test_missing_path_and_hub_id_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads.*huggingface-cli download Qwen/Qwen2.5-0.5B-Instruct"):
        load_llm(LLMSpec(path="Qwen/Qwen2.5-0.5B-Instruct"))
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        load_llm(LLMSpec(path=str(tmp_path / "nope")))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_llm(LLMSpec(path=str(tmp_path)))


def test_media_token_rows_are_the_mean_and_outputs_stay_put(tiny_llm_dir):
    model, tok = load_llm(LLMSpec(path=tiny_llm_dir))
    n = len(tok)
    ids = torch.tensor([[1, 5, 6, 7]])
    before = model(ids).logits[0, -1, :n]
    media_id = add_media_token(model, tok, "<image>")
    assert media_id == n and len(tok) == n + 1
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.shape[0] == n + 1 and torch.allclose(emb[n], emb[:n].mean(0)) and torch.allclose(head[n], head[:n].mean(0))
    after = model(ids).logits[0, -1]
    assert torch.allclose(after[:n], before, atol=1e-6)  # old logits unchanged
    # The new token's logit is the mean logit: it does not dominate the frozen LM's next-token choice.
    assert torch.isclose(after[n], before.mean(), atol=1e-5)
    assert add_media_token(model, tok, "<image>") == media_id and model.get_input_embeddings().weight.shape[0] == n + 1


def test_lora_leaves_only_adapters_trainable(tiny_llm_dir):
    model, _ = load_llm(LLMSpec(path=tiny_llm_dir))
    model.requires_grad_(False)
    wrapped = apply_lora(model, LoraSpec(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("q_proj" in n for n in trainable) and not any("k_proj" in n for n in trainable)
