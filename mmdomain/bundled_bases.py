"""Base models that travel inside a self-contained checkpoint (``mmdomain export --format native``): their paths are
stored relative to the checkpoint and resolved against wherever it now lies; referenced ones are checked by sha256."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Callable

from .errors import CheckpointError

log = logging.getLogger(__name__)

BUNDLED = "bundled_bases"  # key of mmdomain_config.json: the spec's base paths are relative to the checkpoint
REFERENCED = "base_sha256"  # key of mmdomain_config.json: {absolute file path: sha256} of referenced base files
PREFIX = "bases/"


def map_encoder_paths(encoder: dict[str, Any], change: Callable[[str], str]) -> dict[str, Any]:
    """An encoder spec dict with ``change`` applied to its local paths (``family:DIR`` and ``options.weights``; each
    part of a ``fuse`` encoder)."""
    encoder = {**encoder, "options": dict(encoder.get("options") or {})}
    if encoder["name"] == "fuse":
        encoder["options"]["encoders"] = [map_encoder_paths(part, change) for part in encoder["options"].get("encoders") or []]
        return encoder
    family, sep, rest = encoder["name"].partition(":")
    if sep and rest.startswith(PREFIX) or (sep and Path(rest).expanduser().exists()):
        encoder["name"] = f"{family}:{change(rest)}"
    if encoder["options"].get("weights"):
        encoder["options"]["weights"] = change(encoder["options"]["weights"])
    return encoder


def map_spec_paths(spec: dict[str, Any], change: Callable[[str], str]) -> dict[str, Any]:
    """A model spec dict with ``change`` applied to the LLM path and every encoder's local paths."""
    spec = {**spec, "llm": {**spec["llm"], "path": change(spec["llm"]["path"])}, "encoder": map_encoder_paths(spec["encoder"], change)}
    spec["extra_kinds"] = [{**kind, "encoder": map_encoder_paths(kind["encoder"], change)} for kind in spec.get("extra_kinds") or []]
    return spec


def resolve_bundled(spec: dict[str, Any], directory: Path) -> dict[str, Any]:
    """The spec of a self-contained checkpoint with its ``bases/...`` paths made absolute under ``directory``."""
    return map_spec_paths(spec, lambda p: str(directory / p) if p.startswith(PREFIX) else p)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_referenced(hashes: dict[str, str], directory: Path) -> None:
    """Refuse a checkpoint whose referenced base files are missing or changed since the export (full sha256)."""
    for file, expected in sorted(hashes.items()):
        path = Path(file)
        if not path.is_file():
            raise CheckpointError(f"{directory} references base file {path}, which does not exist: put the base model back at that path, or "
                                  "export again with --bases copy")
        actual = sha256_file(path)
        if actual != expected:
            raise CheckpointError(f"{directory} references base file {path} with sha256 {expected[:16]}..., but the file now has "
                                  f"{actual[:16]}...: it changed since the export; restore it, or export again with --bases copy")
    log.info("%d referenced base files of %s match their sha256", len(hashes), directory)
