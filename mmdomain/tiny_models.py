"""Tiny random-init causal LMs and word-level tokenizers written to a local directory: for tests, the demo, and
`mmdomain tiny-llm`, which makes a stand-in LLM whose vocabulary covers every word of one's own JSONL."""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import string
from pathlib import Path
from typing import Any, Iterable, Sequence

from .domains import MARKER_LIKE
from .errors import MmdomainError
from .table_rows import read_table_rows

log = logging.getLogger(__name__)

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
PLAIN_TEMPLATE_WORDS = ["User:", "Assistant:"]

# ChatML, as Qwen writes it, but with a space on both sides of every word: a word-level tokenizer splits on
# whitespace only, so `<|im_start|>user` would otherwise be one unknown word, and decoding (tokens joined by
# spaces) would not give back the rendered text. `<|im_end|>` is the EOS, so generation stops at the end of a turn.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)
TINY_CHAT_MARKERS = ["<|im_start|>", "<|im_end|>"]
TINY_CHAT_ROLES = ["system", "user", "assistant"]
MEDIA_MARKERS = ["<image>", "<audio>"]
"""Media markers always in a stand-in's vocabulary (any other marker is found in the JSONL)."""
# Chat markers (<|...|>) and media-marker names become special tokens; any other <word> (HTML in an answer, say) stays a
# plain word, so decoding an answer with skip_special_tokens keeps it.
_MARKER = re.compile(r"<\|[A-Za-z][\w-]*\|>|" + MARKER_LIKE.pattern, re.IGNORECASE)


class TinyModelError(MmdomainError, ValueError):
    """Bad input for `mmdomain tiny-llm`; the message names the file (and line) or the option, and the fix."""


def word_tokenizer(words: Iterable[str], *, chat_template: str | None = None, special: Sequence[str] = (),
                   eos_token: str = "</s>", char_fallback: bool = False):
    """A fast tokenizer whose vocabulary is exactly ``words`` (split on whitespace, punctuation kept on words).

    Words written like ``<|im_end|>``, and those in ``special`` (media markers such as ``<image>``), become special
    tokens, matched even without surrounding spaces, as in a real chat tokenizer. ``eos_token`` must be one of them
    or of ``SPECIAL``. With ``char_fallback`` a word outside ``words`` is spelled in characters (WordPiece pieces
    ``h ##e ##l ##l ##o``; printable ASCII and every character of ``words``) instead of becoming ``<unk>``, so any
    such text decodes back to itself, modulo whitespace.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for w in [*SPECIAL, *PLAIN_TEMPLATE_WORDS, *special, *words]:
        vocab.setdefault(w, len(vocab))
    if eos_token not in vocab:
        raise ValueError(f"eos_token {eos_token!r} is not in the vocabulary; add it to words or special")
    if char_fallback:
        chars = sorted({c for w in vocab for c in w} | set(string.printable) - set(string.whitespace))
        for piece in [*chars, *(f"##{c}" for c in chars)]:
            vocab.setdefault(piece, len(vocab))
        # WordPiece takes the longest vocabulary entry first, so a known word stays one token.
        # A longer word (a URL) would otherwise become <unk> although it is in the vocabulary.
        longest = max(len(w) for w in vocab)
        core = Tokenizer(models.WordPiece(vocab=vocab, unk_token="<unk>", continuing_subword_prefix="##",
                                          max_input_chars_per_word=max(100, longest + 1)))
        core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # cleanup would drop the space in "lesion ?"
    else:
        core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token=eos_token, unk_token="<unk>")
    markers = [w for w in vocab if (w.startswith("<|") and w.endswith("|>")) or w in special]
    if markers:
        tok.add_tokens(markers, special_tokens=True)
    if chat_template:
        tok.chat_template = chat_template
    return tok


def write_tiny_llm(directory: str | Path, words: Iterable[str], *, hidden: int = 128, layers: int = 2, heads: int = 4,
                   ffn: int = 256, seed: int = 0, tie_word_embeddings: bool = False, chat_template: str | None = None,
                   special: Sequence[str] = (), eos_token: str = "</s>", char_fallback: bool = False) -> Path:
    """Save a random-init Llama (0.3 M parameters at the defaults) and its tokenizer to ``directory``.

    To make one from a JSONL of samples, use ``write_tiny_llm_for`` (`mmdomain tiny-llm`): a word missing from
    ``words`` tokenizes to ``<unk>``, and choices that all do score the same."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    tok = word_tokenizer(words, chat_template=chat_template, special=special, eos_token=eos_token, char_fallback=char_fallback)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)  # do not disturb the caller's random stream
    model.save_pretrained(str(directory))
    tok.save_pretrained(str(directory))
    return directory


def jsonl_texts(path: str | Path) -> Iterable[str]:
    """Every text a samples JSONL line can hold (the make-shards schema, plus ``messages`` as chat datasets write it):
    caption, question, answer, each choice, and the content of every conversation turn."""
    path = Path(path)
    if not path.is_file():
        raise TinyModelError(f"samples file {str(path)!r} does not exist; give a JSONL of samples with --jsonl")
    for line_no, record in read_table_rows(path, TinyModelError, jsonl=True):
        where = f"{path}:{line_no}"
        texts = _record_texts(record, where)
        if not texts:
            raise TinyModelError(f"{where}: no text found; a sample needs 'conversations' (or 'messages'), "
                                 f"'question' + 'answer', or 'caption' (keys: {sorted(record)})")
        yield from texts


