"""Tiny random-init causal LMs and word-level tokenizers written to a local directory, for tests and the demo."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
PLAIN_TEMPLATE_WORDS = ["User:", "Assistant:"]


def word_tokenizer(words: Iterable[str], *, chat_template: str | None = None):
    """A fast tokenizer whose vocabulary is exactly ``words`` (split on whitespace, punctuation kept on words).

    Words written like ``<|im_end|>`` become special tokens, matched even without surrounding spaces, as in a
    real chat tokenizer.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for w in [*SPECIAL, *PLAIN_TEMPLATE_WORDS, *words]:
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    markers = [w for w in vocab if w.startswith("<|") and w.endswith("|>")]
    if markers:
        tok.add_tokens(markers, special_tokens=True)
    if chat_template:
        tok.chat_template = chat_template
    return tok


def write_tiny_llm(directory: str | Path, words: Iterable[str], *, hidden: int = 128, layers: int = 2, heads: int = 4,
                   ffn: int = 256, seed: int = 0, tie_word_embeddings: bool = False, chat_template: str | None = None) -> Path:
    """Save a random-init Llama (0.3 M parameters at the defaults) and its tokenizer to ``directory``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    tok = word_tokenizer(words, chat_template=chat_template)
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
