"""Recipes: every shipped recipe validates; typos, duplicates and bad values are named errors; overrides work."""
from __future__ import annotations

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
    with pytest.raises(RecipeError, match="exactly one of optim.max_steps and optim.epochs"):
        load_recipe(_write(tmp_path, MINIMAL), ["optim.epochs=2"])
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


def test_components_are_registry_names_not_python_paths(tmp_path):
    recipe = load_recipe(_write(tmp_path, MINIMAL), ["model.encoder.name=os.system"])
    from mmdomain.model import build_model

    with pytest.raises(KeyError, match="unknown encoder 'os.system'"):
        build_model(recipe.model)


def _stand_ins(tmp_path):
    """Tiny random models of the families the non-demo recipes name: a SigLIP tower and a Qwen2 chat LLM."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    from mmdomain.tiny_models import word_tokenizer

    from .conftest import CHATML, WORDS

    SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                         image_size=32, patch_size=8)).save_pretrained(str(tmp_path / "siglip"))
    tok = word_tokenizer(WORDS + ["<|im_start|>", "<|im_end|>", "user", "assistant", "system"], chat_template=CHATML)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok) + 1, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).save_pretrained(str(tmp_path / "qwen"))
    tok.save_pretrained(str(tmp_path / "qwen"))
    return tmp_path / "siglip", tmp_path / "qwen"


REAL = [p for p in RECIPES if "demo" not in p.parts]


@pytest.mark.parametrize("path", REAL, ids=[str(p.relative_to(p.parents[1])) for p in REAL])
def test_real_model_recipes_build_with_tiny_stand_ins(path, tmp_path):
    import torch

    from mmdomain.model import build_model
    from mmdomain.trainability import apply_trainable

    siglip, qwen = _stand_ins(tmp_path)
    encoder = load_recipe(path).model.encoder.name
    family = encoder.split(":", 1)[0]
    recipe = load_recipe(path, [f"model.encoder.name={family}:{siglip}", f"model.llm.path={qwen}"])
    model, proc = build_model(recipe.model)
    apply_trainable(model, recipe.trainable)
    conv = [{"role": "user", "content": [{"type": "image", "image": torch.rand(3, 40, 40)}, {"type": "text", "text": "where is the lesion ?"}]},
            {"role": "assistant", "content": "upper left"}]
    out = model(**proc.collate([proc(conv, key="k")]))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None for p in model.connector.parameters())
    if recipe.trainable.llm == "lora":
        assert any(p.grad is not None for n, p in model.llm.named_parameters() if "lora_" in n)
