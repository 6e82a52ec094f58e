"""Recipes: every shipped recipe validates; typos, duplicates and bad values are named errors; overrides work."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmdomain.recipe import RecipeError, load_recipe, validate_recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").rglob("*.yaml"))


def test_recipes_are_shipped():
    assert len(RECIPES) >= 2 and any("demo" in str(p) for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(p.parents[1])) for p in RECIPES])
def test_every_shipped_recipe_validates_and_says_how_to_run(path):
    recipe = load_recipe(path)
    assert recipe.output_dir and recipe.model.encoder.name
    header = path.read_text().splitlines()
    assert header[0].startswith("# "), f"{path} must open with a comment saying what it does"
    assert any(f"mmdomain run recipes/{path.relative_to(path.parents[1])}" in line for line in header if line.startswith("#")), \
        f"{path}: the header must give the exact command that runs it"
    # A header's evaluation command scores the shards the recipe itself evaluates on (one once said test-*, the
    # README and data.eval heldout-*).
    import shlex

    for line in header:
        if line.startswith("#") and "mmdomain eval " in line:
            words = shlex.split(line.split("mmdomain eval ", 1)[1])
            assert words[words.index("--data") + 1] == recipe.data.eval, f"{path}: {line.strip()} vs data.eval {recipe.data.eval}"


MINIMAL = """\
model:
  encoder: {name: tiny-vit}
  llm: {path: /models/x}
