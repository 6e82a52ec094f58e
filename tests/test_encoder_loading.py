"""Encoder and LLM loading: unknown options, accidental random towers and bad weight files are named errors."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from encoders import EncoderError, check_options, create_encoder
from encoders.errors import EncoderOptionError, RandomInitError, UnknownOptionError, WeightsFileError, WeightsMismatchError

TINY_HF = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8)
TINY_OPEN_CLIP = dict(width=32, layers=3, head_width=16, image_size=64, patch_size=16)


class NotATensor:
    """An object a checkpoint pickle may hold; torch refuses to unpickle it with weights_only=True."""


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def vit_tiny_state():
    import timm

    return timm.create_model("vit_tiny_patch16_224", num_classes=0).state_dict()


# -- options ------------------------------------------------------------------------------------------------------


def test_unknown_option_is_named_with_did_you_mean_before_building():
    with pytest.raises(UnknownOptionError, match=r"encoder 'tiny-vit' has no option 'bogus'\..*Its options: image_size") as caught:
        create_encoder("tiny-vit", bogus=1)
    assert isinstance(caught.value, EncoderError) and isinstance(caught.value, TypeError)  # TypeError: what it raised before
    with pytest.raises(UnknownOptionError, match=r"'hf:clip' has no option 'confg'\. Did you mean 'config'\?"):
        check_options("hf:clip", {"confg": {}})
    check_options("timm:vit_tiny_patch16_224", {"weights": "x", "drop_path_rate": 0.1})  # timm's own kwargs pass here
    check_options("no-such-encoder", {"anything": 1})  # unknown names are create_encoder's to report


def test_check_options_imports_no_model_library():
    code = ("import sys, encoders\n"
            "for name in ('timm:vit_tiny_patch16_224', 'open_clip:ViT-B-32', 'hf:clip', 'hf_audio:whisper'):\n"
            "    encoders.check_options(name, {'layer': -2})\n"
            "loaded = [m for m in ('timm', 'open_clip', 'transformers') if m in sys.modules]\n"
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_timm_model_argument_it_does_not_take_is_named():
    with pytest.raises(UnknownOptionError, match=r"timm:vit_tiny_patch16_224 does not take the option 'bogus'"):
        create_encoder("timm:vit_tiny_patch16_224", random_init=True, bogus=1)


def test_recipe_validation_refuses_an_unknown_encoder_option(tmp_path):
    from mmdomain.recipe import RecipeError, load_recipe, validate_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  encoder: {name: tiny-vit}\n  llm: {path: /models/x}\ndata: {train: 's/*.tar'}\n"
                      "optim: {max_steps: 10}\noutput_dir: runs/x\n")
    load_recipe(recipe)
    with pytest.raises(RecipeError, match=r"model\.encoder: .*encoder 'tiny-vit' has no option 'bogus'"):
        load_recipe(recipe, ["model.encoder.options.bogus=1"])
    with pytest.raises(RecipeError, match=r"no option 'layr'\. Did you mean 'layer'\?"):
        validate_recipe({"model": {"encoder": {"name": "hf:clip", "options": {"layr": -2}}, "llm": {"path": "p"}},
                         "data": {"train": "s"}, "optim": {"max_steps": 1}, "output_dir": "o"})


# -- random init only when asked ------------------------------------------------------------------------------------


def test_bare_open_clip_architecture_is_refused_unless_random_init():
    with pytest.raises(RandomInitError, match=r"open_clip:ViT-B-32 would start from random weights.*random_init: true"):
        create_encoder("open_clip:ViT-B-32")
    enc = create_encoder("open_clip:ViT-B-32", random_init=True, vision_cfg=TINY_OPEN_CLIP)
    assert enc.info.weights is None and enc.info.num_tokens() == 16


def test_timm_and_hf_model_types_without_weights_are_refused():
    with pytest.raises(RandomInitError, match=r"timm:vit_tiny_patch16_224 would start from random weights: no weights= was given"):
        create_encoder("timm:vit_tiny_patch16_224")
    with pytest.raises(RandomInitError, match=r"hf:siglip would start from random weights"):
        create_encoder("hf:siglip", config=TINY_HF)
    with pytest.raises(RandomInitError, match=r"hf_audio:whisper would start from random weights"):
        create_encoder("hf_audio:whisper")
    with pytest.raises(EncoderOptionError, match="random_init=True and weights were both given"):
        create_encoder("timm:vit_tiny_patch16_224", random_init=True, weights="/models/vit.safetensors")
    assert create_encoder("tiny-vit").info.weights is None  # the documented random test encoder needs no flag


def test_encoder_info_records_where_weights_came_from(tmp_path, vit_tiny_state):
    save_file(vit_tiny_state, str(tmp_path / "vit.safetensors"))
    enc = create_encoder("timm:vit_tiny_patch16_224", weights=str(tmp_path / "vit.safetensors"), layer=-2)
    assert enc.info.weights == str(tmp_path / "vit.safetensors")
    assert json.loads(json.dumps(enc.info.to_dict()))["weights"] == str(tmp_path / "vit.safetensors")
    # timm's pretrained config says apache-2.0 for its own release of these weights; the file is the user's, whose
    # licence only the user can state.
    assert enc.info.license == "unknown"
    declared = create_encoder("timm:vit_tiny_patch16_224", weights=str(tmp_path / "vit.safetensors"), license="cc-by-nc-4.0")
    assert declared.info.license == "cc-by-nc-4.0"
    assert create_encoder("timm:vit_tiny_patch16_224", random_init=True).info.license == "n/a (random init)"


def test_check_encoder_refuses_what_create_would_without_building(tmp_path, vit_tiny_state):
    from encoders import EncoderError, check_encoder

    save_file(vit_tiny_state, str(tmp_path / "vit.safetensors"))
    check_encoder("timm:vit_tiny_patch16_224", {"weights": str(tmp_path / "vit.safetensors")})
    check_encoder("hf:siglip", {"random_init": True})
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    for name, options, message in [
        ("timm:vit_tiny_patch16_224", {"weights": str(tmp_path / "none.safetensors")}, "does not exist"),
        ("timm:vit_tiny_patch16_224", {"weights": str(tmp_path / "broken.safetensors")}, "broken.safetensors"),
        ("timm:vit_tiny_patch16_224", {}, "random weights"),
        ("hf:siglip", {}, "random weights"),
        (f"hf:{tmp_path / 'missing'}", {}, "does not exist"),
        (f"hf_audio:{tmp_path / 'missing'}", {}, "does not exist"),
        (f"open_clip:{tmp_path / 'missing'}", {}, "does not exist"),
        ("open_clip:ViT-B-32", {}, "random weights"),
        ("tiny-vit", {"imagesize": 3}, "Did you mean 'image_size'"),
        ("nope", {}, "unknown encoder"),
    ]:
        with pytest.raises(EncoderError, match=message):
            check_encoder(name, options)


# -- timm weights files ---------------------------------------------------------------------------------------------


def test_timm_pickle_with_a_non_tensor_object_is_refused_naming_the_file(tmp_path, vit_tiny_state):
    path = tmp_path / "vit.pth"
    torch.save({"state_dict": vit_tiny_state, "extra": NotATensor()}, str(path))
    with pytest.raises(WeightsFileError) as caught:
        create_encoder("timm:vit_tiny_patch16_224", weights=str(path))
    message = str(caught.value)
    assert str(path) in message and "NotATensor" in message and "safetensors" in message
    assert "Weights only load failed" not in message  # torch's long text is summarised, not pasted


def test_timm_truncated_safetensors_is_named(tmp_path, vit_tiny_state):
    path = tmp_path / "vit.safetensors"
    save_file(vit_tiny_state, str(path))
    _truncate(path)
    with pytest.raises(WeightsFileError, match=r"vit\.safetensors' is not a complete safetensors file .*download it again"):
        create_encoder("timm:vit_tiny_patch16_224", weights=str(path))


def test_timm_weights_of_another_architecture_are_refused(tmp_path, vit_tiny_state):
    # timm loads non-strictly when the classifier is dropped, so these used to leave the ViT silently random.
    other = tmp_path / "resnet.safetensors"
    save_file({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}, str(other))
    with pytest.raises(WeightsMismatchError, match=r"resnet\.safetensors' does not fit the architecture: \d+ weights missing \(first: "):
        create_encoder("timm:vit_tiny_patch16_224", weights=str(other))
    reshaped = tmp_path / "reshaped.safetensors"
    save_file(dict(vit_tiny_state, **{"blocks.0.mlp.fc1.weight": torch.zeros(10, 192)}), str(reshaped))
    with pytest.raises(WeightsMismatchError, match=r"1 of another shape \(first: blocks\.0\.mlp\.fc1\.weight: file \[10, 192\], model \[768, 192\]\)"):
        create_encoder("timm:vit_tiny_patch16_224", weights=str(reshaped))


def test_timm_checkpoint_may_lack_what_the_selected_layer_prunes(tmp_path, vit_tiny_state):
    head_less = {k: v for k, v in vit_tiny_state.items() if not k.startswith(("blocks.11.", "norm."))}
    save_file(head_less, str(tmp_path / "vit.safetensors"))
    enc = create_encoder("timm:vit_tiny_patch16_224", weights=str(tmp_path / "vit.safetensors"), layer=-2)
    assert len(enc.model.blocks) == 11
    with pytest.raises(WeightsMismatchError, match=r"weights missing \(first: blocks\.11\."):
        create_encoder("timm:vit_tiny_patch16_224", weights=str(tmp_path / "vit.safetensors"), layer=-1)


# -- open_clip weights ----------------------------------------------------------------------------------------------


def _open_clip_dir(tmp_path):
    from open_clip import get_model_config
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    cfg = get_model_config("ViT-B-16")
    cfg["vision_cfg"].update(TINY_OPEN_CLIP)
    directory = tmp_path / "clip"
    directory.mkdir()
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    tower = _build_vision_tower(cfg["embed_dim"], CLIPVisionCfg(**cfg["vision_cfg"]))
    state = {f"visual.{k}": v.contiguous() for k, v in tower.state_dict().items()}
    return directory, state


def test_open_clip_truncated_or_mismatched_weights_are_named(tmp_path):
    directory, state = _open_clip_dir(tmp_path)
    weights = directory / "open_clip_model.safetensors"
    save_file(state, str(weights))
    assert create_encoder(f"open_clip:{directory}").info.weights == str(weights)
    _truncate(weights)
    with pytest.raises(WeightsFileError, match=r"open_clip_model\.safetensors' is not a complete safetensors file"):
        create_encoder(f"open_clip:{directory}")
    save_file(dict(state, **{"visual.proj": torch.zeros(3, 3)}), str(weights))
    with pytest.raises(WeightsMismatchError, match=r"does not fit its visual tower: 1 of another shape \(first: proj: file \[3, 3\]"):
        create_encoder(f"open_clip:{directory}")


# -- transformers directories ---------------------------------------------------------------------------------------


def test_hf_directory_whose_weights_do_not_match_its_config_is_refused(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig

    CLIPVisionModel(CLIPVisionConfig(**TINY_HF)).save_pretrained(str(tmp_path / "clip"))
    assert create_encoder(f"hf:{tmp_path / 'clip'}").info.weights == str(tmp_path / "clip")
    # A SigLIP config.json next to CLIP weights: the keys differ, so the SigLIP tower would be partly random.
    shutil.copytree(tmp_path / "clip", tmp_path / "siglip")
    SiglipVisionConfig(**TINY_HF).save_pretrained(str(tmp_path / "siglip"))
    with pytest.raises(WeightsMismatchError, match=r"the weights in '.*siglip' do not fit its config \(SiglipVisionModel.*"
                                                   r"weights missing \(first: .*config\.json that does not match its weights"):
        create_encoder(f"hf:{tmp_path / 'siglip'}")
    # The same architecture with a block's weights dropped from the file.
    weights = tmp_path / "clip" / "model.safetensors"
    full = load_file(str(weights))
    save_file({k: v for k, v in full.items() if ".layers.0." not in k}, str(weights), metadata={"format": "pt"})
    with pytest.raises(WeightsMismatchError, match=r"16 weights missing \(first: (vision_model\.)?encoder\.layers\.0\."):
        create_encoder(f"hf:{tmp_path / 'clip'}")
    # Dropping only a layer that the selected layer prunes away is fine.
    save_file({k: v for k, v in full.items() if ".layers.2." not in k}, str(weights), metadata={"format": "pt"})
    assert create_encoder(f"hf:{tmp_path / 'clip'}", layer=-2).model.config.num_hidden_layers == 2


def test_hf_directory_with_truncated_weights_names_the_file(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    CLIPVisionModel(CLIPVisionConfig(**TINY_HF)).save_pretrained(str(tmp_path / "clip"))
    _truncate(tmp_path / "clip" / "model.safetensors")
    with pytest.raises(WeightsFileError, match=r"model directory '.*clip': weights file '.*model\.safetensors' is not a complete safetensors file"):
        create_encoder(f"hf:{tmp_path / 'clip'}")


def test_clap_needs_only_the_audio_towers_weights(tmp_path):
    from transformers import ClapConfig, ClapModel

    from .test_domain_audio import CLAP_AUDIO

    ClapModel(ClapConfig(audio_config=CLAP_AUDIO, projection_dim=16,
                         text_config=dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=64, max_position_embeddings=64))).save_pretrained(str(tmp_path / "clap"))
    weights = tmp_path / "clap" / "model.safetensors"
    full = load_file(str(weights))
    save_file({k: v for k, v in full.items() if not k.startswith("text_")}, str(weights), metadata={"format": "pt"})
    assert create_encoder(f"hf_audio:{tmp_path / 'clap'}").info.weights == str(tmp_path / "clap")  # no text tower: fine
    save_file({k: v for k, v in full.items() if "patch_embed" not in k}, str(weights), metadata={"format": "pt"})
    with pytest.raises(WeightsMismatchError, match=r"weights missing \(first: audio_model\.audio_encoder\.patch_embed"):
        create_encoder(f"hf_audio:{tmp_path / 'clap'}")


# -- LLM directories ------------------------------------------------------------------------------------------------


def _llm_copy(tiny_llm_dir, tmp_path):
    directory = tmp_path / "llm"
    shutil.copytree(tiny_llm_dir, directory)
    return directory


def test_llm_folder_with_a_malicious_pickle_is_refused_naming_the_directory(tmp_path, tiny_llm_dir):
    from mmdomain.errors import ModelLoadError
    from mmdomain.llm import load_llm
    from mmdomain.spec import LLMSpec

    directory = _llm_copy(tiny_llm_dir, tmp_path)
    (directory / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": os.system}, str(directory / "pytorch_model.bin"))  # would run code if unpickled
    with pytest.raises(ModelLoadError) as caught:
        load_llm(LLMSpec(path=str(directory)))
    message = str(caught.value)
    assert f"LLM directory {str(directory)!r}" in message and str(directory / "pytorch_model.bin") in message
    assert "system" in message and "safetensors" in message and "Weights only load failed" not in message


def test_llm_folder_with_truncated_safetensors_names_the_file(tmp_path, tiny_llm_dir):
    from mmdomain.errors import ModelLoadError
    from mmdomain.llm import load_llm
    from mmdomain.spec import LLMSpec

    directory = _llm_copy(tiny_llm_dir, tmp_path)
    _truncate(directory / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"LLM directory '.*llm' cannot be loaded: weights file '.*model\.safetensors' "
                                             r"is not a complete safetensors file"):
        load_llm(LLMSpec(path=str(directory)))
