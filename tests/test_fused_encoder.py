"""Several encoders for one media kind (`fuse`): channel fusion (Eagle) and sequence fusion, each part fed the item at
its own size and normalisation; refusals that name the mismatch; training, saving and reloading through a recipe."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from encoders import check_encoder, create_encoder
from encoders.errors import EncoderError
from mmdomain.spec import EncoderSpec

SMALL = {"name": "tiny-vit", "options": {"image_size": 32, "dim": 32, "keep_cls": False}}
LARGE = {"name": "tiny-vit", "options": {"image_size": 64, "dim": 48, "keep_cls": False}}


def test_channel_fusion_gives_each_part_its_own_input_and_pools_to_one_grid():
    torch.manual_seed(0)
    fused = create_encoder("fuse", encoders=[SMALL, LARGE])
    info = fused.info
    assert (info.embed_dim, info.num_tokens(), info.input_size) == (32 + 48, 16, (64, 64))
    assert info.mean == (0.0, 0.0, 0.0) and info.std == (1.0, 1.0, 1.0)  # the parts normalise inside
    x = torch.rand(2, 3, 64, 64)
    out = fused(x)
    assert out.shape == (2, 16, 80)
    small, large = fused.parts
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (small.info.mean, small.info.std))
    expected_small = small((F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False) - mean) / std)
    assert torch.allclose(out[..., :32], expected_small, atol=1e-6)
    lmean, lstd = (torch.tensor(v).view(1, 3, 1, 1) for v in (large.info.mean, large.info.std))
    grid = large((x - lmean) / lstd).transpose(1, 2).reshape(2, 48, 8, 8)  # the 8 x 8 grid pooled to 4 x 4
    assert torch.allclose(out[..., 32:], F.adaptive_avg_pool2d(grid, 4).flatten(2).transpose(1, 2), atol=1e-6)


def test_sequence_fusion_and_the_refusals_name_the_mismatch():
    seq = create_encoder("fuse", mode="sequence", encoders=[SMALL, {**LARGE, "options": {**LARGE["options"], "dim": 32}}])
    assert seq.info.num_tokens() == 16 + 64 and seq(torch.rand(1, 3, 64, 64)).shape == (1, 80, 32)
    with pytest.raises(EncoderError, match=r"mode sequence joins tokens of one width, but the parts give \[32, 48\]"):
        create_encoder("fuse", mode="sequence", encoders=[SMALL, LARGE])
    with_cls = [{**SMALL, "options": {**SMALL["options"], "keep_cls": True}}, LARGE]
    with pytest.raises(EncoderError, match=r"\[17, 64\] tokens .*keep_cls: false"):
        create_encoder("fuse", encoders=with_cls)
    with pytest.raises(EncoderError, match="differ in modality"):
        create_encoder("fuse", encoders=[SMALL, {"name": "tiny-audio"}])
    with pytest.raises(EncoderError, match="at least two"):
        create_encoder("fuse", encoders=[SMALL])
    with pytest.raises(EncoderError, match=r"encoders\[1\] \(hf:/nowhere/siglip\): .*does not exist"):
        check_encoder("fuse", {"encoders": [SMALL, {"name": "hf:/nowhere/siglip"}]})
    with pytest.raises(EncoderError, match=r"encoders\[0\] \(tiny-vit\): .*no option 'imag_size'"):
        create_encoder("fuse", encoders=[{"name": "tiny-vit", "options": {"imag_size": 32}}, LARGE])


def test_a_fused_encoder_is_referenced_only_when_every_part_is(tmp_path):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    referenced = {"name": "timm:vit_tiny_patch16_224", "options": {"weights": str(weights)}}
    assert not EncoderSpec(name="fuse", options={"encoders": [SMALL, referenced]}).is_referenced()
    assert EncoderSpec(name="fuse", options={"encoders": [referenced, referenced]}).is_referenced()


def test_a_recipe_with_a_fused_encoder_trains_saves_and_reloads(tmp_path, tiny_llm_dir):
    from mmdomain.builder import load_pretrained
    from mmdomain.cli import main

    from .conftest import write_side_task

    write_side_task(tmp_path, n=16)
    assert main(["-q", "make-shards", "--jsonl", str(tmp_path / "samples.jsonl"), "--media", str(tmp_path / "media"),
                 "--out", str(tmp_path / "shards")]) == 0
    recipe = {"model": {"encoder": {"name": "fuse", "options": {"encoders": [SMALL, LARGE]}}, "connector": {"name": "mlp"},
                        "llm": {"path": tiny_llm_dir}},
              "data": {"train": str(tmp_path / "shards" / "*.tar"), "eval": str(tmp_path / "shards" / "*.tar")},
              "optim": {"max_steps": 3, "batch_size": 4}, "output_dir": str(tmp_path / "run")}
    (tmp_path / "r.yaml").write_text(json.dumps(recipe))
    assert main(["-q", "run", str(tmp_path / "r.yaml")]) == 0
    assert json.loads((tmp_path / "run" / "result.json").read_text())["eval"]["samples"] == 16
    model, proc = load_pretrained(tmp_path / "run")
    again, _ = load_pretrained(tmp_path / "run")
    assert model.tokens_per_item == 16 and model.connector.in_dim == 80  # inferred from the fused width
    from PIL import Image

    conv = [{"role": "user", "content": "<image> where is the lesion ?"}, {"role": "assistant", "content": "left"}]
    batch = proc.collate([proc(conv, [Image.open(tmp_path / "media" / "0.png")], key="k")])
    with torch.no_grad():
        assert torch.equal(model.eval()(**batch, return_logits=True).logits, again.eval()(**batch, return_logits=True).logits)