data: {train: "s/*.tar"}
optim: {max_steps: 10}
output_dir: runs/x
"""


def _write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_typo_gets_did_you_mean(tmp_path):
    with pytest.raises(RecipeError, match=r"optim.warmup_step: unknown key; did you mean 'optim.warmup_steps'\?"):
        load_recipe(_write(tmp_path, MINIMAL.replace("optim: {max_steps: 10}", "optim: {max_steps: 10, warmup_step: 5}")))
    with pytest.raises(RecipeError, match=r"model.conector: unknown key; did you mean 'model.connector'\?"):
        load_recipe(_write(tmp_path, MINIMAL.replace("  llm:", "  conector: {name: mlp}\n  llm:")))


def test_duplicate_key_names_both_lines(tmp_path):
    with pytest.raises(RecipeError, match=r"duplicate key 'output_dir' at line 7 \(first at line 6\)"):
        load_recipe(_write(tmp_path, MINIMAL + "output_dir: runs/y\n"))


def test_types_and_rules_are_checked(tmp_path):
    with pytest.raises(RecipeError, match="optim.batch_size: .*got 'many'"):
        load_recipe(_write(tmp_path, MINIMAL), ["optim.batch_size=many"])
    with pytest.raises(RecipeError, match=r"exactly one of optim.max_steps and optim.epochs \(both given\).*set one to null"):
        load_recipe(_write(tmp_path, MINIMAL), ["optim.epochs=2", "optim.max_steps=3"])
    with pytest.raises(RecipeError, match=r"exactly one of optim.max_steps and optim.epochs \(neither given\)"):
        load_recipe(_write(tmp_path, MINIMAL), ["optim.max_steps=null"])
    with pytest.raises(RecipeError, match="model.llm.lora is not set"):
        load_recipe(_write(tmp_path, MINIMAL), ["trainable.llm=lora"])
    with pytest.raises(RecipeError, match="data: required field is missing"):
        validate_recipe({"model": {"encoder": {"name": "x"}, "llm": {"path": "p"}}, "optim": {"max_steps": 1}, "output_dir": "o"})


def test_overrides_parse_yaml_values(tmp_path):
    recipe = load_recipe(_write(tmp_path, MINIMAL), ["optim.lr=2e-4", "trainable.params=[llm.*lm_head*]", "model.llm.lora.r=8",
                                                     "trainable.llm=lora", "data.eval=null"])
    assert recipe.optim.lr == 2e-4 and recipe.trainable.params == ["llm.*lm_head*"] and recipe.model.llm.lora.r == 8
    with pytest.raises(RecipeError, match="not key=value"):
        load_recipe(_write(tmp_path, MINIMAL), ["optim.lr"])


def test_an_override_of_the_run_length_replaces_the_other_length_field(tmp_path):
    # Every shipped real recipe sets optim.epochs; the README's `optim.max_steps=200` must work on them as written.
    epochs = load_recipe(_write(tmp_path, MINIMAL), ["optim.epochs=2"])
    assert epochs.optim.epochs == 2 and epochs.optim.max_steps is None
    shipped = next(p for p in RECIPES if "medical/align" in str(p))
    assert load_recipe(shipped).optim.epochs is not None
    steps = load_recipe(shipped, ["optim.max_steps=200", "model.llm.path=/data/qwen"])
    assert steps.optim.max_steps == 200 and steps.optim.epochs is None and steps.model.llm.path == "/data/qwen"
    both = load_recipe(shipped, ["optim.max_steps=200", "optim.epochs=null"])
    assert both.optim.max_steps == 200 and both.optim.epochs is None


def test_components_are_registry_names_not_python_paths(tmp_path):
    recipe = load_recipe(_write(tmp_path, MINIMAL), ["model.encoder.name=os.system"])
    from mmdomain.builder import build_model

    with pytest.raises(KeyError, match="unknown encoder 'os.system'"):
        build_model(recipe.model)


def _qwen_stand_in(tmp_path):
    # A byte-level BPE as Qwen's own: a word-level tokenizer beside a qwen2 config reloads as a Qwen2 BPE without
    # merges, which load_llm refuses (its chat-template round trip fails).
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from .conftest import WORDS
    from .readme_standins import qwen_tokenizer

    tok = qwen_tokenizer([" ".join(WORDS), "Describe the image. where is the lesion ? left right"], vocab_size=400)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok) + 1, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).save_pretrained(str(tmp_path / "qwen"))
    tok.save_pretrained(str(tmp_path / "qwen"))
    return tmp_path / "qwen"


def _encoder_stand_in(recipe, tmp_path) -> list[str]:
    """Overrides that swap the recipe's encoder for a tiny random model of the same family, saved like the real one."""
    from safetensors.torch import save_file

    family, _, _ = recipe.model.encoder.name.partition(":")
    if family == "hf":
        from transformers import SiglipVisionConfig, SiglipVisionModel

        SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                             image_size=32, patch_size=8)).save_pretrained(str(tmp_path / "enc"))
        return [f"model.encoder.name=hf:{tmp_path / 'enc'}"]
    if family == "open_clip":
        from open_clip import get_model_config
        from open_clip.model import CLIPVisionCfg, _build_vision_tower

        cfg = get_model_config("ViT-B-32")
        cfg["vision_cfg"].update(width=32, layers=3, head_width=16, image_size=64, patch_size=16)
        (tmp_path / "enc").mkdir()
        (tmp_path / "enc" / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
        tower = _build_vision_tower(cfg["embed_dim"], CLIPVisionCfg(**cfg["vision_cfg"]))
        save_file({f"visual.{k}": v.contiguous() for k, v in tower.state_dict().items()}, str(tmp_path / "enc" / "open_clip_model.safetensors"))
        return [f"model.encoder.name=open_clip:{tmp_path / 'enc'}"]
    if family == "timm":
        import timm

        save_file(timm.create_model("vit_tiny_patch16_224", num_classes=0).state_dict(), str(tmp_path / "vit.safetensors"))
        return ["model.encoder.name=timm:vit_tiny_patch16_224", f"model.encoder.options.weights={tmp_path / 'vit.safetensors'}"]
    if family == "hf_audio":
        from transformers import WhisperConfig, WhisperModel

        WhisperModel(WhisperConfig(d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64, num_mel_bins=80,
                                   max_source_positions=50, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64,
                                   vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                                   max_target_positions=16)).save_pretrained(str(tmp_path / "enc"))
        return [f"model.encoder.name=hf_audio:{tmp_path / 'enc'}"]
    raise AssertionError(f"no stand-in for encoder family {family!r}: add one so the recipe is checked")


def _media_file(recipe, tmp_path) -> tuple[str, bytes, list[str]]:
    """A raw media file of the recipe's domain, and overrides its options need (e.g. band statistics)."""
    import io

    import numpy as np

    from .domain_tasks import ct_slice, multiband_tile, write_dicom, write_geotiff

    domain = recipe.model.domain.name
    if domain == "medical":
        write_dicom(tmp_path / "x.dcm", ct_slice(np.random.default_rng(0), 1), monochrome1=True, intercept=-1024.0, slope=1.0)
        return "x.dcm", (tmp_path / "x.dcm").read_bytes(), []
    if domain == "remote_sensing":
        write_geotiff(tmp_path / "x.tif", multiband_tile(np.random.default_rng(0), 1))
        n = len(recipe.model.domain.options.get("bands") or range(6))
        (tmp_path / "stats.json").write_text(json.dumps({"mean": [1500.0] * n, "std": [400.0] * n}))
        return "x.tif", (tmp_path / "x.tif").read_bytes(), [f"model.domain.options.stats={tmp_path / 'stats.json'}"]
    if domain == "audio":
        import soundfile as sf

        buf = io.BytesIO()
        sf.write(buf, np.random.default_rng(0).normal(size=(22050, 2)).astype(np.float32) * 0.1, 22050, format="WAV")
        return "x.wav", buf.getvalue(), []
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(buf, format="PNG")
    return "x.png", buf.getvalue(), []


REAL = [p for p in RECIPES if "demo" not in p.parts]


@pytest.mark.parametrize("path", REAL, ids=[str(p.relative_to(p.parents[1])) for p in REAL])
def test_real_model_recipes_build_with_tiny_stand_ins(path, tmp_path):
    """Each shipped recipe, with its encoder and LLM swapped for tiny models of the same families, decodes a file
    of its domain, trains one backward pass through what it says trains, and keeps its other settings."""
    import torch

    from mmdomain.builder import build_model
    from mmdomain.trainability import apply_trainable

    original = load_recipe(path)
    name, data, extra = _media_file(original, tmp_path)
    recipe = load_recipe(path, [*_encoder_stand_in(original, tmp_path), f"model.llm.path={_qwen_stand_in(tmp_path)}", *extra])
    model, proc = build_model(recipe.model)
    apply_trainable(model, recipe.trainable)
    conv, media = proc.decode_media([{"role": "user", "content": f"{recipe.model.media_token} where is the lesion ?"},
                                     {"role": "assistant", "content": "upper left"}],
                                    [(name, data)])
    out = model(**proc.collate([proc(conv, media, key="k")]))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None for p in model.connector.parameters())
    if recipe.trainable.llm == "lora":
        assert any(p.grad is not None for n, p in model.llm.named_parameters() if "lora_" in n)
    if recipe.trainable.encoder:
        assert any(p.grad is not None for p in model.encoder.parameters())
    assert recipe.model.connector == original.model.connector and recipe.model.domain.name == original.model.domain.name
