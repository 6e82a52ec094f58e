"""Load a causal LM and its tokenizer from a local directory, add the media placeholder token, apply LoRA."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from .errors import ModelLoadError
from .spec import LLMSpec, LoraSpec

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_local_dir(path: str, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        hint = (
            f" It looks like a hub id: mmdomain never downloads. Fetch it yourself, e.g. "
            f"`huggingface-cli download {path} --local-dir /models/{path.split('/')[-1]}`, and give that directory."
            if not p.exists() and path.count("/") == 1 and not path.startswith((".", "/", "~"))
            else " mmdomain never downloads models: give the local directory that holds config.json and the weights."
        )
        raise FileNotFoundError(f"{what} {path!r} is not a local directory.{hint}")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{what} {path!r} has no config.json; is it a transformers model directory?")
    return p


def load_llm(spec: LLMSpec) -> tuple[Any, Any]:
    """(model, tokenizer) from ``spec.path`` with ``local_files_only``; the tokenizer gets a pad token if it has none."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = check_local_dir(spec.path, "LLM path")
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), local_files_only=True, dtype=_DTYPES[spec.dtype], attn_implementation=spec.attn_implementation
        )
    except Exception as exc:
        # transformers reports a refused pickle or a truncated file as a bare UnpicklingError / SafetensorError /
        # OSError that names no file; find the file that cannot be read and say so, else let the error through.
        from encoders import diagnose_weights

        problem = diagnose_weights(path)
        if problem is None:
            raise
        raise ModelLoadError(f"LLM directory {str(path)!r} cannot be loaded: {problem}") from exc
    if tokenizer.pad_token is None:
        # Padding positions are masked out of attention and labels, so which id pads does not change the loss.
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def add_media_token(model: Any, tokenizer: Any, token: str) -> int:
    """Make ``token`` one special token and return its id; grow the embeddings only if the vocabulary overflows.

    New rows are set to the mean of the existing rows (input and, if untied, output embeddings), not random noise:
    the input row is overwritten by the splice anyway, and a mean output row keeps the frozen LM's next-token
    distribution nearly unchanged (Hewitt, 2021) instead of giving the placeholder an arbitrary logit. The rule is
    deterministic, so a checkpoint of a frozen LLM need not store the new rows.
    """
    if token not in tokenizer.get_vocab():
        tokenizer.add_tokens([token], special_tokens=True)
    token_id = tokenizer.convert_tokens_to_ids(token)
    encoded = tokenizer(f"a {token} b", add_special_tokens=False)["input_ids"]
    if encoded.count(token_id) != 1:
        raise ValueError(f"media token {token!r} does not tokenize to a single id (id {token_id}); choose another media_token")
    old_rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > old_rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            for emb in {id(e): e for e in (model.get_input_embeddings(), model.get_output_embeddings()) if e is not None}.values():
                emb.weight[old_rows:] = emb.weight[:old_rows].mean(dim=0, keepdim=True)
        log.info("added media token %r as id %d; embeddings grown %d -> %d rows (mean-initialised)", token, token_id, old_rows, len(tokenizer))
    return int(token_id)


def apply_lora(model: Any, lora: LoraSpec) -> Any:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.targets, task_type="CAUSAL_LM")
    return get_peft_model(model, config)
