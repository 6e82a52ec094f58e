"""Load a causal LM and its tokenizer from a local directory, add the media placeholder token, apply LoRA."""
from __future__ import annotations

import logging
import warnings
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


def load_tokenizer(path: str | Path, what: str = "LLM") -> Any:
    """The tokenizer in ``path``, refused (ModelLoadError) if it does not reproduce text (see ``check_tokenizer``)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    check_tokenizer(tokenizer, f"{what} tokenizer in {str(path)!r}")
    return tokenizer


def _probe_words(tokenizer: Any, count: int = 8) -> str:
    """Text made of ordinary tokens spread over the vocabulary (not special, alphabetic, 2+ letters), so a word-level
    vocabulary never sees an unknown word and a subword one sees several pieces."""
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    vocab = sorted(tokenizer.get_vocab().values())
    picked: list[int] = []
    step = max(1, len(vocab) // (count * 8))
    for token_id in vocab[::step]:
        if token_id in special:
            continue
        text = tokenizer.decode([token_id]).strip()
        if len(text) >= 2 and text.isalpha():
            picked.append(token_id)
            if len(picked) == count:
                break
    return " ".join(tokenizer.decode([i]).strip() for i in picked)


def check_tokenizer(tokenizer: Any, where: str) -> None:
    """Refuse a tokenizer whose encode -> decode round trip of a chat-formatted conversation loses text.

    A tokenizer saved by one class and reloaded by another (a word-level vocabulary beside a ``qwen2`` config.json
    loads as a BPE tokenizer without merges) encodes every prompt to a few wrong ids without an error; training on
    that would learn nothing. Whitespace is ignored: a word-level decoder joins pieces with spaces.
    """
    words = _probe_words(tokenizer)
    if not words:
        return  # a vocabulary of bytes or single characters only: nothing ordinary to probe with
    messages = [{"role": "user", "content": words}, {"role": "assistant", "content": words}]
    text = words
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception as exc:  # noqa: BLE001 - a template's own error (Jinja, a raise_exception) names no file
            raise ModelLoadError(f"{where}: its chat template fails on a plain user/assistant exchange ({type(exc).__name__}: {exc}); "
                                 "fix chat_template in tokenizer_config.json (or chat_template.jinja)") from exc
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decoded = tokenizer.decode(ids, skip_special_tokens=False)
    # A normaliser (NFKC, lowercasing) may legitimately change the text before it is split; its output is what a
    # faithful tokenizer gives back.
    normalizer = getattr(getattr(tokenizer, "backend_tokenizer", None), "normalizer", None)
    expected = {text, normalizer.normalize_str(text)} if normalizer is not None else {text}
    if "".join(decoded.split()) not in {"".join(t.split()) for t in expected}:
        raise ModelLoadError(
            f"{where} does not reproduce text: {text[:80]!r} encodes to {len(ids)} ids that decode to {decoded[:80]!r}. transformers "
            f"loaded it as {type(tokenizer).__name__}; a tokenizer of one kind reloaded as another (transformers 5 picks the class from "
            "config.json's model_type: a word-level one beside a qwen2 config) loses its vocabulary or merges this way. Use the LLM's own tokenizer files; "
            "for a tiny stand-in LLM, `mmdomain tiny-llm --jsonl DATA --out DIR` writes a model and tokenizer that fit"
        )


def load_llm(spec: LLMSpec) -> tuple[Any, Any]:
    """(model, tokenizer) from ``spec.path`` with ``local_files_only``; the tokenizer gets a pad token if it has none."""
    from transformers import AutoModelForCausalLM

    path = check_local_dir(spec.path, "LLM path")
    tokenizer = load_tokenizer(path)
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
    with warnings.catch_warnings():
        # peft asks transformers 5 a deprecated question on every wrap; the warning is theirs to settle and tells a
        # user of every LoRA run nothing they can act on.
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, config)
