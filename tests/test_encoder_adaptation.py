"""Encoder adaptation: the last k blocks, LoRA and norms train as the recipe says, the table shows them, and the
first steps are held to it (a parameter declared frozen that moves stops the run, named)."""
from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file

import mmdomain.train as train_module
from mmdomain.builder import build_model, load_pretrained
from mmdomain.checkpoint import latest_checkpoint
from mmdomain.encoder_adaptation import add_encoder_lora

from mmdomain.recipe import RecipeError, validate_recipe
from mmdomain.shards import make_shards
from mmdomain.spec import LoraSpec
from mmdomain.train import train
from mmdomain.trainability import apply_trainable, trainable_table
from mmdomain.update_audit import FrozenParameterMoved, UpdateAudit

from .conftest import with_changes, write_side_task

TINY_VIT = {"name": "tiny-vit", "options": {"image_size": 32, "patch_size": 8, "dim": 32, "channels": 1}}


def _recipe(llm_dir, out, shards="x", **changes):
    data = {"model": {"encoder": dict(TINY_VIT), "llm": {"path": llm_dir}, "max_length": 64},
            "data": {"train": shards, "shuffle_buffer": 0},
            "optim": {"max_steps": 2, "batch_size": 4, "lr": 1e-2, "warmup_steps": 0, "schedule": "constant"},
            "output_dir": str(out), "seed": 0, "threads": 1}
    return validate_recipe(with_changes(data, changes))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc_task")
    write_side_task(root, n=16)
    make_shards(root / "samples.jsonl", root / "media", root / "shards")
    return str(root / "shards" / "*.tar")


class RecordingAudit(UpdateAudit):
    """The run's audit, keeping the model, what it declared and full copies of the weights the first step found."""

    made: list["RecordingAudit"] = []

    def __init__(self, model, declared):
        super().__init__(model, declared)
        self.model, self.declared = model, declared
        self.start = {n: p.detach().clone() for n, p in model.named_parameters()}
        RecordingAudit.made.append(self)

    def changed(self) -> set[str]:
        return {n for n, p in self.model.named_parameters() if not torch.equal(p.detach(), self.start[n])}


@pytest.fixture
def recording(monkeypatch):
    RecordingAudit.made = []
    monkeypatch.setattr(train_module, "UpdateAudit", RecordingAudit)
    return RecordingAudit.made


def _block_output(encoder, block, x):
    seen = []
    handle = block.register_forward_hook(lambda module, args, out: seen.append(out.detach().clone()))
    with torch.no_grad():
        encoder(x)
    handle.remove()
    return seen[0]


# -- recipe and table ---------------------------------------------------------------------------------------------


def test_the_table_names_each_encoder_part_with_its_count(tiny_llm_dir):
    recipe = _recipe(tiny_llm_dir, "o", model__encoder__lora={"r": 4, "alpha": 8}, trainable__encoder={"last_blocks": 1, "lora": True})
    model, _ = build_model(recipe.model)
    declared = apply_trainable(model, recipe.trainable)
    table = trainable_table(model, recipe.trainable)
    last_block = sum(p.numel() for p in model.encoder.blocks[1].parameters()) + sum(p.numel() for p in model.encoder.norm.parameters())
    adapters = sum(p.numel() for n, p in model.encoder.named_parameters() if "lora_" in n)
    assert "block 2 of 2 + final norm  " in table and f"{last_block:,}" in table.split("block 2 of 2")[1].splitlines()[0]
    assert "LoRA r=4 on mlp.0, mlp.2, proj, qkv" in table and f"{adapters:,}" in table.split("LoRA r=4")[1].splitlines()[0]
    encoder_declared = {n for n in declared if n.startswith("encoder.")}
    assert encoder_declared == {f"encoder.{n}" for n, _ in model.encoder.named_parameters()
                                if "lora_" in n or n.startswith(("blocks.1.", "norm."))}
    assert any(".base_layer." in n for n in encoder_declared)  # the last block trains whole, under its adapters too


