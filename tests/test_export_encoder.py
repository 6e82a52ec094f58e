"""`mmdomain export --format encoder`: the tuned encoder leaves as a `local:` folder, and as a file timm loads itself."""
from __future__ import annotations

import json

import pytest
import torch

from encoders import create_encoder, image_transform
from encoders.local import open_clip_features, timm_features, transformers_features
from mmdomain.builder import load_pretrained
from mmdomain.export import export
from mmdomain.export_output import ExportError
from mmdomain.lora_merge import merge_encoder_lora

from .export_helpers import make_checkpoint, sample_image, write_tower

TIMM_ARCH = "vit_tiny_patch16_224"
TIMM_SHAPE = {"image_size": 32, "depth": 3, "embed_dim": 32, "num_heads": 2}


def _features(encoder, pixels):
    with torch.no_grad():
        return (encoder.eval() if hasattr(encoder, "eval") else encoder)(pixels)


def _merged_features(encoder, pixels):
    """Features of ``encoder`` with its LoRA merged (what an export holds: equal to the adapters' output up to rounding)."""
    before = _features(encoder, pixels)
    merge_encoder_lora(encoder)
    after = _features(encoder, pixels)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    return after


CLOSE = dict(atol=1e-5, rtol=1e-5)


def test_a_tuned_hf_tower_round_trips_through_local(tmp_path, tiny_llm_dir):
    checkpoint = make_checkpoint(tmp_path / "run", tiny_llm_dir, write_tower(tmp_path / "clip"), layer=-2, encoder_lora=True)
    model, _ = load_pretrained(checkpoint)
    out = export(checkpoint, tmp_path / "enc", "encoder")
    local = create_encoder(f"local:{out}")
    pixels = image_transform(local.info)(sample_image())[None]
    assert torch.equal(pixels, image_transform(model.encoder.info)(sample_image())[None])  # same preprocessing, from the same info
    ours = _merged_features(model.encoder, pixels)
    assert ours.abs().mean() > 0.1
    assert torch.equal(_features(local, pixels), ours)  # the same weights in the same architecture
    assert local.info.source == f"local:{out}" and local.info.layer == model.encoder.info.layer
    assert not any("lora_" in name for name, _ in local.named_parameters())
    from transformers import CLIPVisionModel

    direct = json.loads((out / "encoder.json").read_text())["direct"]
    tower = CLIPVisionModel.from_pretrained(str(out / direct["folder"])).eval()
    assert direct["hidden_states"] == [2] and direct["drop_prefix"] == 1  # layer -2 of 3, CLS dropped
    torch.testing.assert_close(_features(lambda x: transformers_features(tower, x, direct), pixels), ours, **CLOSE)
    card = (out / "README.md").read_text()
    assert f"create_encoder('local:{out}')" in card and "LoRA adapters are merged" in card


def test_a_timm_encoder_loads_through_local_and_through_timm_itself(tmp_path, tiny_llm_dir):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(3)
    source = timm.create_model(TIMM_ARCH, num_classes=0, img_size=32, depth=3, embed_dim=32, num_heads=2)
    save_file(source.state_dict(), str(tmp_path / "vit.safetensors"))
    encoder = {"name": f"timm:{TIMM_ARCH}", "options": {"weights": str(tmp_path / "vit.safetensors"), "layer": -2, **TIMM_SHAPE}}
    checkpoint = make_checkpoint(tmp_path / "run", tiny_llm_dir, None, encoder=encoder, encoder_lora=True)
    model, _ = load_pretrained(checkpoint)
    out = export(checkpoint, tmp_path / "enc", "encoder")
    pixels = torch.randn(2, 3, 32, 32)
    ours = _merged_features(model.encoder, pixels)
    assert torch.equal(_features(create_encoder(f"local:{out}"), pixels), ours)
    direct = json.loads((out / "encoder.json").read_text())["direct"]
    tower = timm.create_model(TIMM_ARCH, pretrained=True, num_classes=0, **direct["create_model"],
                              pretrained_cfg_overlay=dict(file=str(out / direct["file"]))).eval()
    with torch.no_grad():
        torch.testing.assert_close(timm_features(tower, pixels, direct), ours, **CLOSE)
        # the tuned block differs from the source file's: LoRA really travelled into timm's file
        assert not torch.allclose(timm_features(source.eval(), pixels, direct), ours, atol=1e-3)


def test_a_tiny_encoder_round_trips_and_other_kinds_are_refused(tmp_path, tiny_llm_dir):
    tiny = {"name": "tiny-vit", "options": {"image_size": 32, "patch_size": 8, "dim": 32}}
    checkpoint = make_checkpoint(tmp_path / "run", tiny_llm_dir, None, encoder=tiny)
    model, _ = load_pretrained(checkpoint)
    out = export(checkpoint, tmp_path / "enc", "encoder")
    pixels = torch.randn(1, 3, 32, 32)
    assert torch.equal(_features(create_encoder(f"local:{out}"), pixels), _features(model.encoder, pixels))

    fused = {"name": "fuse", "options": {"encoders": [tiny, {"name": "tiny-vit", "options": {"image_size": 32, "patch_size": 8, "dim": 16}}]}}
    checkpoint = make_checkpoint(tmp_path / "fused", tiny_llm_dir, None, encoder=fused)
    with pytest.raises(ExportError, match=r"cannot be saved as a local: folder yet; supported: .*--format native"):
        export(checkpoint, tmp_path / "fused-out", "encoder")
    assert not (tmp_path / "fused-out").exists()


def test_an_open_clip_tower_loads_through_local_and_through_open_clip_itself(tmp_path, tiny_llm_dir):
    import open_clip
    from safetensors.torch import save_file

    cfg = open_clip.get_model_config("ViT-B-16")
    cfg["vision_cfg"].update(width=32, layers=3, head_width=16, image_size=32, patch_size=8)
    cfg["text_cfg"].update(width=32, heads=2, layers=1)
    cfg["embed_dim"] = 32
    source = tmp_path / "biomedclip-like"
    source.mkdir()
    (source / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.25] * 3}}))
    torch.manual_seed(4)
    save_file({k: v.contiguous() for k, v in open_clip.CLIP(**cfg).state_dict().items()}, str(source / "open_clip_model.safetensors"))
    encoder = {"name": f"open_clip:{source}", "options": {"layer": -2}}
    checkpoint = make_checkpoint(tmp_path / "run", tiny_llm_dir, None, encoder=encoder, encoder_lora=True)
    model, _ = load_pretrained(checkpoint)
    out = export(checkpoint, tmp_path / "enc", "encoder")
    pixels = torch.randn(2, 3, 32, 32)
    ours = _merged_features(model.encoder, pixels)
    local = create_encoder(f"local:{out}")
    assert torch.equal(_features(local, pixels), ours)
    assert local.info.mean == (0.5, 0.5, 0.5)  # the source's preprocessing travels with it
    direct = json.loads((out / "encoder.json").read_text())["direct"]
    whole = open_clip.create_model(f"local-dir:{out / direct['folder']}").eval()  # text tower included: a full CLIP model
    with torch.no_grad():
        torch.testing.assert_close(open_clip_features(whole.visual, pixels, direct), ours, **CLOSE)
