"""Encoders: every source library builds by name, reports true metadata, selects layers and stops early."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import encoders
from encoders import create_encoder, image_transform, list_encoders, register_encoder

TINY_HF = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8)


def _check_shape(enc, size=None):
    h, w = size or enc.info.input_size
    out = enc(torch.randn(2, enc.info.channels, h, w))
    assert out.shape == (2, enc.info.num_tokens((h, w)), enc.info.embed_dim)
    return out


def test_encoders_import_without_mmdomain():
    code = "import sys, encoders, connectors; assert not any(m == 'mmdomain' or m.startswith('mmdomain.') for m in sys.modules); assert 'timm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_timm_vit_by_name_reports_info_and_prunes_after_layer():
    enc = create_encoder("timm:vit_tiny_patch16_224", random_init=True, layer=-2)
    info = enc.info
    assert (info.modality, info.embed_dim, info.input_size, info.patch_size, info.channels) == ("image", 192, (224, 224), (16, 16), 3)
    assert info.num_tokens() == 196 and info.source == "timm:vit_tiny_patch16_224"
    assert len(enc.model.blocks) == 11  # the 12th block is never built into the forward pass
    _check_shape(enc)
    enc_cls = create_encoder("timm:vit_tiny_patch16_224", random_init=True, layer=-1, keep_cls=True, image_size=160)
    assert enc_cls.info.num_tokens() == 101 and enc_cls.info.input_size == (160, 160)
    _check_shape(enc_cls)


def test_timm_layer_matches_full_model_intermediate(tmp_path):
    import timm

    full = timm.create_model("vit_tiny_patch16_224", num_classes=0).eval()
    save_file(full.state_dict(), str(tmp_path / "vit.safetensors"))
    enc = create_encoder("timm:vit_tiny_patch16_224", weights=str(tmp_path / "vit.safetensors"), layer=5).eval()
    x = torch.randn(1, 3, 224, 224)
    (ref,) = full.forward_intermediates(x, indices=[4], intermediates_only=True, output_fmt="NCHW")
    assert torch.allclose(enc(x), ref.flatten(2).transpose(1, 2), atol=1e-6)
    final = create_encoder("timm:vit_tiny_patch16_224", weights=str(tmp_path / "vit.safetensors"), keep_cls=True).eval()
    assert torch.allclose(final(x), full.forward_features(x), atol=1e-5)  # layer -1 = the model's own final features


def test_timm_cnn_and_multispectral_channels():
    enc = create_encoder("timm:resnet18", random_init=True, layer=-2)
    assert enc.info.patch_size == (16, 16) and enc.info.embed_dim == 256
    _check_shape(enc)
    wide = create_encoder("timm:vit_tiny_patch16_224", random_init=True, in_chans=6)
    assert wide.info.channels == 6 and len(wide.info.mean) == 6
    _check_shape(wide)


def test_open_clip_by_name_and_from_local_directory(tmp_path):
    tiny = dict(width=32, layers=3, head_width=16, image_size=64, patch_size=16)
    enc = create_encoder("open_clip:ViT-B-16", random_init=True, vision_cfg=tiny, layer=-2)
    assert enc.info.embed_dim == 32 and enc.info.num_tokens() == 16 and enc.info.patch_size == (16, 16)
    assert len(enc.visual.transformer.resblocks) == 2
    _check_shape(enc)
    # The way BiomedCLIP / RemoteCLIP ship: open_clip_config.json + weights in one directory.
    from open_clip import get_model_config

    cfg = get_model_config("ViT-B-16")
    cfg["vision_cfg"].update(tiny)
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {"mean": [0.1, 0.2, 0.3], "std": [0.3, 0.2, 0.1]}}))
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    full = _build_vision_tower(cfg["embed_dim"], CLIPVisionCfg(**cfg["vision_cfg"])).eval()
    save_file({f"visual.{k}": v.contiguous() for k, v in full.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors"))
    loaded = create_encoder(f"open_clip:{tmp_path}", layer=-1, keep_cls=True)
    assert loaded.info.mean == (0.1, 0.2, 0.3) and loaded.info.num_tokens() == 17
    x = torch.randn(2, 3, 64, 64)
    out = full.forward_intermediates(x, indices=[2], normalize_intermediates=True, intermediates_only=True, output_fmt="NLC", output_extra_tokens=True)
    ref = torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1)
    assert torch.allclose(loaded.eval()(x), ref, atol=1e-6)


@pytest.mark.parametrize("model_type,prefix", [("clip", 1), ("siglip", 0), ("dinov2", 1)])
def test_hf_towers_from_config(model_type, prefix):
    enc = create_encoder(f"hf:{model_type}", random_init=True, config=TINY_HF, layer=-2)
    assert enc.info.embed_dim == 32 and enc.info.num_tokens() == 16 and enc.model.config.num_hidden_layers == 2
    _check_shape(enc)
    kept = create_encoder(f"hf:{model_type}", random_init=True, config=TINY_HF, keep_cls=True)
    assert kept.info.num_tokens() == 16 + prefix
    _check_shape(kept)


def test_hf_clip_directory_matches_llava_feature_selection(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    full = CLIPVisionModel(CLIPVisionConfig(**TINY_HF)).eval()
    full.save_pretrained(str(tmp_path))
    enc = create_encoder(f"hf:{tmp_path}", layer=-2).eval()
    x = torch.randn(2, 3, 32, 32)
    ref = full(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
    assert torch.allclose(enc(x), ref, atol=1e-6)
    assert enc.info.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))


def test_unknown_and_duplicate_names():
    with pytest.raises(KeyError, match="Did you mean 'tiny-vit'"):
        create_encoder("tiny-vt")
    with pytest.raises(KeyError, match="timm:"):
        create_encoder("tim:vit_tiny_patch16_224")
    with pytest.raises(ValueError, match="already registered"):
        register_encoder("tiny-vit", lambda **_: None)
    with pytest.raises(KeyError, match="no architecture"):
        create_encoder("timm:vit_not_a_model")
    with pytest.raises(FileNotFoundError, match="never downloads"):
        create_encoder("hf:google/siglip-base-patch16-224")
    with pytest.raises(ValueError, match="out of range"):
        create_encoder("tiny-vit", depth=2, layer=-3)
    assert "timm:<spec>" in list_encoders() and "tiny-vit" in list_encoders()


def test_image_transform_derives_normalisation_from_info():
    enc = create_encoder("tiny-vit", image_size=32, channels=3)
    tf = image_transform(enc.info)
    img = torch.full((48, 40, 3), 255, dtype=torch.uint8).numpy()
    out = tf(img)
    assert out.shape == (3, 32, 32)
    assert torch.allclose(out, torch.full_like(out, (1.0 - 0.5) / 0.25), atol=1e-4)
    gray16 = (torch.ones(20, 20, dtype=torch.int32) * 65535).numpy().astype("uint16")
    assert torch.allclose(tf(gray16), torch.full((3, 32, 32), 2.0), atol=1e-3)
    padded = image_transform(enc.info, resize="pad")(torch.ones(3, 16, 32))
    assert padded[:, 0, 0].tolist() == pytest.approx([0.0] * 3)  # padding is the mean colour, i.e. 0 after normalising


def test_tiny_vit_registered_like_any_other():
    enc = encoders.create_encoder("tiny-vit", layer=1, depth=3)
    assert len(enc.blocks) == 1
    _check_shape(enc)
