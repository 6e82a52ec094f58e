"""Adapter for transformers vision towers (``hf:<local dir>`` or ``hf:<model type>`` with ``config=``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._hf_loading import known_model_type, load_pruned
from .base import (HALF, IMAGENET_MEAN, IMAGENET_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, EncoderInfo, as_pair, check_random_init,
                   declared_license, fit_channels, random_init_refused, resolve_layers)
from .errors import EncoderNotFoundError

# model_type -> (transformers class name, default mean, default std, prefix tokens before the patches)
_KNOWN = {
    "clip": ("CLIPVisionModel", OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, 1),
    "clip_vision_model": ("CLIPVisionModel", OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, 1),
    "siglip": ("SiglipVisionModel", HALF, HALF, 0),
    "siglip_vision_model": ("SiglipVisionModel", HALF, HALF, 0),
    "dinov2": ("Dinov2Model", IMAGENET_MEAN, IMAGENET_STD, 1),
    "dinov2_with_registers": ("Dinov2WithRegistersModel", IMAGENET_MEAN, IMAGENET_STD, 1),
    "vit": ("ViTModel", HALF, HALF, 1),
}
_ALIASES = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}


class HFVisionEncoder(nn.Module):
    """A transformers vision model built with only the layers up to the selected one."""

    def __init__(self, model: nn.Module, info: EncoderInfo, is_last: bool, num_prefix: int, keep_cls: bool, taps: list[int]) -> None:
        super().__init__()
        self.model = model
        self.info = info
        self._is_last = is_last
        self._num_prefix = num_prefix
        self._keep_cls = keep_cls
        self._taps = taps  # blocks whose outputs are returned, concatenated on the channel axis (multi-layer fusion)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._is_last and len(self._taps) == 1:
            hidden = self.model(pixel_values=x).last_hidden_state
        else:
            # The model was built with the deepest selected layer as its last, but some towers (SigLIP, DINOv2) apply
            # a final norm to last_hidden_state; a raw block output is hidden_states[block + 1] (0 is the embedding).
            out = self.model(pixel_values=x, output_hidden_states=True)
            deepest = max(self._taps)
            parts = [out.last_hidden_state if self._is_last and tap == deepest else out.hidden_states[tap + 1] for tap in self._taps]
            hidden = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
        return hidden if self._keep_cls else hidden[:, self._num_prefix :]

    def _tower(self) -> nn.Module:
        return getattr(self.model, "vision_model", self.model)  # CLIP and SigLIP keep theirs one level down

    def layer_blocks(self) -> list[nn.Module]:
        """The transformer layers ``forward`` runs, input to output (``encoder.layers`` or ``encoder.layer``)."""
        encoder = self._tower().encoder
        return list(getattr(encoder, "layers", None) or encoder.layer)

    def output_norm(self) -> nn.Module | None:
        if not self._is_last or self.model.config.model_type.startswith("clip"):
            return None  # a layer before the last takes the raw block output; CLIP's post_layernorm only normalises the pooled CLS
        tower = self._tower()
        for name in ("post_layernorm", "layernorm"):
            if isinstance(getattr(tower, name, None), nn.Module):
                return getattr(tower, name)
        return None


def _vision_config(config: Any) -> Any:
    return getattr(config, "vision_config", None) or config


def locate_hf_vision(spec: str, *, random_init: bool = False, **_: Any) -> tuple[Path | None, str]:
    """(local directory or None, model type) for ``hf:<spec>``, or the EncoderError building it would raise; reads
    only config.json, so a recipe's encoder can be checked before anything loads."""
    path = Path(spec).expanduser()
    source = f"hf:{spec}"
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise EncoderNotFoundError(f"{str(path)!r} has no config.json; it is not a transformers model directory")
        check_random_init(source, random_init, True)
        return path, json.loads(cfg_file.read_text()).get("model_type", "")
    if "/" in spec or spec.startswith((".", "~")):
        raise EncoderNotFoundError(
            f"transformers model directory {spec!r} does not exist. mmdomain never downloads (hub ids included): "
            "download it yourself, e.g. `huggingface-cli download <repo> --local-dir DIR`, and pass hf:DIR"
        )
    model_type = known_model_type(_ALIASES.get(spec, spec), source, "hf:DIR")
    if not random_init:
        raise random_init_refused(source, f"{spec!r} is not a local directory, so it names a model type (here "
                                  f"{model_type!r}) whose tower would be built from config alone",
                                  "the local model directory, hf:DIR (e.g. from `huggingface-cli download <repo> --local-dir DIR`)")
    return None, model_type


