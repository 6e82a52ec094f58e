"""Build a MultimodalLM from a spec, save it as a checkpoint, load it back, and hand a stage's weights to the next.

Dependencies run one way: cli / train -> builder -> model -> parts (encoders, connectors, llm, processor), with
``checkpoint`` (file I/O) and ``identity`` (what a base model is) below them all. Every check that can fail on a
checkpoint (format, completeness, base models, media tokens) runs before any weight is loaded.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from connectors import create_connector
from encoders import audio_transform, create_encoder, image_transform, volume_transform

from .bundled_bases import BUNDLED, REFERENCED, check_referenced, resolve_bundled
from .checkpoint import CheckpointWriter, read_json, read_tensors, resolve_checkpoint, verify
from .domains import build_domain
from .encoder_adaptation import add_encoder_lora
from .errors import CheckpointError, ModelLoadError
from .identity import describe_llm, encoder_difference, encoder_identity, llm_difference, llm_identity
from .llm import add_media_token, apply_lora, load_llm, load_tokenizer
from .media import MediaKind, audio_sizing, sized_by_length
from .model import MediaKindModule, MultimodalLM, head_transform
from .processor import MultimodalProcessor
from .spec import PRIMARY, ModelSpec, with_legacy_defaults

log = logging.getLogger(__name__)

MODEL_CONFIG = "mmdomain_config.json"
WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer"


# -- building -------------------------------------------------------------------------------------------------


def build_model(spec: ModelSpec, *, tokenizer_dir: str | Path | None = None) -> tuple[MultimodalLM, MultimodalProcessor]:
    """Build (model, processor) from a spec: encoders frozen, LLM frozen (LoRA adapters trainable), connectors
    trainable. Each connector's ``in_dim`` comes from its encoder and ``out_dim`` from the LLM's embedding width.
    An encoder with ``lora`` gets its adapters here, so a checkpoint's spec alone rebuilds the same model."""
    encoders = [create_encoder(kind.encoder.name, **kind.encoder.options) for kind in spec.kinds()]
    for index, (kind, encoder) in enumerate(zip(spec.kinds(), encoders)):
        if kind.encoder.lora is not None:
            add_encoder_lora(encoder, kind.encoder.lora, "model.encoder" if index == 0 else f"model.extra_kinds[{index - 1}].encoder")
    domains = [build_domain(kind.domain.name, kind.domain.options, enc.info) for kind, enc in zip(spec.kinds(), encoders)]
    llm, tokenizer = load_llm(spec.llm)
    if tokenizer_dir is not None:  # a checkpoint's own tokenizer (it already holds the media tokens)
        tokenizer = load_tokenizer(tokenizer_dir, "checkpoint")
    check_head(llm, spec.llm.path)
    hidden = llm.get_input_embeddings().embedding_dim
    modules, kinds = [], []
    for index, (kind, encoder, domain) in enumerate(zip(spec.kinds(), encoders, domains)):
        connector = create_connector(kind.connector.name, in_dim=encoder.info.embed_dim, out_dim=hidden, **kind.connector.options)
        check_slices(domain, kind.connector.name, connector, "model" if index == 0 else f"model.extra_kinds[{index - 1}]")
        # The connector always trains in fp32 (it is small); its output is cast to the LLM's dtype at the splice.
        module = MediaKindModule(encoder.requires_grad_(False), connector, add_media_token(llm, tokenizer, kind.token))
        modules.append(module)
        aliases = ("image", encoder.info.modality) if kind.name == PRIMARY else ()
        where = "model.domain" if index == 0 else f"model.extra_kinds[{index - 1}].domain"
        sizing = audio_sizing(encoder.info, connector) if sized_by_length(encoder.info, kind.connector, spec.audio_tokens) else None
        kinds.append(MediaKind(kind.name, kind.token, module.token_id, module.tokens_per_item, media_transform(encoder.info, domain, where),
                               domain, aliases=tuple(a for a in aliases if a != kind.name), sizing=sizing))
    llm.requires_grad_(False)
    if spec.llm.lora is not None:
        llm = apply_lora(llm, spec.llm.lora)
    primary = modules[0]
    model = MultimodalLM(primary.encoder, primary.connector, llm, media_token_id=primary.token_id, spec=spec, extra_kinds=modules[1:])
    return model, MultimodalProcessor(tokenizer, kinds, max_length=spec.max_length)


