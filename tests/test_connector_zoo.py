"""The connector zoo (perceiver, qformer and its window variant, c_abstractor, ldp, avg_pool, and the earlier ones):
token counts as reported for two grids, gradients to every weight, safetensors round trips, clear refusals of grids
that do not fit, and a tiny stage-1 run through a recipe."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from connectors import create_connector, list_connectors

# name -> (options, {input tokens: output tokens}) for an 8x8 and a 16x16 grid of patch tokens
ZOO = {
    "linear": ({}, {64: 64, 256: 256}),
    "mlp": ({"depth": 2}, {64: 64, 256: 256}),
    "pixel_shuffle": ({"factor": 2}, {64: 16, 256: 64}),
    "frame_stack": ({"k": 3}, {64: 22, 256: 86}),
    "perceiver": ({"num_queries": 8, "heads": 4}, {64: 8, 256: 8}),
    "qformer": ({"num_queries": 8, "heads": 4}, {64: 8, 256: 8}),
    "qformer_window": ({"window": 5, "num_queries": 2, "heads": 4}, {64: 26, 256: 104}),
    "c_abstractor": ({"grid": 4, "depth": 1}, {64: 16, 256: 16}),
    "ldp": ({}, {64: 16, 256: 64}),
    "avg_pool": ({"factor": 2}, {64: 16, 256: 64}),
    "avg_pool_grid": ({"grid": 3}, {64: 9, 256: 9}),
    "depth_pool": ({"groups": 1}, {64: 64, 256: 256}),  # one image is one slice; volumes in tests/test_volume_path.py
}


def _make(key: str, in_dim: int = 32, out_dim: int = 48):
    name = key.removesuffix("_window").removesuffix("_grid")
    return create_connector(name, in_dim=in_dim, out_dim=out_dim, **ZOO[key][0])


def test_every_registered_connector_is_in_the_zoo_table():
    assert set(list_connectors()) <= {k.removesuffix("_window").removesuffix("_grid") for k in ZOO}


@pytest.mark.parametrize("key", ZOO)
def test_output_shape_matches_the_reported_count_for_two_grids(key):
    connector = _make(key)
    assert (connector.in_dim, connector.out_dim) == (32, 48)
    for n_in, n_out in ZOO[key][1].items():
        assert connector.num_output_tokens(n_in) == n_out
        assert connector(torch.randn(2, n_in, 32)).shape == (2, n_out, 48)


@pytest.mark.parametrize("key", ZOO)
def test_gradient_reaches_every_parameter(key):
    connector = _make(key)
    # A connector that joins slices weighs them against each other: give it several (a single one has no weighing).
    tokens = torch.randn(2, 3, 64, 32) if getattr(connector, "takes_slices", False) else torch.randn(2, 64, 32)
    (connector(tokens) ** 2).mean().backward()
    missing = [n for n, p in connector.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"{key}: no gradient reaches {missing}"


@pytest.mark.parametrize("key", ZOO)
def test_state_dict_round_trips_through_safetensors(key, tmp_path):
    trained = _make(key)
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(tmp_path / "c.safetensors"))
    torch.manual_seed(123)  # another random init, so equal outputs prove the weights came from the file
    fresh = _make(key)
    fresh.load_state_dict(load_file(str(tmp_path / "c.safetensors")), strict=True)
    x = torch.randn(2, 64, 32)
    assert torch.equal(trained.eval()(x), fresh.eval()(x))


@pytest.mark.parametrize("name,options,tokens,match", [
    ("c_abstractor", {"grid": 4}, 65, "square token grid.*keep_cls=False"),
    ("c_abstractor", {"grid": 12}, 64, "grid=12 is larger than the encoder's 8x8 token grid; set grid to at most 8"),
    ("ldp", {}, 197, "ldp needs a square token grid"),
    ("avg_pool", {"factor": 3}, 64, "avg_pool factor=3 does not divide the encoder's 8x8 token grid"),
    ("avg_pool", {"grid": 9}, 64, "grid=9 is larger"),
    ("pixel_shuffle", {"factor": 3}, 64, "factor=3 does not divide"),
])
def test_grids_that_do_not_fit_are_refused_naming_the_option(name, options, tokens, match):
    connector = create_connector(name, in_dim=8, out_dim=8, **options)
    with pytest.raises(ValueError, match=match):
        connector.num_output_tokens(tokens)
    with pytest.raises(ValueError, match=match):
        connector(torch.randn(1, tokens, 8))


@pytest.mark.parametrize("name,options,match", [
    ("perceiver", {"heads": 5}, "heads=5 does not divide its width 32"),
    ("qformer", {"heads": 3}, "heads=3 does not divide its width 32"),
    ("qformer", {"window": 0}, "window >= 1"),
    ("avg_pool", {"grid": 2, "factor": 2}, "not both"),
])
def test_bad_options_are_refused_naming_the_option(name, options, match):
    with pytest.raises(ValueError, match=match):
        create_connector(name, in_dim=32, out_dim=8, **options)


def test_window_qformer_reads_each_window_alone_in_time_order():
    """Changing the tokens of one window changes only that window's outputs, and the padded last window gives what
    it gives on its own (padding is masked, not attended)."""
    connector = create_connector("qformer", in_dim=16, out_dim=8, window=4, num_queries=2, heads=4).eval()
    x = torch.randn(1, 10, 16)  # windows [0:4], [4:8], [8:10] (padded)
    out = connector(x)
    changed = x.clone()
    changed[:, 4:8] = torch.randn(1, 4, 16)
    diff = (connector(changed) - out).abs().amax(dim=-1)[0]
    assert diff[2:4].min() > 1e-4 and diff[:2].max() == 0 and diff[4:].max() == 0
    assert torch.allclose(connector(x[:, 8:10])[0], out[0, 4:], atol=1e-5)


def test_default_options_fit_a_clip_l_336_grid():
    """Defaults are the papers': Honeybee's 144 tokens, MobileVLM's 576 -> 144, Flamingo's 64 latents, BLIP-2's 32."""
    counts = {name: create_connector(name, in_dim=64, out_dim=32).num_output_tokens(576)
              for name in ("c_abstractor", "ldp", "perceiver", "qformer", "avg_pool")}
    assert counts == {"c_abstractor": 144, "ldp": 144, "perceiver": 64, "qformer": 32, "avg_pool": 144}
    assert create_connector("qformer", in_dim=64, out_dim=32, window=17).num_output_tokens(1500) == math.ceil(1500 / 17)


