"""Evaluation: closed-set accuracy (choice log-likelihood, else normalised exact match) and open-set token
recall / F1 (the VQA-RAD / SLAKE convention), over shards; the same code runs during training."""
from __future__ import annotations

import json
import logging
import re
import string
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import torch
from tqdm import tqdm

from .data import FailureBudget, Record, SampleFormat, expand_shards, iter_records
from .device import to_device
from .generation import GenerationOptions, generate_batch
from .model import MultimodalLM
from .processor import MultimodalProcessor

log = logging.getLogger(__name__)

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalise_answer(text: str) -> str:
    """Lower case, no punctuation or articles, single spaces (the SQuAD/VQA normalisation)."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_recall_f1(prediction: str, target: str) -> tuple[float, float]:
    pred, gold = normalise_answer(prediction).split(), normalise_answer(target).split()
    if not gold:
        return float(not pred), float(not pred)
    common = sum((Counter(pred) & Counter(gold)).values())
    recall = common / len(gold)
    precision = common / len(pred) if pred else 0.0
    f1 = 2 * precision * recall / (precision + recall) if common else 0.0
    return recall, f1


def _split(record: Record) -> tuple[list[dict[str, Any]], str]:
    """(prompt turns, target answer): the target is the final assistant turn."""
    turns = record.conversations
    if not turns or turns[-1]["role"] != "assistant":
        raise ValueError(f"sample {record.key}: the last turn must be the assistant's answer to evaluate it")
    return turns[:-1], turns[-1]["content"]


@torch.no_grad()
def _choose(model: MultimodalLM, processor: MultimodalProcessor, records: list[Record], device: torch.device,
            score: str = "mean") -> list[tuple[str, bool]]:
    """Each record's choice with the highest log-likelihood (per token when ``score`` is mean, so a longer answer
    is not penalised for its length), and whether another choice tied with it (e.g. words the tokenizer maps to
    the same unknown id: the first choice then wins by position, not by the model)."""
    samples, owners = [], []
    for i, record in enumerate(records):
        prompt, _ = _split(record)
        for choice in record.choices:
            samples.append(processor(prompt + [{"role": "assistant", "content": choice}], record.media, key=record.key))
            owners.append((i, choice))
    scores = model.sequence_logprobs(**to_device(processor.collate(samples), device), mean=score == "mean").cpu().tolist()
    per_record: dict[int, list[tuple[float, str]]] = {}
    for value, (i, choice) in zip(scores, owners):
        per_record.setdefault(i, []).append((value, choice))
    out = []
    for i in range(len(records)):
        ranked = per_record[i]
        best = max(ranked, key=lambda item: item[0])  # max keeps the first of equal scores
        tied = sum(1 for value, _ in ranked if abs(value - best[0]) <= 1e-6 * max(1.0, abs(best[0]))) > 1
        out.append((best[1], tied))
    return out


def unknown_token_choices(tokenizer: Any, choices: list[str], cache: dict[str, bool] | None = None) -> list[str]:
    """The choices with a token the tokenizer does not know (its ``unk_token_id``): the model cannot tell such
    choices apart by those words, and choices made only of them score the same. Empty for a tokenizer without an
    unknown token (byte-level BPE never needs one)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return []
    cache = {} if cache is None else cache
    for choice in choices:
        if choice not in cache:
            cache[choice] = unk in tokenizer(choice, add_special_tokens=False)["input_ids"]
    return [c for c in choices if cache[c]]


def _generate(model: MultimodalLM, processor: MultimodalProcessor, records: list[Record], device: torch.device,
              options: GenerationOptions) -> list[str]:
    samples = [processor(_split(r)[0], r.media, key=r.key, add_generation_prompt=True) for r in records]
    return [c.text for c in generate_batch(model, processor, samples, options, device)]


def predict_records(model: MultimodalLM, processor: MultimodalProcessor, records: list[Record], device: torch.device, *,
                    choice_score: str = "mean", generation: GenerationOptions = GenerationOptions()) -> list[tuple[str, bool]]:
    """Each record's prediction and whether it was a tie: a record with ``choices`` gets its most likely choice, any
    other its generated answer. The one rule evaluation scores by (``evaluate_records``, the lmms-eval plugin)."""
    # Predictions by position, not by key: keys from two folders of shards may repeat.
    with_choices = [i for i, r in enumerate(records) if r.choices]
    free = [i for i, r in enumerate(records) if not r.choices]
    preds: dict[int, tuple[str, bool]] = {}
    if with_choices:
        preds.update(zip(with_choices, _choose(model, processor, [records[i] for i in with_choices], device, choice_score)))
    if free:
        preds.update((i, (text, False)) for i, text in zip(free, _generate(model, processor, [records[i] for i in free], device, generation)))
    return [preds[i] for i in range(len(records))]


