"""What a frozen base model is, as facts a checkpoint can store and check before any weight loads.

A checkpoint stores only what trained (a connector, LoRA deltas) and *refers* to its frozen LLM and encoders by
path. Paths move and files change, so each base is also recorded by what it is: its config (hashed), its widths,
and a fingerprint of its weight files (their sizes and a sample of their bytes: cheap for a 15 GB LLM, yet any
re-download of other weights or any fine-tune changes it). Comparing identities tells "the same model moved"
(accepted) from "another model" (refused with both named) without building either.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .spec import EncoderSpec, LLMSpec

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_SAMPLES = 16  # chunks read from each weight file for its fingerprint
_CHUNK = 1 << 16


def file_fingerprint(path: Path) -> str:
    """sha256 of the size, the first 64 KiB (a safetensors header names every tensor and shape) and 16 evenly spaced
    64 KiB chunks of a file: changes with any other weights, costs ~1 MB of reading whatever the file's size."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for i in range(_SAMPLES + 1):
            f.seek(0 if i == 0 else (size - _CHUNK) * i // _SAMPLES if size > _CHUNK else 0)
            h.update(f.read(_CHUNK))
    return h.hexdigest()[:24]


def weights_fingerprint(files: list[Path], root: Path | None = None) -> str:
    h = hashlib.sha256()
    for path in sorted(files):
        h.update(str(path.relative_to(root) if root else path.name).encode())
        h.update(file_fingerprint(path).encode())
    return h.hexdigest()[:24]


def _config_facts(config_file: Path) -> dict[str, Any]:
    config = json.loads(config_file.read_text())
    text = config.get("text_config") or {}
    facts = {"config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:24],
             "model_type": config.get("model_type")}
    for key in ("hidden_size", "d_model", "vocab_size", "num_hidden_layers"):
        value = config.get(key, text.get(key))
        if value is not None:
            facts[key] = value
    return facts


def llm_identity(spec: LLMSpec) -> dict[str, Any]:
    """Identity of a local LLM directory (reads its config.json and samples its weight files; loads nothing)."""
    root = Path(spec.path).expanduser()
    identity: dict[str, Any] = {"path": str(root.resolve()) if root.exists() else str(root)}
    if (root / "config.json").is_file():
        identity.update(_config_facts(root / "config.json"))
        weights = [p for p in root.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES]
        identity["weights"] = weights_fingerprint(weights, root) if weights else None
    return identity


def encoder_identity(spec: EncoderSpec) -> dict[str, Any]:
    """Identity of an encoder's local weights: a ``weights=`` file, or a model directory named in ``family:dir``.
    A random-init encoder has no base (its weights travel inside the checkpoint)."""
    identity: dict[str, Any] = {"name": spec.name}
    if spec.fused_parts():
        identity["parts"] = [encoder_identity(part) for part in spec.fused_parts()]
        return identity
    _, sep, rest = spec.name.partition(":")
    directory = Path(rest).expanduser() if sep else None
    if directory is not None and directory.is_dir():
        identity["path"] = str(directory.resolve())
        for config in ("config.json", "open_clip_config.json"):
            if (directory / config).is_file():
                identity.update(_config_facts(directory / config))
                break
        weights = [p for p in directory.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES]
        identity["weights"] = weights_fingerprint(weights, directory) if weights else None
    if spec.options.get("weights"):
        file = Path(spec.options["weights"]).expanduser()
        identity["weights_file"] = str(file.resolve()) if file.exists() else str(file)
        identity["weights"] = weights_fingerprint([file]) if file.is_file() else None
    return identity


def describe_llm(identity: dict[str, Any]) -> str:
    facts = ", ".join(f"{k} {identity[k]}" for k in ("model_type", "hidden_size", "vocab_size") if identity.get(k) is not None)
    return f"{identity.get('path')} ({facts})" if facts else str(identity.get("path"))


def llm_difference(stored: dict[str, Any], current: dict[str, Any]) -> str | None:
    """Why ``current`` is not the LLM ``stored`` describes, or None when it is the same model (moved or not)."""
    for key in ("hidden_size", "vocab_size", "model_type"):
        if stored.get(key) is not None and current.get(key) is not None and stored[key] != current[key]:
            return f"its {key} is {current[key]}, the checkpoint's LLM had {stored[key]}"
    if stored.get("config_sha256") and current.get("config_sha256") and stored["config_sha256"] != current["config_sha256"]:
        return "its config.json differs"
    if stored.get("weights") and current.get("weights") and stored["weights"] != current["weights"]:
        return "its weight files differ (another checkpoint, or weights changed since)"
    return None


def encoder_difference(stored: dict[str, Any], current: dict[str, Any]) -> str | None:
    """Why the encoder ``current`` is not ``stored``, or None when it is the same one."""
    if "parts" in stored or "parts" in current:  # a fused encoder: each part in turn
        old, new = stored.get("parts", []), current.get("parts", [])
        if len(old) != len(new):
            return f"it fuses {len(new)} encoders, the checkpoint's fused {len(old)}"
        for i, (a, b) in enumerate(zip(old, new)):
            why = encoder_difference(a, b)
            if why:
                return f"its part {i} ({b.get('name')}): {why}"
        return None
    if stored.get("config_sha256") and current.get("config_sha256") and stored["config_sha256"] != current["config_sha256"]:
        return "its configuration differs"
    if stored.get("weights") and current.get("weights") and stored["weights"] != current["weights"]:
        return "its weight files differ (another checkpoint, or weights changed since)"
    return None