def test_norms_alone_and_the_command_line_form(tiny_llm_dir):
    from mmdomain.recipe import apply_overrides

    data = _recipe(tiny_llm_dir, "o").model_dump(mode="json")
    recipe = validate_recipe(apply_overrides(data, ["trainable.encoder.norms=true"]))  # the switch was false: it opens into parts
    model, _ = build_model(recipe.model)
    declared = apply_trainable(model, recipe.trainable)
    norms = [m for m in model.encoder.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 5 and "norms (5 layers)" in trainable_table(model, recipe.trainable)
    assert {n for n in declared if n.startswith("encoder.")} == {f"encoder.{n}" for n, _ in model.encoder.named_parameters() if "norm" in n}


def test_parts_the_encoder_cannot_honour_are_refused_with_the_count(tiny_llm_dir):
    recipe = _recipe(tiny_llm_dir, "o", trainable__encoder={"last_blocks": 3})
    model, _ = build_model(recipe.model)
    with pytest.raises(RecipeError, match=r"last_blocks is 3 but model.encoder \(tiny-vit\) runs 2 blocks .*use 1..2"):
        apply_trainable(model, recipe.trainable)
    with pytest.raises(RecipeError, match=r"lora.targets \['attn'\] name no linear layer in its blocks; the layers of a block are "
                                          r"\['mlp.0', 'mlp.2', 'proj', 'qkv'\]"):
        build_model(_recipe(tiny_llm_dir, "o", model__encoder__lora={"targets": ["attn"]}, trainable__encoder="lora").model)
    with pytest.raises(ValueError, match="model.encoder.lora is not set; add model.encoder.lora"):
        _recipe(tiny_llm_dir, "o", trainable__encoder={"lora": True})
    with pytest.raises(ValueError, match="model.encoder.lora is set but trainable.encoder is true"):
        _recipe(tiny_llm_dir, "o", model__encoder__lora={"r": 4}, trainable__encoder=True)
    with pytest.raises(ValueError, match="the adapters' shape goes in model.encoder.lora"):
        _recipe(tiny_llm_dir, "o", trainable__encoder={"lora": {"r": 4}})


def _family_encoders(tmp_path):
    """Tiny random towers of each family, as they would be loaded."""
    from encoders import create_encoder

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8)
    # (family, encoder, input, blocks it runs, whether its output passes a final norm)
    yield "timm", create_encoder("timm:vit_tiny_patch16_224", random_init=True, image_size=32), torch.randn(2, 3, 32, 32), 12, True
    yield "open_clip", create_encoder("open_clip:ViT-B-32", random_init=True, vision_cfg=dict(width=32, layers=3, head_width=16, image_size=64,
                                                                                            patch_size=16)), torch.randn(2, 3, 64, 64), 3, True
    yield "hf siglip", create_encoder("hf:siglip", random_init=True, layer=-2, config=small), torch.randn(2, 3, 32, 32), 2, False
    yield "hf clip", create_encoder("hf:clip", random_init=True, config=small), torch.randn(2, 3, 32, 32), 3, False  # post_layernorm: pooled CLS only
    yield "tiny-audio", create_encoder("tiny-audio"), torch.randn(2, 16000), 2, True


def test_every_adapter_of_every_family_is_on_the_forward_path(tmp_path):
    """Each family says which blocks it runs (and whether a final norm follows them). peft wraps the layers; each adapter must change the output (a LoRA on MultiheadAttention's out_proj alone would
    be bypassed, since that module reads out_proj.weight directly): with B non-zero, every A gets a gradient."""
    for family, encoder, x, count, normed in _family_encoders(tmp_path):
        blocks = encoder.layer_blocks()
        assert len(blocks) == count and (encoder.output_norm() is not None) == normed, family
        add_encoder_lora(encoder, LoraSpec(r=2, alpha=4, dropout=0.0), f"{family} encoder")
        adapters = dict(encoder.named_parameters())
        assert [n for n in adapters if "lora_A" in n], family
        with torch.no_grad():
            for name, param in adapters.items():
                if "lora_B" in name:
                    param.normal_()
        encoder(x).square().mean().backward()
        silent = [n for n, p in adapters.items() if "lora_A" in n and (p.grad is None or not p.grad.any())]
        assert not silent, (family, silent)
        assert encoder.layer_blocks() == blocks  # the blocks are the same modules, adapted in place


