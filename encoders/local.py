"""``local:<dir>``: an encoder saved as a folder (``save_local``), e.g. a domain-tuned tower exported by a training run.

The folder holds ``encoder.json`` (how to rebuild the architecture without weights: a registry name and options; the
``EncoderInfo`` the preprocessing derives from) and ``encoder.safetensors`` (every weight, strictly loaded back). Where
the source library can read it directly, the folder also holds a file in that library's own format: a timm
checkpoint (``timm_model.safetensors``, the whole tower with the tuned blocks in place) when the encoder came from a
timm weights file; a transformers folder (``transformers/``) for an ``hf:`` vision tower; an open_clip folder
(``open_clip/``: its config and the whole model, text tower included, with the tuned visual weights in place) for an
``open_clip:`` tower that came from local weights, which ``local:`` itself rebuilds from. Nothing here is pickled.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._checkpoint import read_state_dict
from .base import EncoderInfo
from .errors import EncoderNotFoundError, EncoderOptionError, WeightsMismatchError

FORMAT = "encoders-local/1"
CONFIG = "encoder.json"
WEIGHTS = "encoder.safetensors"
TIMM_WEIGHTS = "timm_model.safetensors"
TRANSFORMERS = "transformers"
OPEN_CLIP = "open_clip"
_TUPLES = ("input_size", "patch_size", "mean", "std", "layers")


class SaveError(EncoderOptionError):
    """An encoder that ``save_local`` cannot write so that ``local:`` rebuilds it exactly; the message says why."""


def _hf_rebuild(encoder: nn.Module, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A random-init ``hf:<model type>`` spec that builds the same pruned tower: layers as positive hidden-state
    indices, and a depth for which the deepest of them is (or is not) the tower's last, as in the source."""
    config = encoder.model.config.to_dict()
    built = int(config["num_hidden_layers"])
    for key in ("model_type", "transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype"):
        config.pop(key, None)
    config["num_hidden_layers"] = built if encoder._is_last else built + 1
    taps = [tap + 1 for tap in encoder._taps]
    rebuilt = {"random_init": True, "config": config, "keep_cls": encoder._keep_cls}
    rebuilt.update({"layer": taps[0]} if len(taps) == 1 else {"layers": taps})
    return f"hf:{encoder.model.config.model_type}", rebuilt


