"""``mmdomain export --format native``: a checkpoint that needs nothing outside its folder (frozen bases copied in, or
referenced by path and sha256), with LoRA adapters also in PEFT's own format (``PeftModel.from_pretrained`` loads
them), or merged into the weights with ``--merge-lora``. ``load_pretrained`` reads it like any checkpoint."""
from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from .builder import MODEL_CONFIG, TOKENIZER, WEIGHTS, base_identities, model_state
from .bundled_bases import BUNDLED, PREFIX, REFERENCED, map_spec_paths, resolve_bundled, sha256_file
from .export_output import ExportWriter
from .identity import _WEIGHT_SUFFIXES
from .lora_merge import merge_model_lora
from .spec import ModelSpec

log = logging.getLogger(__name__)


def write_encoder_adapter(encoder: nn.Module, lora: Any, source: str, directory: Path) -> int:
    """The LoRA of ``encoder`` as a PEFT adapter folder (adapter_config.json + adapter_model.safetensors), named
    relative to the library model inside mmdomain's wrapper (a transformers or timm model's ``model``, open_clip's
    ``visual``), so ``PeftModel.from_pretrained(that_model, directory)`` applies it. Returns the adapted layer count."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    inner = next((n for n in ("model", "visual") if isinstance(getattr(encoder, n, None), nn.Module)), None)
    prefix = f"{inner}." if inner else ""
    state, targets = {}, set()
    for name, param in encoder.named_parameters():
        if "lora_" not in name:
            continue
        key = re.sub(r"\.(lora_[A-Za-z_]+)\.default\b", r".\1", name.removeprefix(prefix))
        state[f"base_model.model.{key}"] = param.detach().contiguous().cpu()
        targets.add(key.split(".lora_")[0])
    directory.mkdir(parents=True, exist_ok=True)
    LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=sorted(targets),
               base_model_name_or_path=source).save_pretrained(str(directory))
    save_file(state, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    return len(targets)


def _copy_base(source: Path, destination: Path) -> None:
    """Copy a base model: a weights file, or a model folder's top-level files (pickled weights are left out where the
    same folder has safetensors: readers take those; subfolders are left out and counted)."""
    destination.mkdir(parents=True, exist_ok=True)
    if source.is_file():
        shutil.copy2(source, destination / source.name)
        return
    files = [p for p in source.iterdir() if p.is_file() and not p.name.startswith(".")]
    safetensors = any(p.suffix == ".safetensors" for p in files)
    left = [p.name for p in files if safetensors and p.suffix in _WEIGHT_SUFFIXES and p.suffix != ".safetensors"]
    left += [p.name + "/" for p in source.iterdir() if p.is_dir()]
    for path in files:
        if path.name not in left:
            shutil.copy2(path, destination / path.name)
    if left:
        log.info("copying base %s: left out %d entries not needed to load it (%s)", source, len(left), ", ".join(sorted(left)[:5]))


def _base_files(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))


def write_native(model: Any, processor: Any, writer: ExportWriter, *, merge_lora: bool = False, bases: str = "copy") -> dict[str, Any]:
    """Write ``model`` as a self-contained checkpoint into ``writer.path``; returns the facts the model card states."""
    out = writer.path
    spec = model.spec
    lora_kinds = [(i, kind) for i, kind in enumerate(spec.kinds()) if kind.encoder.lora is not None]
    adapters = []
    if not merge_lora:
        if spec.llm.lora is not None:
            model.llm.save_pretrained(str(out / "adapters" / "llm"), save_embedding_layers=False)
            adapters.append("adapters/llm")
        for i, kind in lora_kinds:
            encoder = model.kind_parts()[i][0]
            write_encoder_adapter(encoder, kind.encoder.lora, kind.encoder.name, out / "adapters" / f"encoder-{i}")
            adapters.append(f"adapters/encoder-{i}")
    merged = merge_lora and (spec.llm.lora is not None or bool(lora_kinds))
    if merge_lora:
        merge_model_lora(model)
    spec_dict = model.spec.model_dump(mode="json")
    state, stored = model_state(model)
    if merge_lora:  # the merged encoders travel whole; their bases only give the architecture
        for index, (encoder, _, _) in enumerate(model.kind_parts()):
            part = "encoder" if index == 0 else f"extra_kinds.{index - 1}.encoder"
            persistent = set(encoder.state_dict())
            state.update({f"{part}.{n}": t.detach() for n, t in encoder.named_parameters()})
            state.update({f"{part}.{n}": b.detach() for n, b in encoder.named_buffers() if n in persistent})
            stored[part] = "all"
    config_extra: dict[str, Any] = {}
    if bases == "copy":
        copied: dict[str, str] = {}

        def bundle(path: str, name: str) -> str:
            source = Path(path).expanduser().resolve()
            if str(source) not in copied:
                copied[str(source)] = f"{PREFIX}{name}"
                target = out / copied[str(source)]
                _copy_base(source, target)
            relative = copied[str(source)]
            return f"{relative}/{source.name}" if source.is_file() else relative

        if merge_lora:  # the merged LLM is no longer the base on disk: it is saved here whole, with the media tokens
            model.causal_lm.save_pretrained(str(out / PREFIX / "llm"))
            processor.tokenizer.save_pretrained(str(out / PREFIX / "llm"))
            spec_dict["llm"]["path"] = f"{PREFIX}llm"
            state = {k: v for k, v in state.items() if not k.startswith("llm.")}
            stored["llm"] = "none"
        else:
            spec_dict["llm"]["path"] = bundle(spec_dict["llm"]["path"], "llm")
        counter = iter(range(1000))
        spec_dict = {**spec_dict, **{k: v for k, v in map_spec_paths(
            spec_dict, lambda p: p if p.startswith(PREFIX) else bundle(p, f"encoder-{next(counter)}")).items() if k != "llm"}}
        config_extra[BUNDLED] = True
        where = resolve_bundled(spec_dict, out)
    else:
        if merge_lora:  # merged LLM weights differ from the referenced base: they travel in model.safetensors
            persistent = set(model.causal_lm.state_dict())
            state.update({f"llm.{n}": p.detach() for n, p in model.llm.named_parameters()})
            state.update({f"llm.{n}": b.detach() for n, b in model.llm.named_buffers() if n in persistent})
            stored["llm"] = "all"
        hashes = {}
        map_spec_paths(spec_dict, lambda p: hashes.update({str(f.resolve()): sha256_file(f) for f in _base_files(Path(p).expanduser())}) or p)
        config_extra[REFERENCED] = hashes
        where = spec_dict
    identities = base_identities(ModelSpec.model_validate(where))
    writer.tensors(WEIGHTS, state)
    writer.json(MODEL_CONFIG, {
        "spec": spec_dict, "stored": stored,
        "media_token_ids": [token_id for _, _, token_id in model.kind_parts()],
        "tokens_per_item": [kind.tokens_per_item for kind in processor.kinds],
        "encoder_info": [encoder.info.to_dict() for encoder, _, _ in model.kind_parts()],
        "bases": identities, **config_extra,
    })
    processor.tokenizer.save_pretrained(str(out / TOKENIZER))
    usage = ["```python", "from mmdomain.builder import load_pretrained", f"model, processor = load_pretrained({str(writer.target)!r})", "```"]
    if adapters:
        usage += ["", "LoRA adapters in PEFT's format (the LLM's apply to the base LLM as is; the media token rows of the embedding "
                  "come from mmdomain):", "```python", "from peft import PeftModel",
                  "from transformers import AutoModelForCausalLM",
                  f"llm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE_LLM), {str(writer.target / 'adapters' / 'llm')!r})",
                  "```"]
    return {"format": "native", "merged_lora": merged, "bases": bases, "adapters": adapters, "usage": usage}