# -- the first steps are held to the recipe -------------------------------------------------------------------------


def test_after_the_steps_exactly_the_declared_parameters_changed(tiny_llm_dir, shards, tmp_path, recording):
    recipe = _recipe(tiny_llm_dir, tmp_path / "run", shards, model__encoder__lora={"r": 4, "alpha": 8, "dropout": 0.0},
                     trainable__encoder={"last_blocks": 1, "lora": True})
    x = torch.randn(2, 1, 32, 32)
    train(recipe)
    (audit,) = recording
    # Two steps: a LoRA A matrix first moves at step 2 (its B starts at zero, so A's first gradient is exactly zero).
    assert audit.changed() == audit.declared
    assert {n for n in audit.declared if n.startswith("encoder.")} == {
        f"encoder.{n}" for n, _ in audit.model.encoder.named_parameters() if "lora_" in n or n.startswith(("blocks.1.", "norm."))}
    trained_encoder = audit.model.encoder.cpu().eval()

    # The checkpoint keeps the adapters and the base weights apart (nothing merged) and reloads to the same model.
    stored = load_file(str(latest_checkpoint(tmp_path / "run") / "model.safetensors"))
    assert {"encoder.blocks.0.qkv.lora_A.default.weight", "encoder.blocks.0.qkv.base_layer.weight"} <= set(stored)
    reloaded, _ = load_pretrained(tmp_path / "run")
    with torch.no_grad():
        trained_encoder.load_state_dict({k.removeprefix("encoder."): v for k, v in stored.items() if k.startswith("encoder.")})
        assert torch.equal(reloaded.encoder.eval()(x), trained_encoder(x))


@pytest.mark.parametrize("encoder_trains", [False, {"last_blocks": 1}], ids=["frozen", "last_block"])
def test_a_frozen_encoder_gives_the_same_features_after_training(tiny_llm_dir, shards, tmp_path, recording, encoder_trains):
    """Frozen: the encoder's output, also from the saved checkpoint. Last block trained: the first block's output."""
    x = torch.randn(3, 1, 32, 32)
    train(_recipe(tiny_llm_dir, tmp_path / "run", shards, trainable__encoder=encoder_trains))
    (audit,) = recording
    encoder = audit.model.encoder.cpu().eval()
    frozen_part = encoder.blocks[0] if encoder_trains else encoder
    moved = {n for n in audit.changed() if n.startswith("encoder.")}
    assert moved == ({n for n in audit.declared if n.startswith("encoder.")} if encoder_trains else set())
    assert bool(moved) == bool(encoder_trains)
    with torch.no_grad():
        after = _block_output(encoder, frozen_part, x)
        saved = _block_output(reloaded := load_pretrained(tmp_path / "run")[0].encoder.eval(), reloaded.blocks[0] if encoder_trains else reloaded, x)
        for name, param in encoder.named_parameters():
            param.copy_(audit.start[f"encoder.{name}"])
        before = _block_output(encoder, frozen_part, x)
    assert torch.equal(after, before) and torch.equal(saved, before)


