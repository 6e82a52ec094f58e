"""Fixed benchmark presets: the same seeded weights built as HF Llava and as mmdomain, and one batch."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

PRESETS = {
    # CLIP vision 256 wide, 4 layers, 224 px, patch 16 -> 196 tokens; Llama 256 wide, 4 layers, FFN 688, vocab 32000.
    "tiny": dict(v_hidden=256, v_layers=4, v_heads=4, v_ffn=1024, image=224, patch=16,
                 hidden=256, layers=4, heads=4, ffn=688, vocab=32000, batch=8, caption=60),
    # The tiny preset with Qwen2/2.5's 151,936-token vocabulary: the LM head and its logits dominate the step.
    "tiny-qwen-vocab": dict(v_hidden=256, v_layers=4, v_heads=4, v_ffn=1024, image=224, patch=16,
                            hidden=256, layers=4, heads=4, ffn=688, vocab=151_936, batch=8, caption=60),
    "small": dict(v_hidden=384, v_layers=6, v_heads=6, v_ffn=1536, image=224, patch=16,
                  hidden=512, layers=8, heads=8, ffn=1376, vocab=32000, batch=8, caption=60),
    # CLIP-L/14-336 dimensions and a ~1B Llama, for a lent GPU (bf16).
    "gpu-1b": dict(v_hidden=1024, v_layers=24, v_heads=16, v_ffn=4096, image=336, patch=14,
                   hidden=2048, layers=16, heads=16, ffn=5632, vocab=32000, batch=16, caption=60),
}


@dataclass
class Built:
    preset: dict
    root: Path
    llava: torch.nn.Module
    batch: dict
    raw: list = None  # (image [3, H, W] in [0, 1], caption words) per sample: what another trainer's collator is given


def build(name: str, dtype: torch.dtype = torch.float32) -> Built:
    """Seeded HF Llava, exported as a local CLIP tower + Llama directory (what mmdomain loads), and one batch:
    BOS, "User:", 196 image tokens, "Assistant:", a caption, EOS; the caption (+ EOS) is supervised."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration

    from mmdomain.builder import build_model
    from mmdomain.tiny_models import PLAIN_TEMPLATE_WORDS, SPECIAL, word_tokenizer

    p = PRESETS[name]
    root = Path(tempfile.mkdtemp(prefix=f"mmdomain-bench-{name}-"))
    torch.manual_seed(0)
    tok = word_tokenizer([f"w{i}" for i in range(p["vocab"] - len(SPECIAL) - len(PLAIN_TEMPLATE_WORDS) - 1)])
    media_id = len(tok)
    vision = CLIPVisionConfig(hidden_size=p["v_hidden"], intermediate_size=p["v_ffn"], num_hidden_layers=p["v_layers"],
                              num_attention_heads=p["v_heads"], image_size=p["image"], patch_size=p["patch"])
    text = LlamaConfig(vocab_size=media_id + 1, hidden_size=p["hidden"], intermediate_size=p["ffn"], num_hidden_layers=p["layers"],
                       num_attention_heads=p["heads"], num_key_value_heads=p["heads"], tie_word_embeddings=False,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    llava = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_index=media_id,
                                                      vision_feature_layer=-2, vision_feature_select_strategy="default"))
    tower = CLIPVisionModel(vision)
    tower.load_state_dict(llava.model.vision_tower.state_dict())
    tower.save_pretrained(str(root / "vision"))
    lm = LlamaForCausalLM(text)
    lm.model.load_state_dict(llava.model.language_model.state_dict())
    lm.lm_head.load_state_dict(llava.lm_head.state_dict())
    lm.save_pretrained(str(root / "llm"))
    tok.save_pretrained(str(root / "llm"))
    del tower, lm
    model, proc = build_model(spec(root))
    g = torch.Generator().manual_seed(1)
    samples, raw = [], []
    for i in range(p["batch"]):
        words = " ".join(f"w{int(j)}" for j in torch.randint(0, media_id - 8, (p["caption"],), generator=g))
        # 8-bit levels, so the same image saved as a PIL image (what another trainer's dataset holds) is exact
        image = (torch.rand(3, p["image"], p["image"], generator=g) * 255).round() / 255
        raw.append((image, words))
        samples.append(proc([{"role": "user", "content": "<image>"}, {"role": "assistant", "content": words}], [image], key=str(i)))
    batch = proc.collate(samples)
    return Built(p, root, llava.to(dtype), batch, raw)


def spec(root: Path, **llm):
    from mmdomain.spec import ModelSpec

    return ModelSpec.model_validate({"encoder": {"name": f"hf:{root / 'vision'}", "options": {"layer": -2}},
                                     "connector": {"name": "mlp", "options": {"depth": 2}}, "llm": {"path": str(root / "llm"), **llm}})


def copy_projector(model, llava) -> None:
    proj = llava.model.multi_modal_projector
    model.connector.load_state_dict({"layers.0.weight": proj.linear_1.weight, "layers.0.bias": proj.linear_1.bias,
                                     "layers.2.weight": proj.linear_2.weight, "layers.2.bias": proj.linear_2.bias})