def build_hf_vision_encoder(
    spec: str,
    *,
    config: dict[str, Any] | None = None,
    random_init: bool = False,
    layer: int = -1,
    layers: list[int] | None = None,
    keep_cls: bool = False,
    license: str | None = None,
) -> HFVisionEncoder:
    """``hf:/path/to/dir`` loads a local model (a full CLIP/SigLIP checkpoint works: its vision half is taken);
    ``hf:clip`` / ``hf:siglip`` / ``hf:dinov2`` / ``hf:<model_type>`` with ``random_init=True`` and ``config={...}``
    builds a random-init tower. ``layers: [-1, -5]`` returns those hidden states concatenated on the channel axis.
    """
    import transformers

    found, model_type = locate_hf_vision(spec, random_init=random_init)
    local = found is not None
    path = found or Path(spec)
    class_name, mean, std, num_prefix = _KNOWN.get(model_type, ("AutoModel", IMAGENET_MEAN, IMAGENET_STD, 1))
    model_class = getattr(transformers, class_name)

    if local:
        cfg = model_class.config_class.from_pretrained(str(path), local_files_only=True) if class_name != "AutoModel" else transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    else:
        cfg = transformers.AutoConfig.for_model(model_type, **(config or {}))
    cfg = _vision_config(cfg)
    num_layers = int(cfg.num_hidden_layers)
    taps, deepest = resolve_layers(layer, layers, num_layers, f"hf:{spec}")
    is_last = max(taps) == num_layers - 1
    # Build the tower with exactly the layers we use: later layers are neither computed nor held in memory.
    cfg.num_hidden_layers = max(taps) + 1
    if hasattr(cfg, "vision_use_head"):
        cfg.vision_use_head = False  # SigLIP's attention-pooling head is never used for token features
    num_prefix += int(getattr(cfg, "num_register_tokens", 0) or 0)

    if local:
        model = load_pruned(model_class, path, cfg)
        mean, std, size = _preprocessor_stats(path, mean, std)
    else:
        model = model_class(cfg) if class_name != "AutoModel" else transformers.AutoModel.from_config(cfg)
        size = None
    model.eval()

    image_size = as_pair(size or cfg.image_size)
    channels = int(getattr(cfg, "num_channels", 3))
    info = EncoderInfo(
        modality="image",
        embed_dim=int(cfg.hidden_size) * len(taps),
        input_size=image_size,
        patch_size=as_pair(cfg.patch_size),
        channels=channels,
        mean=fit_channels(tuple(mean), channels),
        std=fit_channels(tuple(std), channels),
        source=f"hf:{spec}",
        license=declared_license(license, local),
        layer=deepest,
        layers=tuple(layers) if layers is not None else None,
        num_prefix_tokens=num_prefix if keep_cls else 0,
        weights=str(path) if local else None,
    )
    return HFVisionEncoder(model, info, is_last, num_prefix, keep_cls, taps)


def _preprocessor_stats(path: Path, mean: tuple, std: tuple) -> tuple[tuple, tuple, Any]:
    file = path / "preprocessor_config.json"
    if not file.is_file():
        return mean, std, None
    pre = json.loads(file.read_text())
    size = pre.get("crop_size") or pre.get("size")
    if isinstance(size, dict):
        size = (size["height"], size["width"]) if "height" in size else size.get("shortest_edge")
    return tuple(pre.get("image_mean", mean)), tuple(pre.get("image_std", std)), size
