"""One-process parts of multi-GPU training: the device decision, the ranks' share of an epoch, the wiring that
keeps batches on the training device (feature cache and evaluation included), gradient checkpointing and fp16."""
from __future__ import annotations

import json

import pytest
import torch

from mmdomain.builder import build_model
from mmdomain.data import FailureBudget, SampleFormat, ShardCatalog, expand_shards
from mmdomain.distributed import DistributedError, World, choose_strategy, resolve_device
from mmdomain.memory_savers import enable_gradient_checkpointing
from mmdomain.recipe import RecipeError, Trainable, load_recipe
from mmdomain.shards import make_shards
from mmdomain.spec import ModelSpec
from mmdomain.train_step import StepRunner
from mmdomain.train_stream import BatchStream, TrainBatches
from mmdomain.trainability import apply_trainable

from .conftest import write_side_task


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("units")
    write_side_task(root, n=18)
    make_shards(root / "samples.jsonl", root / "media", root / "shards", samples_per_shard=5)
    return root


@pytest.fixture
def tiny(tiny_llm_dir):
    spec = ModelSpec.model_validate({"encoder": {"name": "tiny-vit", "options": {"image_size": 32, "patch_size": 8, "dim": 32, "channels": 1}},
                                     "llm": {"path": tiny_llm_dir}, "max_length": 64})
    return spec


def test_the_training_device_is_decided_in_one_place(monkeypatch):
    assert resolve_device("cpu", 1) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(RecipeError, match="device: cuda, but torch sees no CUDA GPU"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("auto", 1) == torch.device("cuda", 1)  # torchrun's LOCAL_RANK picks the GPU
    with pytest.raises(DistributedError, match="LOCAL_RANK 2 but this machine shows 2 GPUs"):
        resolve_device("cuda", 2)
    assert choose_strategy("auto", "full") == "fsdp" and choose_strategy("auto", "lora") == "ddp" and choose_strategy("ddp", "full") == "ddp"


def _rank_batches(shards, processor, *, batch_size: int, rank: int, world: int) -> list:
    failures = FailureBudget(0)
    catalog = ShardCatalog(expand_shards(str(shards / "shards" / "*.tar")), failures)
    dataset = TrainBatches(catalog, processor, layout=SampleFormat(), seed=1, shuffle_buffer=4, limit=None, batch_size=batch_size,
                           rank=rank, world=world)
    stream = BatchStream(dataset, num_workers=0, failures=failures)
    out = [stream.next_batch()[1] for _ in range(dataset.batches_per_epoch())]
    return out, dataset.batches_per_epoch(), stream


def test_ranks_get_equal_batch_counts_and_partition_one_process_epoch(shards, tiny):
    _, processor = build_model(tiny)
    one, one_count, _ = _rank_batches(shards, processor, batch_size=4, rank=0, world=1)
    ranks = [_rank_batches(shards, processor, batch_size=2, rank=r, world=2) for r in range(2)]
    # 18 samples at 2 per rank: 9 batches, so rank 1's fifth is padding; both ranks step 5 times, as one process at 4.
    assert [count for _, count, _ in ranks] == [one_count, one_count] == [5, 5]
    assert ranks[1][0][-1] is None and ranks[0][0][-1] is not None
    for step in range(one_count):
        together = [k for batches, _, _ in ranks if batches[step] is not None for k in batches[step]["keys"]]
        assert together == one[step]["keys"]
    # The padding rank still steps: on a real batch it multiplies by 0.
    assert ranks[1][2].zero_weight_batch()["keys"]


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(shards, tiny):
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model, processor = build_model(tiny)
        apply_trainable(model, Trainable(encoder=True, connector=True, llm="full"))
        calls = {"encoder": 0, "llm": 0}  # pre-hooks: recomputation stops early, after the last saved tensor, before a post-hook
        model.encoder.layer_blocks()[0].qkv.register_forward_pre_hook(lambda *_: calls.__setitem__("encoder", calls["encoder"] + 1))
        layer = model.causal_lm.get_decoder().layers[0]
        layer.mlp.register_forward_pre_hook(lambda *_: calls.__setitem__("llm", calls["llm"] + 1))
        if checkpointing:
            assert enable_gradient_checkpointing(model) == ["llm", "encoder"]
        model.train()
        batch = _records_batch(shards, processor)
        out = model(**batch)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.loss.detach(), grads, dict(calls)))
    (loss, grads, calls), (loss_ckpt, grads_ckpt, calls_ckpt) = results
    assert calls == {"encoder": 1, "llm": 1} and calls_ckpt == {"encoder": 2, "llm": 2}  # recomputed in backward
    assert torch.equal(loss, loss_ckpt)
    assert grads.keys() == grads_ckpt.keys() and any(n.startswith("encoder.") for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, atol=1e-7, rtol=1e-6)


