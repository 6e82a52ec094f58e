"""`mmdomain plan`: every shipped recipe planned from config files alone, exact parameter counts, a peak-memory estimate
held to a measured training step, the first change that makes a run fit, and the cost a finished run records."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mmdomain.builder import build_model
from mmdomain.cli import main
from mmdomain.gpus import GPUS, find_gpu
from mmdomain.plan import estimate, make_plan
from mmdomain.recipe import load_recipe, validate_recipe
from mmdomain.trainability import apply_trainable

from .conftest import write_side_task
from .real_configs import QWEN25_05B_PARAMETERS, write_model_configs

ROOT = Path(__file__).parent.parent
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
GiB = 1024**3


def _qwen_lora(r: int) -> int:
    """LoRA r on every linear of Qwen2.5-0.5B's 24 layers (q, k, v, o, gate, up, down): r * (in + out) each."""
    d, kv, f = 896, 128, 4864
    return 24 * r * ((d + d) + 2 * (d + kv) + (d + d) + 2 * (d + f) + (f + d))


def _to_standins(recipe: Path, models: Path) -> list[str]:
    """Overrides that point a recipe's /models paths at the folder of config files."""
    data = yaml.safe_load(recipe.read_text())["model"]
    out = []
    if data["llm"]["path"].startswith("/models/"):
        out.append(f"model.llm.path={models}/{data['llm']['path'].removeprefix('/models/')}")
    name = data["encoder"]["name"]
    if ":/models/" in name:
        out.append(f"model.encoder.name={name.replace(':/models/', f':{models}/')}")
    return out


