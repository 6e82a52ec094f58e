"""The model a spec describes, its parameters on the meta device, from configuration files alone: every parameter's name,
shape, dtype and (after ``apply_trainable``) trainability, and each media kind's tokens per item, with no weight
file opened and no memory allocated. What ``mmdomain plan`` measures a recipe with before anything is downloaded."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


from connectors import create_connector
from encoders.skeleton import create_skeleton

from .encoder_adaptation import add_encoder_lora
from .llm import _DTYPES, apply_lora, check_local_dir
from .model import MediaKindModule, MultimodalLM
from .spec import ModelSpec

log = logging.getLogger(__name__)


@dataclass
class Skeleton:
    model: MultimodalLM
    notes: list[str] = field(default_factory=list)
    """What the plan could not read and assumed instead (a missing tokenizer, say)."""


def _tokenizer(path: Path) -> Any | None:
    """The LLM's tokenizer when its files are there (they are small); None when only config.json is."""
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _media_token(llm: Any, tokenizer: Any | None, token: str, notes: list[str]) -> int:
    """The placeholder id; the embedding table grows as ``llm.add_media_token`` grows it when the vocabulary is full."""
    if tokenizer is None:
        notes.append(f"no tokenizer beside the LLM's config.json: media token {token} assumed to fit the embedding table")
        return llm.get_input_embeddings().weight.shape[0] - 1
    if token not in tokenizer.get_vocab():
        tokenizer.add_tokens([token], special_tokens=True)
    rows = llm.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return int(tokenizer.convert_tokens_to_ids(token))


def build_skeleton(spec: ModelSpec) -> Skeleton:
    """``builder.build_model(spec)``'s model on the meta device, from configs: the same parts, LoRA adapters, media
    tokens and frozen/trainable defaults (the recipe's ``trainable`` is applied by the caller)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    notes: list[str] = []
    path = check_local_dir(spec.llm.path, "LLM path")
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    tokenizer = _tokenizer(path)
    # Encoders and connectors: accelerate puts every parameter on the meta device and leaves buffers real, so an
    # encoder that computes a buffer when built (mel filter banks, feature-length arithmetic) still can. The LLM is
    # built under the meta device itself: accelerate's re-registration of parameters would undo its tied embeddings.
    from accelerate import init_empty_weights

    with init_empty_weights(), _quiet_transformers():
        encoders = [create_skeleton(kind.encoder.name, **kind.encoder.options) for kind in spec.kinds()]
        for index, (kind, encoder) in enumerate(zip(spec.kinds(), encoders)):
            if kind.encoder.lora is not None:
                add_encoder_lora(encoder, kind.encoder.lora, "model.encoder" if index == 0 else f"model.extra_kinds[{index - 1}].encoder")
    with torch.device("meta"), _quiet_transformers():
        llm = AutoModelForCausalLM.from_config(config, dtype=_DTYPES[spec.llm.dtype], attn_implementation=spec.llm.attn_implementation)
        tokens = [_media_token(llm, tokenizer, kind.token, notes) for kind in spec.kinds()]
        llm.requires_grad_(False)
        if spec.llm.lora is not None:
            llm = apply_lora(llm, spec.llm.lora)
    hidden = llm.get_input_embeddings().embedding_dim
    with init_empty_weights():
        modules = [MediaKindModule(encoder.requires_grad_(False), create_connector(kind.connector.name, in_dim=encoder.info.embed_dim,
                                                                                  out_dim=hidden, **kind.connector.options), token)
                   for kind, encoder, token in zip(spec.kinds(), encoders, tokens)]
    primary = modules[0]
    model = MultimodalLM(primary.encoder, primary.connector, llm, media_token_id=primary.token_id, spec=spec, extra_kinds=modules[1:])
    return Skeleton(model, notes)


@contextlib.contextmanager
def _quiet_transformers():
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