# -- a tiny stage-1 run through a recipe ----------------------------------------------------------------------

# tiny-vit at 32 px, patch 8: a 4x4 grid of 16 tokens
STAGE1 = {
    "perceiver": {"num_queries": 4, "heads": 4, "depth": 1},
    "qformer": {"num_queries": 4, "heads": 4, "depth": 1},
    "qformer_window": {"window": 4, "num_queries": 1, "heads": 4, "depth": 1},
    "c_abstractor": {"grid": 2, "depth": 1},
    "ldp": {},
    "avg_pool": {"factor": 2},
}


@pytest.fixture(scope="module")
def side_shards(tmp_path_factory):
    from mmdomain.shards import make_shards

    from .conftest import write_side_task

    root = tmp_path_factory.mktemp("side")
    write_side_task(root, n=32)
    make_shards(root / "samples.jsonl", root / "media", root / "shards", prefix="train", samples_per_shard=100)
    return str(root / "shards" / "train-*.tar")


@pytest.mark.slow
@pytest.mark.parametrize("key", STAGE1)
def test_stage1_run_through_a_recipe_lowers_the_loss_and_reloads(key, tiny_llm_dir, side_shards, tmp_path):
    from mmdomain.builder import load_pretrained
    from mmdomain.recipe import validate_recipe
    from mmdomain.train import train

    name = key.removesuffix("_window")
    recipe = validate_recipe({
        "stage": "align",
        "model": {"encoder": {"name": "tiny-vit", "options": {"image_size": 32, "patch_size": 8, "dim": 32, "channels": 1}},
                  "connector": {"name": name, "options": STAGE1[key]}, "llm": {"path": tiny_llm_dir}, "max_length": 64},
        "trainable": {"connector": True, "llm": False},
        "data": {"train": side_shards, "shuffle_buffer": 0},
        "optim": {"max_steps": 16, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2},
        "output_dir": str(tmp_path / "run"), "log_every": 4, "seed": 0,
    })
    result = train(recipe)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert losses[-1] < 0.95 * losses[0], f"{key}: loss {losses}"  # an mlp falls 16 % in these 16 steps
    model, processor = load_pretrained(tmp_path / "run")
    expected = create_connector(name, in_dim=32, out_dim=model.connector.out_dim, **STAGE1[key]).num_output_tokens(16)
    assert processor.kinds[0].tokens_per_item == model.tokens_per_item == expected
    assert result["steps"] == 16