def test_a_parameter_declared_frozen_that_moves_stops_the_run_named(tiny_llm_dir, shards, tmp_path, monkeypatch):
    """Simulates a freeze flag silently undone (as ms-swift#7318, LlamaFactory#9013 and LLaVA#1647 report): after
    trainable is applied, something turns requires_grad back on for one frozen weight."""
    original = train_module.apply_trainable

    def undone(model, trainable):
        declared = original(model, trainable)
        model.encoder.blocks[0].qkv.weight.requires_grad_(True)
        return declared

    monkeypatch.setattr(train_module, "apply_trainable", undone)
    with pytest.raises(FrozenParameterMoved, match=r"step 1: 1 parameter\(s\) the recipe declares frozen changed: encoder.blocks.0.qkv.weight\."):
        train(_recipe(tiny_llm_dir, tmp_path / "run", shards))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_audit_counts_only_steps_with_a_learning_rate(caplog):
    """A frozen weight written by a hook is caught at the first step with LR > 0; a trainable weight that moves only
    from the second step (LoRA A) is not reported; one that never moves is, by name."""
    model = torch.nn.ModuleDict({"frozen": torch.nn.Linear(3, 3), "late": torch.nn.Linear(3, 3), "idle": torch.nn.Linear(3, 3)})
    audit = UpdateAudit(model, {"late.weight", "late.bias", "idle.weight", "idle.bias"})
    audit.after_step(1, 0.0)  # warmup from 0: nothing counts, nothing is compared
    with torch.no_grad():
        model["late"].weight.add_(1.0)
        model["late"].bias.add_(1.0)
    audit.after_step(2, 1e-3)
    with caplog.at_level(logging.WARNING, logger="mmdomain.update_audit"):
        audit.finish()
    assert "2 trainable parameter(s) did not change in the first 1 step(s)" in caplog.text and "idle.weight, idle.bias" in caplog.text
    assert "late" not in caplog.text

    audit = UpdateAudit(model, {"late.weight", "late.bias"})
    model["frozen"].register_forward_hook(lambda *_: None)
    with torch.no_grad():
        model["frozen"].bias[1] += 1e-7  # one element, by the smallest step: the bit-pattern sum still changes
    with pytest.raises(FrozenParameterMoved, match="frozen changed: frozen.bias"):
        audit.after_step(5, 1e-3)


# -- stages -----------------------------------------------------------------------------------------------------


def test_init_from_a_frozen_align_run_into_encoder_lora(tiny_llm_dir, shards, tmp_path, recording):
    train(_recipe(tiny_llm_dir, tmp_path / "align", shards))
    align = load_file(str(latest_checkpoint(tmp_path / "align") / "model.safetensors"))
    recipe = _recipe(tiny_llm_dir, tmp_path / "instruct", shards, seed=1, init_from=str(tmp_path / "align"),
                     model__encoder__lora={"r": 4, "alpha": 8}, trainable__encoder="lora", trainable__llm=False)
    train(recipe)
    start = recording[-1].start
    # Another seed would have drawn another random encoder: equal base weights show they came from the align run,
    # under their adapted names.
    assert torch.equal(start["encoder.blocks.0.qkv.base_layer.weight"], align["encoder.blocks.0.qkv.weight"])
    connector = [k for k in align if k.startswith("connector.")]
    assert connector and all(torch.equal(start[k], align[k]) for k in connector)
    stored = load_file(str(latest_checkpoint(tmp_path / "instruct") / "model.safetensors"))
    assert any("lora_B" in k and k.startswith("encoder.") for k in stored)
    assert load_pretrained(tmp_path / "instruct")[0].spec.encoder.lora.r == 4


def test_a_referenced_encoder_saves_only_what_trained_and_reloads_to_the_same_model(tiny_llm_dir, shards, tmp_path, recording):
    """An encoder loaded from a local directory is referenced by a checkpoint: only its adapters and its last block
    are stored (unmerged), and the checkpoint with the directory rebuilds the trained encoder exactly."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
                                         patch_size=8)).save_pretrained(str(tmp_path / "siglip"))
    recipe = _recipe(tiny_llm_dir, tmp_path / "run", shards, model__encoder={"name": f"hf:{tmp_path / 'siglip'}", "lora": {"r": 4, "dropout": 0.0}},
                     trainable__encoder={"lora": True, "last_blocks": 1})
    train(recipe)
    (audit,) = recording
    stored = load_file(str(latest_checkpoint(tmp_path / "run") / "model.safetensors"))
    assert {k for k in stored if k.startswith("encoder.")} == {n for n in audit.declared if n.startswith("encoder.")}
    assert any("layers.2.mlp.fc1.base_layer" in k for k in stored) and not any("layers.1.mlp.fc1.base_layer" in k for k in stored)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_pretrained(tmp_path / "run")[0].encoder.eval()(x), audit.model.encoder.eval()(x))