def _record_texts(record: dict[str, Any], where: str) -> list[str]:
    texts = [str(record[k]) for k in ("caption", "question", "answer") if record.get(k) is not None]
    choices = record.get("choices", [])
    if not isinstance(choices, list):
        raise TinyModelError(f"{where}: 'choices' must be a list of answers, got {type(choices).__name__}")
    texts += [str(c) for c in choices]
    for field in ("conversations", "messages"):
        turns = record.get(field, [])
        if not isinstance(turns, list):
            raise TinyModelError(f"{where}: {field!r} must be a list of turns, got {type(turns).__name__}")
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise TinyModelError(f"{where}: {field}[{i}] must be an object with role and content")
            content = turn.get("content", turn.get("value"))
            parts = content if isinstance(content, list) else [content]  # multimodal parts: {"type": "text", "text": ...}
            texts += [p.get("text", "") if isinstance(p, dict) else str(p) for p in parts if p is not None]
    return texts


def vocabulary_of(texts: Iterable[str]) -> tuple[list[str], list[str]]:
    """(words, markers) in order of first appearance: what a word-level tokenizer needs so no text maps to ``<unk>``.
    Markers (``<image>``, ``<|im_end|>``) are cut out first, because the tokenizer matches them inside words too."""
    words: dict[str, None] = {}
    markers: dict[str, None] = {}
    for text in texts:
        for marker in _MARKER.findall(text):
            markers.setdefault(marker, None)
        for word in _MARKER.sub(" ", text).split():
            words.setdefault(word, None)
    return list(words), list(markers)


def write_tiny_llm_for(jsonl_paths: str | Path | Sequence[str | Path], out: str | Path, *, hidden: int = 128, layers: int = 2,
                       seed: int = 0, caption_prompt: str = "Describe the image.", overwrite: bool = False) -> dict[str, Any]:
    """Write a random tiny Llama to ``out`` whose word-level vocabulary covers every word of the JSONL files (every
    choice included), the chat template's words and the media markers; return a summary.

    A stand-in for trying a recipe on a laptop (``model.llm.path=OUT``): it knows no language, so train it
    (``trainable.llm=full``) or expect chance. ``caption_prompt`` is the user turn make-shards writes for captions.
    Words the files do not hold (a held-out set not given) are spelled in characters rather than mapped to ``<unk>``.
    The model has ``TINY_CHAT_TEMPLATE``, ChatML with ``<|im_end|>`` as EOS, so the processor renders prompts with it.
    """
    paths = [Path(p) for p in ([jsonl_paths] if isinstance(jsonl_paths, (str, Path)) else jsonl_paths)]
    if not paths:
        raise TinyModelError("no samples file given; pass --jsonl data.jsonl (repeat it for several files)")
    if hidden < 8 or hidden % 4:
        raise TinyModelError(f"--hidden {hidden}: give a multiple of 4 (the model has 4 attention heads), at least 8")
    if layers < 1:
        raise TinyModelError(f"--layers {layers}: give at least 1")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TinyModelError(f"--out {str(out)!r} is a file; give a folder path")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise TinyModelError(f"--out {str(out)!r} is not empty; choose another folder, or pass --overwrite to replace the model in it")
        if not (out / "config.json").is_file():
            # --overwrite replaces a model folder, never a folder of one's own files named by mistake.
            raise TinyModelError(f"--out {str(out)!r} holds files but no config.json, so it is not a model folder; "
                                 "--overwrite only replaces a model: choose another folder")

    words, markers = vocabulary_of([caption_prompt, *(t for p in paths for t in jsonl_texts(p))])
    markers = list(dict.fromkeys([*TINY_CHAT_MARKERS, *MEDIA_MARKERS, *markers]))
    words = list(dict.fromkeys([*TINY_CHAT_ROLES, *words]))
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written beside ``out`` and moved in whole, so an interrupted write never leaves half a model under ``out``.
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)  # this process's own leftover, if any
    staging.mkdir()
    try:
        write_tiny_llm(staging, words, hidden=hidden, layers=layers, heads=4, ffn=2 * hidden, seed=seed,
                       chat_template=TINY_CHAT_TEMPLATE, special=markers, eos_token="<|im_end|>", char_fallback=True)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    from safetensors import safe_open

    vocab_size = int(json.loads((out / "config.json").read_text())["vocab_size"])
    with safe_open(str(out / "model.safetensors"), "pt") as weights:
        parameters = sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())
    summary = {"path": str(out), "vocab_size": vocab_size, "words": len(words), "markers": markers,
               "hidden": hidden, "layers": layers, "seed": seed, "parameters": parameters, "sources": [str(p) for p in paths]}
    log.info("wrote a tiny random Llama with %d tokens to %s", vocab_size, out)
    return summary