# -- multi-layer feature fusion (the encoder option `layers`) ----------------------------------------------------


def test_tiny_vit_layers_concatenate_the_named_hidden_states():
    from encoders import create_encoder

    options = {"image_size": 32, "patch_size": 8, "dim": 16, "depth": 3, "channels": 1}
    fused = create_encoder("tiny-vit", layers=[-1, 1], **options).eval()
    assert fused.info.embed_dim == 32 and fused.info.layers == (-1, 1) and fused.info.layer == -1
    x = torch.randn(2, 1, 32, 32)
    out = fused(x)
    assert out.shape == (2, 16, 32)
    for part, layer in ((out[..., :16], -1), (out[..., 16:], 1)):  # each half is what `layer` alone gives
        single = create_encoder("tiny-vit", layer=layer, **options).eval()
        single.load_state_dict(fused.state_dict(), strict=False)
        assert torch.allclose(part, single(x), atol=1e-6), layer


def test_hf_vision_layers_concatenate_hidden_states_with_the_final_norm_only_on_the_last():
    from encoders import create_encoder

    config = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "image_size": 32, "patch_size": 8}
    fused = create_encoder("hf:siglip", random_init=True, config=config, layers=[-1, -3]).eval()
    assert fused.info.embed_dim == 64 and fused.info.num_tokens() == 16
    x = torch.randn(2, 3, 32, 32)
    out = fused(x)
    for part, layer in ((out[..., :32], -1), (out[..., 32:], -3)):
        single = create_encoder("hf:siglip", random_init=True, config=config, layer=layer).eval()
        single.load_state_dict(fused.state_dict(), strict=False)
        assert torch.allclose(part, single(x), atol=1e-5), layer


def test_fused_layers_set_the_connector_in_dim_through_the_recipe(tiny_llm_dir):
    from mmdomain.builder import build_model
    from mmdomain.spec import ModelSpec

    spec = ModelSpec.model_validate({
        "encoder": {"name": "tiny-vit", "options": {"image_size": 32, "patch_size": 8, "dim": 16, "depth": 3, "channels": 1, "layers": [-1, -2, 1]}},
        "connector": {"name": "c_abstractor", "options": {"grid": 2, "depth": 1}}, "llm": {"path": tiny_llm_dir}})
    model, processor = build_model(spec)
    assert model.connector.in_dim == 48 and processor.kinds[0].tokens_per_item == 4
    from mmdomain.media import MediaBatch

    assert model.encode(0, MediaBatch(torch.randn(2, 1, 32, 32))).shape == (2, 4, model.connector.out_dim)


