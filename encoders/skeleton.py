"""An encoder's architecture built from its configuration files alone (no weight file is opened), for planning.

``create_skeleton(name, **options)`` takes the same name and options as ``create_encoder`` and returns the same
module class with the same parameters (names, shapes, dtypes, the layers after ``layer`` pruned alike) and the same
``EncoderInfo`` token counts, but randomly initialised from configs: ``config.json`` / ``preprocessor_config.json``
of an ``hf:`` / ``hf_audio:`` directory, ``open_clip_config.json`` of an ``open_clip:`` directory, timm's own
architecture table. Called under ``accelerate.init_empty_weights()`` its parameters take no memory, so a 6B tower
costs nothing.
A directory needs only those config files: a plan works before the weights are downloaded.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .errors import EncoderNotFoundError


def _config(directory: Path, name: str) -> dict[str, Any]:
    file = directory / name
    if not file.is_file():
        raise EncoderNotFoundError(f"{str(directory)!r} has no {name}; a plan reads the encoder's architecture from it (the "
                                   "weights are not needed)")
    return json.loads(file.read_text())


def _hf(spec: str, options: dict[str, Any], vision: bool) -> tuple[str, dict[str, Any]]:
    path = Path(spec).expanduser()
    if not path.is_dir():
        return spec, options  # a model type with random_init and config= already builds from config alone
    config = _config(path, "config.json")
    model_type = config.get("model_type", "")
    if vision and isinstance(config.get("vision_config"), dict):  # a full CLIP / SigLIP checkpoint: its vision half
        config = config["vision_config"]
        model_type = config.get("model_type") or f"{model_type}_vision_model"
    config = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "transformers_version")}
    return model_type, {**options, "random_init": True, "config": {**config, **(options.get("config") or {})}}


def _preprocessed_size(directory: Path) -> Any:
    """The input size ``hf_vision`` reads from preprocessor_config.json (it may differ from config.json's)."""
    file = directory / "preprocessor_config.json"
    if not file.is_file():
        return None
    pre = json.loads(file.read_text())
    size = pre.get("crop_size") or pre.get("size")
    if isinstance(size, dict):
        size = (size["height"], size["width"]) if "height" in size else size.get("shortest_edge")
    return size


def create_skeleton(name: str, **options: Any) -> Any:
    """The encoder ``create_encoder(name, **options)`` would build, from configs only (random weights)."""
    import dataclasses

    from . import create_encoder
    from .base import as_pair

    family, _, spec = name.partition(":")
    options = dict(options)
    if name == "fuse":
        from .fused import _parts_of, fuse_parts

        parts = [create_skeleton(part, **part_options) for part, part_options in _parts_of(options.pop("encoders", None))]
        return fuse_parts(parts, **options)
    if family == "timm":
        options.pop("weights", None)
        return create_encoder(name, **{**options, "random_init": True})
    if family == "open_clip":
        from .open_clip_encoder import build_from_configs

        path = Path(spec).expanduser()
        if not path.is_dir():
            options.pop("weights", None)
            return create_encoder(name, **{**options, "random_init": True})
        config = _config(path, "open_clip_config.json")
        options.pop("layers", None)
        return build_from_configs(spec, config["model_cfg"], config.get("preprocess_cfg", {}), None, **options)
    if family in ("hf", "hf_audio"):
        model_type, rewritten = _hf(spec, options, vision=family == "hf")
        quiet = logging.getLogger("encoders.hf_audio")  # its random-init warning is about training a random tower
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            encoder = create_encoder(f"{family}:{model_type}", **rewritten)
        finally:
            quiet.setLevel(level)
        path = Path(spec).expanduser()
        if path.is_dir():
            updates: dict[str, Any] = {"source": name, "weights": str(path)}
            size = _preprocessed_size(path) if family == "hf" else None
            if size is not None:
                updates["input_size"] = as_pair(size)
            if family == "hf_audio" and (path / "preprocessor_config.json").is_file():
                updates["sample_rate"] = int(json.loads((path / "preprocessor_config.json").read_text()).get("sampling_rate", 16000))
            encoder.info = dataclasses.replace(encoder.info, **updates)
        return encoder
    return create_encoder(name, **options)  # tiny-vit, tiny-audio, registered encoders: no weight files to avoid

