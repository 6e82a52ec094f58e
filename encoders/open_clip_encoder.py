"""Adapter for open_clip visual towers (``open_clip:<model name>`` or ``open_clip:<local dir>``)."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._checkpoint import describe_key_mismatch, existing_weights_file, read_state_dict
from .base import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, EncoderInfo, as_pair, check_random_init, declared_license, fit_channels, layers_refused,
                   random_init_refused, resolve_layer)
from .errors import EncoderNotFoundError, UnknownEncoderError, WeightsMismatchError

_WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors", "pytorch_model.bin")


class OpenClipEncoder(nn.Module):
    """Only the visual tower of an open_clip model (the text tower is never built), pruned after the chosen layer."""

    def __init__(self, visual: nn.Module, info: EncoderInfo, block_index: int, is_last: bool, keep_cls: bool) -> None:
        super().__init__()
        self.visual = visual
        self.info = info
        self._block_index = block_index
        self._is_last = is_last
        self._keep_cls = keep_cls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.visual.forward_intermediates(
            x, indices=[self._block_index], stop_early=True, normalize_intermediates=self._is_last,
            intermediates_only=True, output_fmt="NCHW", output_extra_tokens=self._keep_cls,
        )
        tokens = out["image_intermediates"][0].flatten(2).transpose(1, 2)
        prefix = out.get("image_intermediates_prefix")
        if self._keep_cls and prefix is not None:
            tokens = torch.cat([prefix[0], tokens], dim=1)
        return tokens

    def layer_blocks(self) -> list[nn.Module]:
        """The residual blocks ``forward`` runs, input to output (a timm trunk's units as its feature_info names them)."""
        trunk = getattr(self.visual, "trunk", None)
        if trunk is not None:
            return [trunk.get_submodule(f["module"]) for f in list(trunk.feature_info)[: self._block_index + 1]]
        return list(self.visual.transformer.resblocks)[: self._block_index + 1]

    def output_norm(self) -> nn.Module | None:
        if not self._is_last:
            return None
        trunk = getattr(self.visual, "trunk", None)
        norm = getattr(trunk, "norm", None) if trunk is not None else getattr(self.visual, "ln_post", None)
        return norm if isinstance(norm, nn.Module) and any(True for _ in norm.parameters()) else None


def _model_config(spec: str) -> tuple[dict[str, Any], dict[str, Any], Path | None]:
    """(model_cfg, preprocess_cfg, weights path or None) from a model name or a local open_clip directory."""
    path = Path(spec).expanduser()
    if path.is_dir():
        config_file = path / "open_clip_config.json"
        if not config_file.is_file():
            raise EncoderNotFoundError(f"{str(path)!r} has no open_clip_config.json; an open_clip model directory needs it")
        config = json.loads(config_file.read_text())
        weights = next((path / n for n in _WEIGHT_NAMES if (path / n).is_file()), None)
        if weights is None:
            raise EncoderNotFoundError(f"{str(path)!r} holds no weights file (looked for {', '.join(_WEIGHT_NAMES)})")
        return config["model_cfg"], config.get("preprocess_cfg", {}), weights
    if "/" in spec or spec.startswith((".", "~")):
        raise EncoderNotFoundError(
            f"open_clip model directory {spec!r} does not exist. mmdomain never downloads (hf-hub ids included): "
            "download the model yourself, e.g. `huggingface-cli download <repo> --local-dir DIR`, and pass DIR"
        )
    import open_clip

    cfg = open_clip.get_model_config(spec)
    if cfg is None:
        import difflib

        near = difflib.get_close_matches(spec, open_clip.list_models(), n=3)
        raise UnknownEncoderError(f"open_clip has no model {spec!r}" + (f"; did you mean {', '.join(near)}?" if near else ""))
    return copy.deepcopy(cfg), dict(cfg.get("preprocess_cfg", {})), None


def locate_open_clip(spec: str, *, weights: str | None = None, random_init: bool = False, layers: Any = None,
                     **_: Any) -> tuple[dict[str, Any], dict[str, Any], Path | None]:
    """(model config, preprocess config, weights file or None for a random tower) of ``open_clip:<spec>``, or the
    EncoderError building it would raise; reads configs only, so a recipe's encoder can be checked before it loads."""
    layers_refused(f"open_clip:{spec}", layers)
    model_cfg, preprocess_cfg, found = _model_config(spec)
    source = f"open_clip:{spec}"
    check_random_init(source, random_init, weights is not None or found is not None)
    if weights is None and found is None and not random_init:
        raise random_init_refused(source, f"{spec!r} is an architecture name and no weights= was given",
                                  "a local directory holding open_clip_config.json and the weights (open_clip:DIR), "
                                  f"or weights=<local checkpoint of {spec}>")
    return model_cfg, preprocess_cfg, (existing_weights_file(weights, "open_clip weights") if weights else found)


def build_open_clip_encoder(
    spec: str,
    *,
    weights: str | None = None,
    random_init: bool = False,
    layer: int = -1,
    layers: Any = None,
    keep_cls: bool = False,
    vision_cfg: dict[str, Any] | None = None,
    license: str | None = None,
) -> OpenClipEncoder:
    """``open_clip:<dir>`` holding ``open_clip_config.json`` and weights (how BiomedCLIP and RemoteCLIP are
    distributed), or ``open_clip:<name>`` with ``weights=`` a local checkpoint, or with ``random_init=True``.

    ``vision_cfg`` overrides fields of the tower's config (e.g. a tiny width for tests).
    """
    model_cfg, preprocess_cfg, weights_path = locate_open_clip(spec, weights=weights, random_init=random_init, layers=layers)
    return build_from_configs(spec, model_cfg, preprocess_cfg, weights_path, layer=layer, keep_cls=keep_cls, vision_cfg=vision_cfg,
                              license=license)


def build_from_configs(spec: str, model_cfg: dict[str, Any], preprocess_cfg: dict[str, Any], weights_path: Path | None, *,
                       layer: int = -1, keep_cls: bool = False, vision_cfg: dict[str, Any] | None = None,
                       license: str | None = None) -> OpenClipEncoder:
    """The visual tower ``model_cfg`` describes, with weights from ``weights_path`` (None: random init, or an
    architecture-only build for planning, see ``encoders.skeleton``)."""
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    source = f"open_clip:{spec}"
    vcfg = dict(model_cfg["vision_cfg"], **(vision_cfg or {}))
    vcfg["timm_model_pretrained"] = False  # a timm trunk must never fetch its own weights
    visual = _build_vision_tower(model_cfg["embed_dim"], CLIPVisionCfg(**{k: v for k, v in vcfg.items() if k in CLIPVisionCfg.__dataclass_fields__}), quick_gelu=model_cfg.get("quick_gelu", False))

    if weights_path is not None:
        state = read_state_dict(weights_path)
        if any(k.startswith("visual.") for k in state):
            state = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
        try:
            missing, _ = visual.load_state_dict(state, strict=False)  # keys of the text tower are expected extras
        except RuntimeError as exc:  # torch raises on weights of another shape even when not strict
            mismatch = describe_key_mismatch(load_error=str(exc))
        else:
            mismatch = describe_key_mismatch(missing)
        if mismatch:
            raise WeightsMismatchError(
                f"{source}: weights file {str(weights_path)!r} does not fit its visual tower: {mismatch}. Check that it "
                f"is a checkpoint of {'the model its open_clip_config.json describes' if Path(spec).expanduser().is_dir() else spec} (a config and "
                "weights from the same download, or the open_clip model name it was trained as)"
            )

    timm_trunk = getattr(visual, "trunk", None)
    if timm_trunk is not None:
        num_layers = len(timm_trunk.feature_info)
        patch = as_pair(timm_trunk.patch_embed.patch_size) if hasattr(timm_trunk, "patch_embed") else as_pair(timm_trunk.feature_info[-1]["reduction"])
        num_prefix = int(getattr(timm_trunk, "num_prefix_tokens", 0) or 0)
    else:
        num_layers = len(visual.transformer.resblocks)
        patch = as_pair(visual.patch_size)
        num_prefix = 1  # open_clip's VisionTransformer always carries a class token
    block_index, is_last = resolve_layer(layer, num_layers, f"open_clip:{spec}")
    if timm_trunk is not None:
        timm_trunk.prune_intermediate_layers([block_index], prune_norm=not is_last, prune_head=True)
        embed_dim = int(timm_trunk.feature_info[block_index]["num_chs"])
    else:
        visual.prune_intermediate_layers([block_index], prune_norm=not is_last, prune_head=True)
        embed_dim = int(visual.transformer.width)

    mean = preprocess_cfg.get("mean") or vcfg.get("image_mean") or OPENAI_CLIP_MEAN
    std = preprocess_cfg.get("std") or vcfg.get("image_std") or OPENAI_CLIP_STD
    info = EncoderInfo(
        modality="image",
        embed_dim=embed_dim,
        input_size=as_pair(vcfg.get("image_size", 224)),
        patch_size=patch,
        channels=3,
        mean=fit_channels(tuple(mean), 3),
        std=fit_channels(tuple(std), 3),
        source=f"open_clip:{spec}",
        license=declared_license(license, weights_path is not None),
        layer=layer,
        num_prefix_tokens=num_prefix if keep_cls else 0,
        weights=str(weights_path) if weights_path is not None else None,
    )
    return OpenClipEncoder(visual, info, block_index, is_last, keep_cls)