def media_transform(info: Any, domain: Any, where: str = "model.domain") -> Any:
    """The encoder-side transform that fits this domain's decoded media (checked for a modality match)."""
    if info.modality == "audio":
        if domain.output != "waveform":
            raise ModelLoadError(f"{info.source} is an audio encoder but {where} is {domain.name!r}; use domain: audio")
        return audio_transform(info)
    if domain.output == "waveform":
        raise ModelLoadError(f"{where} is audio but {info.source} is a {info.modality} encoder; use an audio encoder (hf_audio:DIR, or tiny-audio for a CPU try)")
    depth = getattr(domain, "volume_depth", None)
    if depth is not None:
        return volume_transform(info, depth, normalize=domain.output != "standardized")
    return image_transform(info, normalize=domain.output != "standardized")


def check_slices(domain: Any, name: str, connector: nn.Module, where: str) -> None:
    """A domain that decodes volumes (stacks of slices) needs a connector that joins slices; any other would see one
    slice's tokens per item and the token counts would not add up."""
    depth = getattr(domain, "volume_depth", None)
    if depth is not None and not getattr(connector, "takes_slices", False):
        raise ModelLoadError(f"{where}.domain decodes each volume as {depth} slices (nifti.mode: volume), but {where}.connector "
                             f"{name!r} takes one image's tokens; use connector depth_pool (groups: slabs of slices to keep), or a "
                             "2-D nifti.mode (middle, even, neighbours)")
    if depth is not None and depth < getattr(connector, "min_slices", 1):
        raise ModelLoadError(f"{where}.connector {name!r} needs at least {connector.min_slices} slices per item, but {where}.domain "
                             f"decodes {depth} (nifti.count); raise nifti.count or lower the connector's groups")


@torch.no_grad()
def check_head(llm: nn.Module, where: str) -> None:
    """Refuse an LLM whose logits ``MultimodalLM`` would not reproduce.

    The model applies the LM head itself, at supervised positions only, and repeats each family's transform of its
    logits (``model.head_transform``). A family with a transform it does not know would train on a wrong loss without
    a sign, so a 4-token forward compares both ways of computing the logits once, when the model is built."""
    vocab = llm.get_input_embeddings().weight.shape[0]
    ids = torch.arange(min(4, vocab), device=llm.get_input_embeddings().weight.device)[None]
    was_training = llm.training
    llm.eval()
    try:
        reference = llm(input_ids=ids, use_cache=False).logits.float()
        hidden = llm.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
        ours = head_transform(llm.config)(llm.get_output_embeddings()(hidden)).float()
    finally:
        llm.train(was_training)
    exact = next(llm.parameters()).dtype == torch.float32
    error = float((ours - reference).abs().max())
    if error > (1e-4 if exact else 2e-2) * (1.0 + float(reference.abs().max())):
        raise ModelLoadError(
            f"LLM {where} ({llm.config.model_type}): mmdomain's loss head differs from the model's own logits by {error:.3g}; this "
            "family transforms its logits in a way mmdomain does not repeat yet, so its training loss would be wrong. Please "
            "report the model type; until then use another LLM family"
        )


# -- saving ---------------------------------------------------------------------------------------------------


def _parts(model: MultimodalLM) -> list[tuple[str, nn.Module, bool]]:
    """(name, module, store whole) per part: connectors always; encoders unless their weights are a local path."""
    parts = [("encoder", model.encoder, not model.spec.encoder.is_referenced()), ("connector", model.connector, True),
             ("llm", model.llm, False)]
    for i, (module, kind) in enumerate(zip(model.extra_kinds, model.spec.extra_kinds)):
        parts += [(f"extra_kinds.{i}.encoder", module.encoder, not kind.encoder.is_referenced()),
                  (f"extra_kinds.{i}.connector", module.connector, True)]
    return parts