@pytest.mark.parametrize("name,options,match", [
    ("tiny-vit", {"layers": [-1, -1]}, "same layer twice"),
    ("tiny-vit", {"layers": [-1, -2], "layer": -2}, "not both"),
    ("tiny-vit", {"layers": []}, "list of hidden-state indices"),
    ("tiny-vit", {"layers": [-1, 7]}, "out of range"),
    ("tiny-vit", {"layers": [-1, "x"]}, r"layers must be a list of hidden-state indices \(whole numbers\), e.g. \[-1, -5\]; got \[-1, 'x'\]"),
    ("tiny-vit", {"layers": [1.5]}, "whole numbers"),  # was read as layer 1 without a word
    ("tiny-audio", {"layers": [-1, 5]}, "out of range"),
    ("timm:vit_tiny_patch16_224", {"random_init": True, "layers": [-1, -2]}, "multi-layer feature fusion.*not by this encoder family"),
    ("open_clip:ViT-B-32", {"random_init": True, "layers": [-1, -2]}, "multi-layer feature fusion"),
    ("hf_audio:whisper", {"random_init": True, "layers": [-1, -2]}, "multi-layer feature fusion"),
])
def test_layers_refusals_name_the_option(name, options, match):
    from encoders import EncoderError, check_encoder, create_encoder

    with pytest.raises(EncoderError, match=match):
        create_encoder(name, **options)
    if ":" in name:  # `mmdomain validate` refuses it too, before any model is built
        with pytest.raises(EncoderError, match=match):
            check_encoder(name, options)


def test_tiny_audio_layers_feed_a_window_qformer():
    from encoders import create_encoder

    encoder = create_encoder("tiny-audio", clip_seconds=0.5, dim=16, depth=2, layers=[-1, 1])
    assert encoder.info.embed_dim == 32 and encoder.info.num_tokens() == 25
    connector = create_connector("qformer", in_dim=encoder.info.embed_dim, out_dim=8, window=10, heads=4)
    assert connector(encoder(torch.randn(2, 8000))).shape == (2, connector.num_output_tokens(25), 8) == (2, 3, 8)


# -- what a user sees from the command line ------------------------------------------------------------------


def _cli_recipe(tmp_path, llm_dir, shards, connector: dict) -> str:
    data = {"model": {"encoder": {"name": "tiny-vit", "options": {"image_size": 32, "patch_size": 8, "dim": 32, "channels": 1}},
                      "connector": connector, "llm": {"path": llm_dir}, "max_length": 64},
            "data": {"train": shards}, "optim": {"max_steps": 1, "batch_size": 2}, "output_dir": str(tmp_path / "run")}
    (tmp_path / "r.yaml").write_text(json.dumps(data))  # JSON is YAML
    return str(tmp_path / "r.yaml")


def test_validate_names_a_mistyped_connector_option(tiny_llm_dir, side_shards, tmp_path, capsys):
    from mmdomain.cli import main

    recipe = _cli_recipe(tmp_path, tiny_llm_dir, side_shards, {"name": "perceiver", "options": {"num_querys": 4}})
    assert main(["-q", "validate", recipe]) == 2
    assert "connector 'perceiver' has no option 'num_querys'. Did you mean 'num_queries'?" in capsys.readouterr().err


def test_run_refuses_a_grid_that_does_not_fit_in_one_line_before_training(tiny_llm_dir, side_shards, tmp_path, capsys):
    from mmdomain.cli import main

    recipe = _cli_recipe(tmp_path, tiny_llm_dir, side_shards, {"name": "c_abstractor", "options": {"grid": 12}})
    assert main(["-q", "run", recipe]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mmdomain run: error: c_abstractor grid=12 is larger than the encoder's 4x4 token grid; set grid to at most 4")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("name,options,match", [
    ("avg_pool", {"grid": 2.5}, r"avg_pool' option grid must be an integer or null; got 2.5"),
    ("perceiver", {"num_queries": "4"}, r"perceiver' option num_queries must be an integer; got '4'"),
    ("c_abstractor", {"grid": None}, r"c_abstractor' option grid must be an integer; got None"),
    ("qformer", {"window": 2.5}, r"qformer' option window must be an integer or null; got 2.5"),
    ("frame_stack", {"k": True}, r"frame_stack' option k must be an integer; got True"),
])
def test_options_of_the_wrong_type_are_refused_naming_the_option(name, options, match):
    # A YAML 2.5 or "4" reached torch as a TypeError mid-run ("internal error"); it is the user's to fix.
    from connectors import ConnectorOptionError, check_connector

    with pytest.raises(ConnectorOptionError, match=match):
        check_connector(name, options)
    check_connector("qformer", {"window": None, "num_queries": 2})  # null where the option allows it