def evaluate_records(model: MultimodalLM, processor: MultimodalProcessor, records: Iterable[Record], *, batch_size: int = 16,
                     max_new_tokens: int = 32, predictions_path: str | Path | None = None, progress: bool = False,
                     choice_score: str = "mean", device: torch.device | str | None = None,
                     generation: GenerationOptions | None = None) -> dict[str, Any]:
    """Metrics over records. A record with ``choices`` is scored by log-likelihood; otherwise its answer is generated
    (greedily unless ``generation`` says otherwise; its max_new_tokens then wins). ``answer_type`` (closed/open)
    defaults to closed when choices exist, else open. Every batch goes to ``device``: the caller's (the recipe's or
    ``--device``), else where the LLM's embeddings are (an encoder may sit elsewhere, e.g. after a feature cache)."""
    device = torch.device(device) if device is not None else model.causal_lm.get_input_embeddings().weight.device
    options = generation or GenerationOptions(max_new_tokens=max_new_tokens)
    was_training = model.training
    model.eval()
    rows: list[dict[str, Any]] = []
    chunk: list[Record] = []
    unknown_cache: dict[str, bool] = {}

    def flush() -> None:
        preds = predict_records(model, processor, chunk, device, choice_score=choice_score, generation=options)
        for i, r in enumerate(chunk):
            target = _split(r)[1]
            kind = r.answer_type or ("closed" if r.choices else "open")
            prediction, tied = preds[i]
            recall, f1 = token_recall_f1(prediction, target)
            rows.append({"key": r.key, "type": kind, "prediction": prediction, "target": target, "tied": tied,
                         "unknown_choices": unknown_token_choices(processor.tokenizer, list(r.choices or []), unknown_cache),
                         "correct": normalise_answer(prediction) == normalise_answer(target), "recall": recall, "f1": f1})
        chunk.clear()

    for record in tqdm(records, desc="eval", disable=not progress, leave=False):
        chunk.append(record)
        if len(chunk) >= batch_size:
            flush()
    if chunk:
        flush()
    model.train(was_training)
    if predictions_path is not None:
        with open(predictions_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    report = summarise(rows)
    warn_about_choices(report, rows)
    return report


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    closed = [r for r in rows if r["type"] == "closed"]
    open_ = [r for r in rows if r["type"] == "open"]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {
        "samples": len(rows),
        "exact_match": mean([float(r["correct"]) for r in rows]),
        "closed": {"samples": len(closed), "accuracy": mean([float(r["correct"]) for r in closed]),
                   "ties": sum(1 for r in closed if r.get("tied")),
                   "unknown_token_choices": sum(len(r.get("unknown_choices", ())) for r in closed),
                   "questions_with_unknown_token_choices": sum(1 for r in closed if r.get("unknown_choices"))},
        "open": {"samples": len(open_), "token_recall": mean([r["recall"] for r in open_]), "token_f1": mean([r["f1"] for r in open_])},
    }


def evaluate_shards(model: MultimodalLM, processor: MultimodalProcessor, patterns: str | list[str], *, max_samples: int | None = None,
                    batch_size: int = 16, max_new_tokens: int = 32, error_budget: int = 10,
                    predictions_path: str | Path | None = None, progress: bool = False,
                    layout: SampleFormat = SampleFormat(), choice_score: str = "mean", device: torch.device | str | None = None,
                    generation: GenerationOptions | None = None) -> dict[str, Any]:
    shards = expand_shards(patterns)
    failures = FailureBudget(error_budget)

    def limited() -> Iterable[Record]:
        for n, record in enumerate(iter_records(shards, processor.domains, failures=failures, layout=layout,
                                                media_token=processor.media_token)):
            if max_samples is not None and n >= max_samples:
                return
            yield record

    report = evaluate_records(model, processor, limited(), batch_size=batch_size, max_new_tokens=max_new_tokens,
                              predictions_path=predictions_path, progress=progress, choice_score=choice_score,
                              device=device, generation=generation)
    report["skipped_samples"] = failures.total
    return report


def warn_about_choices(report: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Log what makes closed-set accuracy mean less than it seems: ties (the first listed choice wins by position,
    so a model that scores every choice the same gets exactly chance on balanced data and looks merely untrained)
    and choices the tokenizer cannot spell (the usual cause of such ties)."""
    closed = report["closed"]
    if closed["ties"]:
        log.warning("%d of %d closed questions had two or more choices scored the same: the first listed choice won by position, "
                    "not by the model (on balanced data that is exactly chance); often the tokenizer maps the answer words to one "
                    "unknown id", closed["ties"], closed["samples"])
    if closed["unknown_token_choices"]:
        examples = list(dict.fromkeys(c for r in rows for c in r.get("unknown_choices", ())))
        log.warning("%d answer choices in %d closed questions contain the tokenizer's unknown token (e.g. %s), so the model cannot "
                    "tell them apart by those words. Use an LLM whose tokenizer covers the answers; for a tiny stand-in, "
                    "`mmdomain tiny-llm --jsonl YOUR_SAMPLES.jsonl --out DIR` writes one that does",
                    closed["unknown_token_choices"], closed["questions_with_unknown_token_choices"],
                    ", ".join(repr(c) for c in examples[:5]))