def model_state(model: MultimodalLM, full: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Weights a checkpoint keeps, and per part what was kept: ``all`` / ``trained`` (trainable or restored) / ``none``.
    Frozen weights that come unchanged from a local base are referenced, not copied. ``full``: the whole tensors by
    name, where the model's own are shards (FSDP2 gathers them into this full state dict)."""
    state: dict[str, torch.Tensor] = {}
    stored = {}
    for part, module, keep_all in _parts(model):
        chosen = {}
        for name, param in module.named_parameters():
            name_in_model = f"{part}.{name}"
            if keep_all or param.requires_grad or name_in_model in model.restored:
                chosen[name_in_model] = param.detach() if full is None else full[name_in_model]
        if keep_all:  # persistent buffers of a non-referenced part (e.g. norm statistics) are part of its weights too
            persistent = set(module.state_dict())
            chosen.update({f"{part}.{n}": b.detach() if full is None else full[f"{part}.{n}"] for n, b in module.named_buffers() if n in persistent})
        state.update(chosen)
        stored[part] = "all" if keep_all else ("trained" if chosen else "none")
    return state, stored


def base_identities(spec: ModelSpec) -> dict[str, Any]:
    return {"llm": llm_identity(spec.llm), "encoders": [encoder_identity(kind.encoder) for kind in spec.kinds()]}


def write_model(writer: CheckpointWriter, model: MultimodalLM, processor: MultimodalProcessor,
                bases: dict[str, Any] | None = None, full: dict[str, torch.Tensor] | None = None) -> None:
    """The model's part of a checkpoint: weights, config (spec, what was stored, media tokens, base identities),
    tokenizer. ``bases`` (computed once per run) saves re-reading the base models' files at every save; ``full``
    see ``model_state``."""
    state, stored = model_state(model, full)
    writer.tensors(WEIGHTS, state)
    writer.json(MODEL_CONFIG, {
        "spec": model.spec.model_dump(mode="json"),
        "stored": stored,
        "media_token_ids": [token_id for _, _, token_id in model.kind_parts()],
        "tokens_per_item": [kind.tokens_per_item for kind in processor.kinds],
        "encoder_info": [encoder.info.to_dict() for encoder, _, _ in model.kind_parts()],
        "bases": bases or base_identities(model.spec),
    })
    processor.tokenizer.save_pretrained(str(writer.path / TOKENIZER))


def save_pretrained(model: MultimodalLM, processor: MultimodalProcessor, directory: str | Path) -> Path:
    """Write a model-only checkpoint to ``directory`` (replaced whole, atomically, if it exists)."""
    with CheckpointWriter(directory) as writer:
        write_model(writer, model, processor)
    return Path(directory)


# -- loading --------------------------------------------------------------------------------------------------


def read_model_config(directory: Path) -> dict[str, Any]:
    verify(directory)
    config = read_json(directory / MODEL_CONFIG)
    for key in ("spec", "stored", "media_token_ids", "bases"):
        if key not in config:
            raise CheckpointError(f"{directory / MODEL_CONFIG} has no {key!r}; it was not written by this mmdomain")
    return config


def check_bases(config: dict[str, Any], spec: ModelSpec, directory: Path, what: str) -> None:
    """Refuse a checkpoint made for other base models than ``spec`` names, naming both; a moved copy of the same
    base is fine. Reads configs and fingerprints only."""
    stored, current = config["bases"], base_identities(spec)
    why = llm_difference(stored["llm"], current["llm"])
    if why:
        raise CheckpointError(
            f"{what} {directory} was made with LLM {describe_llm(stored['llm'])}, but this recipe's LLM is "
            f"{describe_llm(current['llm'])}: {why}. Weights trained for one LLM do not fit another: use the LLM the checkpoint "
            f"was made with (model.llm.path), or train that stage again with this one"
        )
    for kind, old, new in zip(spec.kinds(), stored["encoders"], current["encoders"]):
        why = encoder_difference(old, new)
        if why:
            raise CheckpointError(f"{what} {directory} was made with encoder {old.get('path') or old.get('weights_file') or old['name']}, "
                                  f"but {kind.encoder.name} here: {why}. Use the encoder weights the checkpoint was made with")


def load_pretrained(path: str | Path) -> tuple[MultimodalLM, MultimodalProcessor]:
    """(model, processor) from a checkpoint directory or a run directory (its newest complete checkpoint)."""
    directory = resolve_checkpoint(path)
    config = read_model_config(directory)
    stored_spec = config["spec"]
    if config.get(BUNDLED):  # a self-contained export: its bases lie inside it, wherever it was moved
        stored_spec = resolve_bundled(stored_spec, directory)
    if config.get(REFERENCED):
        check_referenced(config[REFERENCED], directory)
    spec = ModelSpec.model_validate(with_legacy_defaults(stored_spec))
    check_bases(config, spec, directory, "checkpoint")
    tokenizer_dir = directory / TOKENIZER
    model, processor = build_model(spec, tokenizer_dir=tokenizer_dir if tokenizer_dir.is_dir() else None)
    load_weights(model, directory, config)
    return model, processor


def load_weights(model: MultimodalLM, directory: Path, config: dict[str, Any] | None = None) -> None:
    """Load a checkpoint of this same model (a run resuming, or ``load_pretrained``): its base models, media tokens,
    weight names and shapes are checked first; the stored weights are then marked ``restored`` so a later save
    keeps them even where they no longer train."""
    if config is None:
        config = read_model_config(directory)
        check_bases(config, model.spec, directory, "checkpoint")
    ids = [token_id for _, _, token_id in model.kind_parts()]
    if ids != config["media_token_ids"]:
        raise CheckpointError(f"media token ids {ids} differ from the checkpoint's {config['media_token_ids']}; "
                              f"the tokenizer of {directory} or the LLM at {model.spec.llm.path} changed")
    state = read_tensors(directory / WEIGHTS)
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise CheckpointError(f"{directory / WEIGHTS} holds {len(unknown)} weights this model does not have (first: {unknown[:3]}); "
                              "was the checkpoint's config edited?")
    _check_shapes(directory / WEIGHTS, {k: (v, own[k]) for k, v in state.items()})
    model.load_state_dict(state, strict=False)
    model.restored = {k for k in state if ".connector." not in f".{k}"}


def _check_shapes(source: Path, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    wrong = [(k, tuple(a.shape), tuple(b.shape)) for k, (a, b) in pairs.items() if a.shape != b.shape]
    if wrong:
        name, stored, expected = wrong[0]
        raise CheckpointError(f"{source}: {len(wrong)} weights have other shapes than this model's (first: {name} is {stored} there, "
                              f"{expected} here); the checkpoint was made for other model settings")


# -- stage handoff --------------------------------------------------------------------------------------------


def _canonical(name: str) -> str:
    """Parameter name without peft's wrapping, so a stage-1 LLM weight finds its place under stage 2's LoRA."""
    return name.replace("llm.base_model.model.", "llm.", 1).replace(".base_layer.", ".")


def check_handoff(spec: ModelSpec, path: str | Path) -> Path:
    """Check, before any model is built, that a previous stage's checkpoint fits this stage's spec: the same media
    kinds (encoders, connectors, domains) and the same base models. Returns the checkpoint directory."""
    directory = resolve_checkpoint(path)
    config = read_model_config(directory)
    previous = ModelSpec.model_validate(with_legacy_defaults(config["spec"]))
    for part in ("encoder", "connector", "extra_kinds"):
        # Encoder adapters may be added in a later stage (align frozen, then instruct with encoder LoRA), as the LLM's.
        if _without_adapters(getattr(previous, part)) != _without_adapters(getattr(spec, part)):
            raise CheckpointError(
                f"init_from {directory}: its {part} is {_dump(getattr(previous, part))} but this recipe's is "
                f"{_dump(getattr(spec, part))}; stages must share the {part}"
            )
    if previous.domain != spec.domain:  # legitimate at times (a cap raised, tiling added), never silently
        log.warning("init_from %s: media were decoded with domain %s there and %s here; the weights it carries learnt from "
                    "the former", directory, previous.domain.model_dump(), spec.domain.model_dump())
    if previous.audio_tokens != spec.audio_tokens and any(kind.domain.name == "audio" for kind in spec.kinds()):
        log.warning("init_from %s: its clips cost tokens %s, here %s (model.audio_tokens); the connector it carries "
                    "learnt from the former", directory, previous.audio_tokens, spec.audio_tokens)
    check_bases(config, spec, directory, "init_from")
    return directory


def _without_adapters(value: Any) -> Any:
    if isinstance(value, list):
        return [_without_adapters(kind) for kind in value]
    if hasattr(value, "encoder"):  # a media kind
        return value.model_copy(update={"encoder": _without_adapters(value.encoder)})
    return value.model_copy(update={"lora": None}) if hasattr(value, "lora") else value


def _dump(value: Any) -> Any:
    return [v.model_dump() for v in value] if isinstance(value, list) else value.model_dump()


def load_handoff(model: MultimodalLM, directory: Path) -> list[str]:
    """Load a previous stage's stored weights (checked by ``check_handoff``) into ``model``; returns their names.
    The LLM may have gained LoRA in between (names are mapped)."""
    config = read_model_config(directory)
    ids = [token_id for _, _, token_id in model.kind_parts()]
    if config["media_token_ids"] != ids:
        raise CheckpointError(f"init_from {directory}: media token ids {config['media_token_ids']} != {ids}; the LLM or media_token changed")
    state = read_tensors(directory / WEIGHTS)
    own_state = model.state_dict()
    own = {_canonical(n): n for n in own_state}
    mapped, unknown = {}, []
    for name, tensor in state.items():
        target = own.get(_canonical(name))
        (unknown.append(name) if target is None else mapped.__setitem__(target, tensor))
    if unknown:
        adapters = "; its encoder has LoRA adapters (model.encoder.lora there): give this stage the same model.encoder.lora" \
            if any("lora_" in n and "encoder." in n for n in unknown) else ""
        raise CheckpointError(f"init_from {directory}: {len(unknown)} stored weights have no place in this model (first: {unknown[:3]}){adapters}")
    _check_shapes(directory / WEIGHTS, {k: (v, own_state[k]) for k, v in mapped.items()})
    model.load_state_dict(mapped, strict=False)
    model.restored |= {k for k in mapped if ".connector." not in f".{k}"}
    return sorted(mapped)