@pytest.mark.parametrize("recipe", RECIPES, ids=[f"{p.parent.name}/{p.name}" for p in RECIPES])
def test_plan_every_shipped_recipe_from_configs_alone(recipe, tmp_path, monkeypatch, capsys):
    """The folders hold config files only (no weights, no tokenizer), so any weight read would fail: the plan of the
    real-size models comes from their configs. Qwen2.5-0.5B's count is its published one."""
    monkeypatch.chdir(tmp_path)  # the demo recipes' relative paths land here
    models = write_model_configs(tmp_path / "models")
    if recipe.parent.name == "demo":
        from mmdomain import demo_data
        from mmdomain.tiny_models import write_tiny_llm

        write_tiny_llm(tmp_path / "runs" / "demo" / "tiny-llm", demo_data.vocabulary(), hidden=128, ffn=256, layers=2, heads=4)
    overrides = _to_standins(recipe, models)
    assert main(["-q", "plan", str(recipe), *overrides, "--gpu", "a100-80g", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    recipe_obj = load_recipe(recipe, overrides)
    params = plan["parameters"]
    if recipe.parent.name != "demo":
        assert params["llm"]["trainable"] + params["llm"]["frozen"] == QWEN25_05B_PARAMETERS + (_qwen_lora(16) if recipe_obj.trainable.llm == "lora" else 0)
        assert params["llm"]["trainable"] == (_qwen_lora(16) if recipe_obj.trainable.llm == "lora" else 0)
    if "siglip-lora" in recipe.name:  # r=8 on the 11 blocks up to layer -2: q, k, v, out (768x768) and fc1, fc2 (768x3072)
        assert params["encoder"]["trainable"] == 11 * 8 * (4 * (768 + 768) + 2 * (768 + 3072))
    assert params["connector"]["trainable"] > 0 and params["connector"]["frozen"] == 0
    memory = plan["memory_gib"]
    assert memory["optimizer"] * GiB == pytest.approx(8 * sum(p["trainable"] for p in params.values()))
    assert memory["total_per_gpu"] > memory["weights"] > 0 and memory["activations"] > 0
    assert plan["flops_per_sample"] > 0 and plan["seconds_per_1k_samples"] > 0 and isinstance(plan["fits"], bool)
    assert plan["shape"]["seq_len"] == recipe_obj.model.max_length
    # The text form says the same in words.
    assert main(["-q", "plan", str(recipe), *overrides, "--gpu", "l4-24g"]) == 0
    text = capsys.readouterr().out
    assert "memory per GPU" in text and "TFLOP per sample" in text and ("fits" in text)


# -- exact counts on the tiny presets --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_preset(tmp_path_factory):
    """benchmarks/presets.py's `tiny` dimensions (CLIP vision 256 wide x 4, Llama 256 wide x 4, vocab 32000) as local
    model folders, and recipes training the connector, connector + LoRA, connector + the whole LLM, encoder LoRA."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from presets import PRESETS

    from mmdomain.tiny_models import PLAIN_TEMPLATE_WORDS, SPECIAL, word_tokenizer

    p, root = PRESETS["tiny"], tmp_path_factory.mktemp("tiny-preset")
    torch.manual_seed(0)
    tok = word_tokenizer([f"w{i}" for i in range(p["vocab"] - len(SPECIAL) - len(PLAIN_TEMPLATE_WORDS) - 1)])
    CLIPVisionModel(CLIPVisionConfig(hidden_size=p["v_hidden"], intermediate_size=p["v_ffn"], num_hidden_layers=p["v_layers"],
                                     num_attention_heads=p["v_heads"], image_size=p["image"], patch_size=p["patch"])).save_pretrained(root / "vision")
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok) + 1, hidden_size=p["hidden"], intermediate_size=p["ffn"], num_hidden_layers=p["layers"],
                                 num_attention_heads=p["heads"], num_key_value_heads=p["heads"], tie_word_embeddings=False,
                                 pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(root / "llm")
    tok.save_pretrained(root / "llm")
    variants = {
        "align": ({}, {"connector": True}),
        "lora": ({"lora": {"r": 16, "alpha": 32, "dropout": 0.0}}, {"connector": True, "llm": "lora"}),
        "full": ({}, {"connector": True, "llm": "full"}),
        "encoder-lora": ({}, {"connector": True, "encoder": "lora"}),
        "mixed-last-block": ({}, {"connector": True, "encoder": {"last_blocks": 1}}),
    }
    paths = {}
    for name, (llm, trainable) in variants.items():
        encoder = {"name": f"hf:{root / 'vision'}", "options": {"layer": -2}}
        if name == "encoder-lora":
            encoder["lora"] = {"r": 8, "alpha": 16, "dropout": 0.0}
        model = {"encoder": encoder, "connector": {"name": "mlp", "options": {"depth": 2}}, "llm": {"path": str(root / "llm"), **llm},
                 "max_length": 512}
        if name == "mixed-last-block":  # a second media kind, its encoder's buffers computed when built (mel filters)
            model["extra_kinds"] = [{"name": "audio", "token": "<audio>", "encoder": {"name": "tiny-audio"},
                                     "connector": {"name": "frame_stack", "options": {"k": 4}}, "domain": {"name": "audio"}}]
        recipe = {"stage": name, "model": model,
                  "trainable": trainable, "data": {"train": str(root / "none-*.tar")}, "optim": {"batch_size": 8, "max_steps": 1},
                  "output_dir": str(root / f"run-{name}")}
        paths[name] = root / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(recipe))
    return paths


@pytest.mark.parametrize("variant", ["align", "lora", "full", "encoder-lora", "mixed-last-block"])
def test_parameter_counts_are_exact(tiny_preset, variant):
    """The meta-device model has the built model's parameters: every name, shape, dtype and trainability."""
    recipe = load_recipe(tiny_preset[variant])
    built, _ = build_model(recipe.model)
    apply_trainable(built, recipe.trainable)
    plan = make_plan(recipe, find_gpu("cpu"))
    for module in ("encoder", "connector", "llm"):
        parts = [getattr(built, module)] + ([getattr(k, module) for k in built.extra_kinds] if module != "llm" else [])
        params = [p for part in parts for p in part.parameters()]
        assert plan["parameters"][module] == {"trainable": sum(p.numel() for p in params if p.requires_grad),
                                              "frozen": sum(p.numel() for p in params if not p.requires_grad)}, module
    from mmdomain.model_skeleton import build_skeleton

    skeleton = build_skeleton(recipe.model).model
    apply_trainable(skeleton, recipe.trainable)
    assert {n: (p.shape, p.dtype, p.requires_grad) for n, p in skeleton.named_parameters()} == \
        {n: (p.shape, p.dtype, p.requires_grad) for n, p in built.named_parameters()}
    assert skeleton.tokens_per_item == built.tokens_per_item == 196
    assert plan["memory_gib"]["weights"] * GiB == sum(p.numel() * p.element_size() for p in built.parameters())
    if variant == "mixed-last-block":  # only the last block of each encoder keeps activations; the blocks before it none
        assert [row["mode"] for row in plan["encoders"]] == ["none", "trained", "none", "trained"]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["align", "lora", "full"])
def test_peak_memory_estimate_is_within_20_percent_of_a_measured_step(tiny_preset, variant):
    """A real step of the tiny preset (batch 8, 196 image tokens + a 60-word caption, fp32, CPU) in a process of its
    own: glibc maps every block over 64 KiB on its own (MALLOC_MMAP_THRESHOLD_), so freed tensors leave the process
    and its peak RSS follows the live tensors. A first step creates the optimizer state and the math libraries'
    one-time buffers; the second is measured, from the resident memory before it to its peak: what the plan calls
    the step's own memory (activations, logits, gradients), the whole peak less weights and optimizer state. The
    peak beside the weights and the optimizer state (their exact bytes) is held to the plan's total the same way."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "tests.plan_memory", str(tiny_preset[variant]), "60", "8"], capture_output=True,
                         text=True, env=env, cwd=ROOT, check=True).stdout
    measured = json.loads(out.strip().splitlines()[-1])
    recipe = load_recipe(tiny_preset[variant])
    plan = make_plan(recipe, find_gpu("cpu"), seq=measured["seq_len"], answer=round(measured["supervised_per_sample"]))
    memory = {k: v * GiB for k, v in plan["memory_gib"].items() if not isinstance(v, dict)}
    step_estimate = memory["total_per_gpu"] - memory["weights"] - memory["optimizer"]
    assert step_estimate == pytest.approx(measured["second_step_bytes"], rel=0.2), (step_estimate, measured)
    total = measured["weights_bytes"] + measured["optimizer_bytes"] + measured["second_step_bytes"]
    assert memory["total_per_gpu"] == pytest.approx(total, rel=0.2), (memory, measured)
    assert memory["optimizer"] == measured["optimizer_bytes"]


# -- what makes a run fit -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return write_model_configs(tmp_path_factory.mktemp("models")) / "Qwen2.5-0.5B-Instruct"


def _full_finetune(llm_dir: Path, max_length: int = 12288, **optim) -> dict:
    return {"stage": "instruct", "model": {"encoder": {"name": "tiny-vit"}, "llm": {"path": str(llm_dir)}, "max_length": max_length},
            "trainable": {"connector": True, "llm": "full"}, "data": {"train": "none-*.tar"},
            "optim": {"max_steps": 10, "precision": "bf16", **optim}, "output_dir": "runs/x"}


def test_fit_recommends_gradient_checkpointing_when_only_it_fits(qwen_dir):
    """Qwen2.5-0.5B trained whole on 12288-token samples (256 answer tokens) at micro-batch 1 on an L4: weights,
    gradients and AdamW state (8 GiB) fit, the activations of 24 layers (~15 GiB) do not; kept only at layer inputs
    (checkpointing) they do. A micro-batch of 1 cannot shrink, so checkpointing is the first change that fits."""
    l4 = GPUS["l4-24g"]
    recipe = validate_recipe(_full_finetune(qwen_dir, batch_size=1, grad_accum=16))
    plan = make_plan(recipe, l4, answer=256)
    assert not plan["fits"] and plan["recommendation"]["change"] == "gradient checkpointing"
    assert plan["recommendation"]["overrides"] == ["optim.gradient_checkpointing=true"]
    assert [row["change"] for row in plan["tried"]] == ["gradient checkpointing"]
    checkpointed = make_plan(validate_recipe(_full_finetune(qwen_dir, batch_size=1, grad_accum=16, gradient_checkpointing=True)), l4, answer=256)
    assert checkpointed["fits"] and checkpointed["recommendation"] is None
    assert checkpointed["memory_gib"]["activations_parts"]["llm"] < plan["memory_gib"]["activations_parts"]["llm"] / 5
    assert checkpointed["flops_per_sample"] > plan["flops_per_sample"]  # the forward runs twice

    # At micro-batch 4, micro-batches of 2 and 1 (the global batch kept by accumulating more) are tried first and do
    # not fit at 12288 tokens; checkpointing alone then does.
    plan = make_plan(validate_recipe(_full_finetune(qwen_dir, batch_size=4, grad_accum=16)), l4, answer=256)
    assert [(row["change"], row["fits"]) for row in plan["tried"]] == [
        ("micro-batch 2 with grad_accum 32 (same global batch)", False), ("micro-batch 1 with grad_accum 64 (same global batch)", False),
        ("gradient checkpointing", True)]
    # At 8192 tokens one sample's activations fit and two do not: the smaller micro-batch is the first change that fits.
    plan = make_plan(validate_recipe(_full_finetune(qwen_dir, 8192, batch_size=2, grad_accum=16)), l4, answer=256)
    assert plan["recommendation"]["overrides"] == ["optim.batch_size=1", "optim.grad_accum=32"] and len(plan["tried"]) == 1


def test_fsdp_shards_weights_gradients_and_optimizer_by_the_gpu_count(qwen_dir):
    recipe = validate_recipe(_full_finetune(qwen_dir, 2048, batch_size=1))
    from mmdomain.plan import _model_for

    model, _ = _model_for(recipe, {})
    ddp = estimate(model, recipe.model_copy(update={"distributed": recipe.distributed.model_copy(update={"strategy": "ddp"})}),
                   GPUS["a100-80g"], gpus=4)
    fsdp = estimate(model, recipe, GPUS["a100-80g"], gpus=4)  # auto: the LLM trains whole -> FSDP
    assert ddp["strategy"] == "ddp" and fsdp["strategy"] == "fsdp"
    for part in ("gradients", "optimizer"):
        assert fsdp["memory_gib"][part] == pytest.approx(ddp["memory_gib"][part] / 4)
    layer = sum(p.numel() * p.element_size() for p in model.causal_lm.get_decoder().layers[0].parameters()) / GiB
    assert fsdp["memory_gib"]["weights"] == pytest.approx(ddp["memory_gib"]["weights"] / 4 + 2 * layer)
    assert ddp["memory_gib"]["ddp_buckets"] == pytest.approx(ddp["memory_gib"]["gradients"])
    assert fsdp["seconds_per_1k_samples"] == pytest.approx(ddp["seconds_per_1k_samples"])


def test_llm_too_large_to_train_whole_gets_lora(tmp_path):
    """A 7B Llama (Llama-2-7B's config) trained whole needs ~16 bytes per parameter before any activation: more than an
    80 GiB A100 holds whatever the batch or checkpointing; LoRA is the first change that fits."""
    config = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}
    (tmp_path / "llama7b").mkdir()
    (tmp_path / "llama7b" / "config.json").write_text(json.dumps(config))
    recipe = validate_recipe({**_full_finetune(tmp_path / "llama7b", batch_size=2), "model": {
        "encoder": {"name": "tiny-vit"}, "llm": {"path": str(tmp_path / "llama7b")}, "max_length": 2048}})
    plan = make_plan(recipe, GPUS["a100-80g"])
    assert plan["parameters"]["llm"]["trainable"] == 6_738_415_616  # Llama-2-7B's published count
    assert plan["recommendation"]["change"].startswith("LoRA")
    assert all(not row["fits"] for row in plan["tried"][:-1])


def test_plan_refuses_an_unknown_gpu(qwen_dir, capsys):
    recipe = ROOT / "recipes" / "medical" / "align_siglip_qwen2.5-0.5b.yaml"
    assert main(["-q", "plan", str(recipe), f"model.llm.path={qwen_dir}", "--gpu", "v100"]) != 0
    assert "--gpu 'v100' is not in the table" in capsys.readouterr().err


# -- a finished run records what it cost ---------------------------------------------------------------------------


def test_result_records_measured_cost_beside_the_estimate(tiny_llm_dir, tmp_path, capsys):
    from mmdomain.train import train

    write_side_task(tmp_path, n=16)
    assert main(["-q", "make-shards", "--jsonl", str(tmp_path / "samples.jsonl"), "--media", str(tmp_path / "media"), "--out", str(tmp_path / "s")]) == 0
    data = {"model": {"encoder": {"name": "tiny-vit", "options": {"image_size": 32, "patch_size": 8, "dim": 32, "channels": 1}},
                      "llm": {"path": tiny_llm_dir}, "max_length": 64},
            "data": {"train": str(tmp_path / "s" / "*.tar"), "shuffle_buffer": 0}, "optim": {"max_steps": 2, "batch_size": 4},
            "output_dir": str(tmp_path / "run")}
    result = train(validate_recipe(data))
    cost = json.loads((tmp_path / "run" / "result.json").read_text())["cost"]
    assert cost == result["cost"]
    measured, estimated = cost["measured"], cost["estimate"]
    assert measured["wall_seconds"] == result["seconds"] and measured["devices"] == 1
    assert measured["device_hours"] == pytest.approx(result["seconds"] / 3600, abs=1e-6)
    assert measured["peak_memory_kind"] == "process peak RSS" and measured["peak_memory_gib"] > 0.05  # torch alone is more
    assert measured["samples"] == 8
    assert estimated["gpu"] == "cpu" and estimated["peak_memory_gib"] > 0 and estimated["flops_per_sample"] > 0
    # The plan reads the same shards' manifest for the samples per epoch.
    capsys.readouterr()
    assert main(["-q", "plan", str(tmp_path / "run"), "--gpu", "cpu", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["samples_per_epoch"] == 16 and plan["hours_per_epoch"] > 0


def test_a_run_from_before_the_new_recipe_fields_resumes_without_a_change(tiny_llm_dir):
    """Checkpoints hold the recipe they ran; one written before `distributed` and `optim.gradient_checkpointing`
    existed must not read their defaults as changes (which would refuse the resume)."""
    from mmdomain.recipe import with_new_fields
    from mmdomain.run_dir import recipe_changes

    new = validate_recipe({"model": {"encoder": {"name": "tiny-vit"}, "llm": {"path": tiny_llm_dir}}, "data": {"train": "x"},
                           "optim": {"max_steps": 2}, "output_dir": "o"}).model_dump(mode="json")
    old = json.loads(json.dumps(new))
    del old["distributed"], old["optim"]["gradient_checkpointing"]
    assert {name for name, _, _ in recipe_changes(old, new)} == {"distributed", "optim.gradient_checkpointing"}
    assert recipe_changes(with_new_fields(old), new) == []
