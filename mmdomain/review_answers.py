"""The two answers the review page shows: two samples of the model (``pair``) or the model's greedy answer beside the
reference (``reference``, in a seeded random order so the expert cannot tell which is which by position).

Sampling calls the LLM's own ``generate`` on the spliced embeddings (``MultimodalLM.embed``) with ``do_sample``,
kept local to this module; of the LLM's generation config only its stop tokens apply (as ``MultimodalLM.generate``
does), so what is sampled depends on the temperature and top-p given here and on nothing the LLM ships with.
Each item's draws are seeded from ``seed`` and its key: a restarted review shows the same answers for an item.
"""
from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .evaluate import to_device
from .model import MultimodalLM, neutral_generation_settings
from .processor import MultimodalProcessor
from .review_items import ReviewItem

Mode = Literal["pair", "reference"]


@dataclass(frozen=True)
class Sampling:
    mode: Mode = "pair"
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 64
    seed: int = 0
    redraws: int = 3
    """pair mode: further draws of two when both samples come out the same text (a confident or tiny model)."""


@dataclass(frozen=True)
class Answers:
    texts: tuple[str, str]
    sources: tuple[str, str]
    """Where each answer comes from: ``sample`` (pair mode), ``model`` or ``reference``."""

    @property
    def same(self) -> bool:
        return self.texts[0].strip() == self.texts[1].strip()


def item_seed(seed: int, key: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(key.encode())) % (2**31)


@torch.no_grad()
def generate_texts(model: MultimodalLM, processor: MultimodalProcessor, item: ReviewItem, *, count: int, sample: bool,
                   settings: Sampling, seed: int) -> list[str]:
    """``count`` answers to the item's question: sampled (temperature, top-p) or greedy."""
    device = model.causal_lm.get_input_embeddings().weight.device
    inputs = processor(item.prompt_turns, item.record.media, key=item.key, add_generation_prompt=True)
    batch = to_device(processor.collate([inputs], padding_side="left"), device)
    embeds = model.embed(batch["input_ids"], batch["media"])
    tokenizer = processor.tokenizer
    stops = [model.llm.generation_config.eos_token_id, tokenizer.eos_token_id]
    eos = sorted({int(t) for s in stops if s is not None for t in (s if isinstance(s, (list, tuple)) else [s])})
    options: dict[str, Any] = {**neutral_generation_settings(), "max_new_tokens": settings.max_new_tokens,
                               "pad_token_id": tokenizer.pad_token_id, "eos_token_id": eos or None,
                               "suppress_tokens": [token_id for _, _, token_id in model.kind_parts()]}
    if sample:
        options.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p, num_return_sequences=count)
    torch.manual_seed(seed)
    new = model.llm.generate(inputs_embeds=embeds, attention_mask=batch["attention_mask"], **options)
    texts = [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return texts if sample else texts * count


def answers_for(model: MultimodalLM, processor: MultimodalProcessor, item: ReviewItem, settings: Sampling) -> Answers:
    seed = item_seed(settings.seed, item.key)
    was_training = model.training
    model.eval()
    try:
        if settings.mode == "reference":
            answer = generate_texts(model, processor, item, count=1, sample=False, settings=settings, seed=seed)[0]
            pair = [(answer, "model"), (item.reference, "reference")]
            random.Random(seed).shuffle(pair)
            return Answers((pair[0][0], pair[1][0]), (pair[0][1], pair[1][1]))
        texts: list[str] = []
        for draw in range(settings.redraws + 1):
            texts = generate_texts(model, processor, item, count=2, sample=True, settings=settings, seed=seed + draw)
            if texts[0] != texts[1]:
                break
        return Answers((texts[0], texts[1]), ("sample", "sample"))
    finally:
        model.train(was_training)