def rebuild_spec(encoder: nn.Module, name: str, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(registry name, options) that build ``encoder``'s architecture with random weights (its weights are loaded after)."""
    family = name.partition(":")[0]
    kind = type(encoder).__name__
    if kind == "HFVisionEncoder":
        return _hf_rebuild(encoder, options)
    if kind == "TimmEncoder":
        return name, {**{k: v for k, v in options.items() if k not in ("weights", "license")}, "random_init": True}
    if name in ("tiny-vit", "tiny-audio"):
        return name, dict(options)
    if kind == "OpenClipEncoder" and not (Path(name.partition(":")[2]).expanduser().is_dir() or options.get("weights")):
        return name, {**{k: v for k, v in options.items() if k not in ("weights", "license")}, "random_init": True}
    if kind == "OpenClipEncoder":  # rebuilt from the open_clip folder save_local writes beside it (see _save_open_clip)
        return "open_clip:", {k: v for k, v in options.items() if k in ("layer", "keep_cls")}
    raise SaveError(f"encoder {name} ({kind}) cannot be saved as a local: folder yet; supported: hf: vision towers (CLIP, SigLIP, "
                    f"DINOv2, ...), timm:, open_clip:<model name>, tiny-vit, tiny-audio (not {family or name})")


def _timm_kwargs(options: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``timm.create_model`` that build the tower ``timm:<arch>`` with ``options`` built."""
    kwargs = {k: v for k, v in options.items() if k not in ("weights", "random_init", "layer", "layers", "keep_cls", "license", "image_size")}
    if options.get("image_size") is not None:
        size = options["image_size"]
        kwargs["img_size"] = [size, size] if isinstance(size, int) else list(size)
    return kwargs


def save_local(encoder: nn.Module, name: str, options: dict[str, Any], directory: str | Path) -> dict[str, Any]:
    """Write ``encoder`` (built by ``create_encoder(name, **options)``, possibly tuned since) into ``directory`` so that
    ``create_encoder("local:<directory>")`` gives the same features. Returns what encoder.json holds."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rebuild_name, rebuild_options = rebuild_spec(encoder, name, options)
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()}
    save_file(state, str(directory / WEIGHTS), metadata={"format": "pt"})
    files = {"weights": WEIGHTS}
    direct = None
    if type(encoder).__name__ == "TimmEncoder" and options.get("weights"):
        # The whole tower as timm reads it: the source file's weights with the tuned (and kept) ones in place; blocks
        # that mmdomain pruned after the selected layer come from the source file unchanged.
        full = read_state_dict(options["weights"])
        full.update({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
        save_file({k: v.contiguous() for k, v in full.items()}, str(directory / TIMM_WEIGHTS), metadata={"format": "pt"})
        files["timm"] = TIMM_WEIGHTS
        direct = {"library": "timm", "arch": name.partition(":")[2], "file": TIMM_WEIGHTS, "block_index": encoder._block_index,
                  "norm": encoder._is_last, "keep_cls": encoder._keep_cls,
                  "create_model": _timm_kwargs(options)}
    if type(encoder).__name__ == "HFVisionEncoder":
        # The tower as transformers reads it (built up to the selected layer), with its preprocessing facts.
        encoder.model.save_pretrained(str(directory / TRANSFORMERS))
        files["transformers"] = TRANSFORMERS
        direct = {"library": "transformers", "folder": TRANSFORMERS, "class": type(encoder.model).__name__,
                  "hidden_states": [tap + 1 for tap in encoder._taps],
                  "last_hidden_state": bool(encoder._is_last),  # the deepest layer is read after the tower's final norm, if any
                  "drop_prefix": 0 if encoder._keep_cls else encoder._num_prefix}
    folder = None
    if type(encoder).__name__ == "OpenClipEncoder" and rebuild_name == "open_clip:":
        direct = _save_open_clip(encoder, name, options, state, directory / OPEN_CLIP)
        files["open_clip"] = folder = OPEN_CLIP
    config = {"format": FORMAT, "name": rebuild_name, "folder": folder, "options": rebuild_options, "source": name, "info": encoder.info.to_dict(),
              "preprocessing": {"size": list(encoder.info.input_size), "mean": list(encoder.info.mean), "std": list(encoder.info.std),
                                "channels": encoder.info.channels, "resize": "squash (bicubic, antialiased)", "scale": "integer images / dtype max"},
              "files": files, "direct": direct}
    (directory / CONFIG).write_text(json.dumps(config, indent=2, default=list) + "\n")
    return config


def _save_open_clip(encoder: nn.Module, name: str, options: dict[str, Any], state: dict[str, torch.Tensor], folder: Path) -> dict[str, Any]:
    """An open_clip model folder (``open_clip_config.json`` + ``open_clip_model.safetensors``) that open_clip loads
    with ``local-dir:``: the source's config (with the ``vision_cfg`` options baked in) and the source's full weights,
    text tower and pruned later blocks included, with the tuned visual weights in place."""
    from safetensors.torch import save_file

    from .open_clip_encoder import locate_open_clip

    model_cfg, preprocess_cfg, weights = locate_open_clip(name.partition(":")[2], weights=options.get("weights"))
    model_cfg = dict(model_cfg, vision_cfg=dict(model_cfg["vision_cfg"], **(options.get("vision_cfg") or {})))
    full = read_state_dict(weights)
    if not any(k.startswith("visual.") for k in full):  # a visual-only checkpoint
        full = {f"visual.{k}": v for k, v in full.items()}
    full.update({k: v for k, v in state.items() if k.startswith("visual.")})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in full.items()}, str(folder / "open_clip_model.safetensors"), metadata={"format": "pt"})
    return {"library": "open_clip", "folder": OPEN_CLIP, "block_index": encoder._block_index, "norm": encoder._is_last,
            "keep_cls": encoder._keep_cls}


def locate_local(spec: str, **_: Any) -> Path:
    directory = Path(spec).expanduser()
    if not (directory / CONFIG).is_file():
        raise EncoderNotFoundError(f"local:{spec}: {str(directory / CONFIG)!r} does not exist; a local: encoder is a folder written by "
                                   "`mmdomain export RUN --format encoder OUT` (encoders.local.save_local)")
    return directory


def build_local_encoder(spec: str, *, license: str | None = None) -> nn.Module:
    """``local:<dir>``: rebuild the saved architecture (no weights), load every saved weight strictly, restore its info."""
    from . import create_encoder

    directory = locate_local(spec)
    config = json.loads((directory / CONFIG).read_text())
    if config.get("format") != FORMAT:
        raise EncoderNotFoundError(f"local:{spec}: {CONFIG} has format {config.get('format')!r}; this encoders package reads {FORMAT!r}")
    name = config["name"] + str(directory / config["folder"]) if config.get("folder") else config["name"]
    encoder = create_encoder(name, **config["options"])
    state = read_state_dict(directory / config["files"]["weights"])
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsMismatchError(f"local:{spec}: {config['files']['weights']} does not fit the architecture {config['name']} it was saved "
                                   f"with ({str(exc).splitlines()[0]}); the folder was changed after it was written") from None
    saved = dict(config["info"])
    for key in _TUPLES:
        if saved.get(key) is not None:
            saved[key] = tuple(saved[key])
    saved.update(source=f"local:{spec}", weights=str(directory))
    if license:
        saved["license"] = license
    encoder.info = EncoderInfo(**saved)
    encoder.eval()
    return encoder


def timm_features(model: nn.Module, x: torch.Tensor, direct: dict[str, Any]) -> torch.Tensor:
    """The saved encoder's features from a plain timm model built from ``timm_model.safetensors`` (what the README of
    an export shows): ``forward_intermediates`` at the saved block, tokens ``[B, N, D]``."""
    extra = {"return_prefix_tokens": True} if direct["keep_cls"] else {}
    (out,) = model.forward_intermediates(x, indices=[direct["block_index"]], norm=direct["norm"], stop_early=True, output_fmt="NCHW",
                                         intermediates_only=True, **extra)
    prefix = None
    if isinstance(out, tuple):
        out, prefix = out
    tokens = out.flatten(2).transpose(1, 2)
    return torch.cat([prefix, tokens], dim=1) if prefix is not None else tokens


def transformers_features(model: nn.Module, x: torch.Tensor, direct: dict[str, Any]) -> torch.Tensor:
    """The saved encoder's features from the plain transformers model in ``transformers/`` (what an export's README
    shows): the selected hidden states, joined on the channel axis, prefix tokens dropped as saved."""
    out = model(pixel_values=x, output_hidden_states=True)
    deepest = max(direct["hidden_states"])
    parts = [out.last_hidden_state if direct["last_hidden_state"] and index == deepest else out.hidden_states[index]
             for index in direct["hidden_states"]]
    hidden = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
    return hidden[:, direct["drop_prefix"]:]


def open_clip_features(visual: nn.Module, x: torch.Tensor, direct: dict[str, Any]) -> torch.Tensor:
    """The saved encoder's features from ``open_clip.create_model("local-dir:<folder>").visual``."""
    out = visual.forward_intermediates(x, indices=[direct["block_index"]], stop_early=True, normalize_intermediates=direct["norm"],
                                       intermediates_only=True, output_fmt="NCHW", output_extra_tokens=direct["keep_cls"])
    tokens = out["image_intermediates"][0].flatten(2).transpose(1, 2)
    prefix = out.get("image_intermediates_prefix")
    return torch.cat([prefix[0], tokens], dim=1) if direct["keep_cls"] and prefix is not None else tokens
