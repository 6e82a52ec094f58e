"""Save and load a MultimodalLM as JSON + safetensors, storing only what is not a referenced, unchanged base."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
from safetensors.torch import load_file, save_file

from .spec import ModelSpec

if TYPE_CHECKING:
    from .model import MultimodalLM
    from .processor import MultimodalProcessor

FORMAT = "mmdomain-checkpoint/1"
CONFIG = "mmdomain_config.json"
WEIGHTS = "model.safetensors"


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``target`` in one rename, so a crash never
    leaves a half-written directory that looks complete, and a good old one survives until the new one is whole."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _parts(model: "MultimodalLM") -> list[tuple[str, Any, bool]]:
    """(name, module, store whole) for every part: connectors always; encoders unless their weights are a local path."""
    parts = [("encoder", model.encoder, not model.spec.encoder.is_referenced()), ("connector", model.connector, True),
             ("llm", model.llm, False)]
    for i, (branch, media) in enumerate(zip(model.extra, model.spec.extra_media)):
        parts += [(f"extra.{i}.encoder", branch.encoder, not media.encoder.is_referenced()), (f"extra.{i}.connector", branch.connector, True)]
    return parts


def _selected_state(model: "MultimodalLM") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Weights to store, and per part what was stored: ``all`` / ``trained`` (requires_grad or restored) / ``none``."""
    state: dict[str, torch.Tensor] = {}
    stored = {}
    for part, module, keep_all in _parts(model):
        chosen = {}
        for name, param in module.named_parameters():
            full = f"{part}.{name}"
            if keep_all or param.requires_grad or full in model.restored:
                chosen[full] = param.detach().contiguous().cpu()
        if keep_all:  # persistent buffers of a non-referenced part (e.g. norm statistics) are part of its weights too
            persistent = set(module.state_dict())
            chosen.update({f"{part}.{n}": b.detach().contiguous().cpu() for n, b in module.named_buffers() if n in persistent})
        state.update(chosen)
        stored[part] = "all" if keep_all else ("trained" if chosen else "none")
    return state, stored


def save_model(model: "MultimodalLM", directory: str | Path, tokenizer: Any = None) -> None:
    state, stored = _selected_state(model)
    with atomic_directory(directory) as tmp:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        config = {
            "format": FORMAT,
            "spec": model.spec.model_dump(mode="json"),
            "stored": stored,
            "media_token_id": model.media_token_id,
            "tokens_per_item": model.tokens_per_item,
            "encoder_info": model.encoder.info.to_dict(),
        }
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / "tokenizer"))


def load_model(directory: str | Path) -> tuple["MultimodalLM", "MultimodalProcessor"]:
    from .model import build_model

    directory = Path(directory)
    config_file = directory / CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(f"{str(directory)!r} is not an mmdomain checkpoint: it has no {CONFIG}")
    config = json.loads(config_file.read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{config_file} has format {config.get('format')!r}; this mmdomain reads {FORMAT!r}")
    spec = ModelSpec.model_validate(config["spec"])
    tok_dir = directory / "tokenizer"
    model, processor = build_model(spec, tokenizer_dir=str(tok_dir) if tok_dir.is_dir() else None)
    if model.media_token_id != config["media_token_id"]:
        raise ValueError(f"media token id {model.media_token_id} differs from the checkpoint's {config['media_token_id']}; the LLM or tokenizer at {spec.llm.path} changed")
    state = load_file(str(directory / WEIGHTS))
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise ValueError(f"{directory / WEIGHTS} holds {len(unknown)} weights this model does not have (first: {unknown[:3]}); was the spec edited?")
    shapes = [k for k in state if state[k].shape != own[k].shape]
    if shapes:
        raise ValueError(f"{directory / WEIGHTS}: shape mismatch for {shapes[:3]}")
    model.load_state_dict(state, strict=False)
    model.restored = {k for k in state if ".connector." not in f".{k}"}
    return model, processor


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory whose ``checkpoint/`` holds one."""
    path = Path(path)
    for candidate in (path, path / "checkpoint"):
        if (candidate / CONFIG).is_file():
            return candidate
    raise FileNotFoundError(f"{str(path)!r} is neither an mmdomain checkpoint nor a run directory with checkpoint/{CONFIG}")


def _canonical(name: str) -> str:
    """Parameter name without peft's wrapping, so a stage-1 LLM weight finds its place under stage 2's LoRA."""
    return name.replace("llm.base_model.model.", "llm.", 1).replace(".base_layer.", ".")


def init_from_checkpoint(model: "MultimodalLM", path: str | Path) -> list[str]:
    """Load a previous stage's stored weights into ``model`` (built from this stage's spec); returns their names.

    The encoder and connector must be the same components; the LLM may gain LoRA in between (names are mapped).
    """
    directory = resolve_checkpoint(path)
    config = json.loads((directory / CONFIG).read_text())
    previous = ModelSpec.model_validate(config["spec"])
    for part in ("encoder", "connector", "extra_media"):
        if getattr(previous, part) != getattr(model.spec, part):
            raise ValueError(
                f"init_from {directory}: its {part} is {getattr(previous, part).model_dump()} but this recipe's is "
                f"{getattr(model.spec, part).model_dump()}; stages must share the {part}"
            )
    if config["media_token_id"] != model.media_token_id:
        raise ValueError(f"init_from {directory}: media token id {config['media_token_id']} != {model.media_token_id}; the LLM or media_token changed")
    state = load_file(str(directory / WEIGHTS))
    own = {_canonical(n): n for n in model.state_dict()}
    mapped, unknown = {}, []
    for name, tensor in state.items():
        target = own.get(_canonical(name))
        (unknown.append(name) if target is None else mapped.__setitem__(target, tensor))
    if unknown:
        raise ValueError(f"init_from {directory}: {len(unknown)} stored weights have no place in this model (first: {unknown[:3]})")
    model.load_state_dict(mapped, strict=False)
    model.restored |= {k for k in mapped if ".connector." not in f".{k}"}
    return sorted(mapped)