def test_gradient_checkpointing_reaches_lora_of_a_frozen_llm_and_keeps_fewer_activations(shards, tiny):
    # The LLM's inputs are media and text embeddings that need no gradient (frozen embeddings under LoRA): reentrant
    # checkpointing would then give the LoRA weights no gradient at all (what HF's enable_input_require_grads works around).
    spec = ModelSpec.model_validate({**tiny.model_dump(), "llm": {**tiny.llm.model_dump(), "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}})
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model, processor = build_model(spec)
        apply_trainable(model, Trainable(connector=False, llm="lora"))
        if checkpointing:
            assert enable_gradient_checkpointing(model) == ["llm"]
        model.train()
        batch = _records_batch(shards, processor)
        kept = [0]

        def pack(t):
            kept[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(**batch)
        out.loss.backward()
        lora = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
        results.append((lora, kept[0]))
    (grads, kept), (grads_ckpt, kept_ckpt) = results
    assert grads and all(g is not None for g in grads_ckpt.values()), [n for n, g in grads_ckpt.items() if g is None]
    assert any(float(g.abs().max()) > 0 for n, g in grads_ckpt.items() if "lora_B" in n)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, atol=1e-7, rtol=1e-6)
    assert kept_ckpt < kept / 2, (kept_ckpt, kept)  # the blocks' activations are not kept for backward


def _records_batch(shards, processor, n: int = 4):
    from mmdomain.data import iter_records

    records = list(iter_records(expand_shards(str(shards / "shards" / "*.tar")), processor.domains, failures=FailureBudget(0)))[:n]
    return processor.collate([processor(r.conversations, r.media, key=r.key) for r in records])


def test_fp16_skips_an_overflowing_step_counts_it_and_keeps_the_scale_in_state(shards, tiny):
    torch.manual_seed(0)
    model, processor = build_model(tiny)
    apply_trainable(model, Trainable())
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    # A scale so large that the scaled fp16 gradients overflow: the scaler must skip the step and halve the scale.
    runner = StepRunner(World(), model, model, optimizer, precision="fp16", clip_grad_norm=1.0,
                        scaler_state={"scale": 2.0 ** 126, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                                      "_growth_tracker": 0})
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    batch = _records_batch(shards, processor)
    first = runner.run(1, [batch], lambda: batch)
    assert first.skipped and runner.scaler.get_scale() == 2.0 ** 125
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    runner.scaler.load_state_dict({**runner.scaler_state(), "scale": 1024.0})
    second = runner.run(2, [batch], lambda: batch)
    assert not second.skipped and second.loss > 0
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    assert json.loads(json.dumps(runner.scaler_state()))["scale"] == 1024.0  # JSON-able: it goes into trainer_state.json


@pytest.mark.slow
def test_batches_and_evaluation_use_the_devices_world_chose_from_a_feature_cache(shards, tiny_llm_dir, tmp_path, monkeypatch):
    """Every micro-batch (read from a feature cache) and the evaluation go to the device the recipe resolved to, and the
    model's every part sits there: nothing takes its device from 'the first parameter'."""
    from mmdomain import train as train_module
    from mmdomain import train_step
    from mmdomain.cli import main

    recipe = {"model": {"encoder": {"name": "tiny-vit", "options": {"image_size": 32, "patch_size": 8, "dim": 32, "channels": 1}},
                        "llm": {"path": tiny_llm_dir}, "max_length": 64},
              "data": {"train": str(shards / "shards" / "*.tar"), "eval": str(shards / "shards" / "*.tar"), "shuffle_buffer": 0},
              "optim": {"max_steps": 2, "batch_size": 4}, "eval": {"max_samples": 4}, "output_dir": str(tmp_path / "run"),
              "device": "cpu", "threads": 1}
    (tmp_path / "r.yaml").write_text(json.dumps(recipe))
    assert main(["-q", "cache-features", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "cache")]) == 0
    chosen = torch.device("cpu")
    seen = {"batches": 0, "evals": []}
    original_to_device, original_eval = train_step.to_device, train_module.run_eval

    def checked_to_device(batch, device):
        assert device == chosen
        moved = original_to_device(batch, device)
        assert moved["media"][0].encoded  # features from the cache, not pixels
        assert all(t.device == chosen for t in (moved["input_ids"], moved["labels"], moved["media"][0].values))
        seen["batches"] += 1
        return moved

    def checked_eval(model, *args, device, **kwargs):
        assert device == chosen and {p.device for p in model.parameters()} == {chosen}
        seen["evals"].append(device)
        return original_eval(model, *args, device=device, **kwargs)

    monkeypatch.setattr(train_step, "to_device", checked_to_device)
    monkeypatch.setattr(train_module, "run_eval", checked_eval)
    result = train_module.train(load_recipe(tmp_path / "r.yaml", [f"data.feature_cache={tmp_path / 'cache'}"]))
    assert seen["batches"] == 2 and seen["evals"] == [chosen] and result["eval"]["samples"] == 4


@pytest.mark.slow
def test_a_recipe_trains_in_fp16_with_gradient_checkpointing_and_saves_the_loss_scale(shards, tiny_llm_dir, tmp_path):
    from mmdomain.checkpoint import latest_checkpoint
    from mmdomain.train import train

    recipe = {"model": {"encoder": {"name": "tiny-vit", "options": {"image_size": 32, "patch_size": 8, "dim": 32, "channels": 1}},
                        "llm": {"path": tiny_llm_dir, "lora": {"r": 4, "alpha": 8}}, "max_length": 64},
              "trainable": {"llm": "lora", "encoder": {"last_blocks": 1}},
              "data": {"train": str(shards / "shards" / "*.tar"), "shuffle_buffer": 0},
              "optim": {"max_steps": 3, "batch_size": 4, "precision": "fp16", "gradient_checkpointing": True},
              "output_dir": str(tmp_path / "run"), "device": "cpu", "threads": 1, "log_every": 1}
    (tmp_path / "r.yaml").write_text(json.dumps(recipe))
    result = train(load_recipe(tmp_path / "r.yaml"))
    assert result["skipped_steps"] == 0 and result["final_loss"] < result["first_loss"]
    state = json.loads((latest_checkpoint(tmp_path / "run") / "trainer_state.json").read_text())
    assert state["grad_scaler"]["scale"] == 65536.0 and state["skipped_steps"] == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [row["skipped_steps"] for row in rows] == [0, 0, 0]


def test_fsdp_refuses_a_unit_whose_trained_weights_mix_dtypes_before_any_collective(tiny):
    from mmdomain.distributed import shard_model

    model, _ = build_model(tiny)
    apply_trainable(model, Trainable())  # the connector trains, in float32
    head = model.causal_lm.get_output_embeddings()
    head.to(torch.bfloat16).requires_grad_(True)
    with pytest.raises(DistributedError, match=r"the rest \(embeddings, head, encoder, connector\) have several dtypes: float32 "
                                               r"\(connector\..*\), bfloat16"):
        shard_model(model, torch.device("cpu"))  # raises before it needs a process group


def test_fsdp_makes_generate_keep_every_rank_stepping_until_all_finish(tiny):
    # Under FSDP2 each decoding step gathers every rank's shards: a rank whose samples reach EOS first must go on
    # stepping (transformers' synced_gpus), or the others wait forever. generate turns it on for modules it sees as FSDP's:
    # fully_shard marks every module it manages (torch 2.14), the LLM under the root unit included; nothing of ours does.
    import torch.distributed as dist
    from transformers.integrations.fsdp import is_fsdp_managed_module

    from mmdomain.distributed import shard_model

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model, _ = build_model(tiny)
        assert not is_fsdp_managed_module(model.causal_lm)
        shard_model(model, torch.device("cpu"))
        assert is_fsdp_managed_module(model.causal_lm)
    finally:
        dist.destroy_process_group()


def test_a_world_size_without_a_launcher_is_one_line_naming_the_launchers(monkeypatch):
    from mmdomain.distributed import DistributedError, launched_world

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(DistributedError, match="WORLD_SIZE=2 is set but MASTER_ADDR is not: start the run with torchrun"):
        launched_world()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert launched_world() == (0, 2, 0)
