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
def _choose(model: MultimodalLM, processor: MultimodalProcessor, records: list[Record], device: torch.device) -> list[str]:
    """Pick each record's choice with the highest summed log-likelihood."""
    samples, owners = [], []
    for i, record in enumerate(records):
        prompt, _ = _split(record)
        for choice in record.choices:
            samples.append(processor(prompt + [{"role": "assistant", "content": choice}], record.media, key=record.key))
            owners.append((i, choice))
    scores = model.sequence_logprobs(**to_device(processor.collate(samples), device)).cpu().tolist()
    best: dict[int, tuple[float, str]] = {}
    for score, (i, choice) in zip(scores, owners):
        if i not in best or score > best[i][0]:
            best[i] = (score, choice)
    return [best[i][1] for i in range(len(records))]


@torch.no_grad()
def _generate(model: MultimodalLM, processor: MultimodalProcessor, records: list[Record], device: torch.device, max_new_tokens: int) -> list[str]:
    samples = [processor(_split(r)[0], r.media, key=r.key, add_generation_prompt=True) for r in records]
    batch = to_device(processor.collate(samples, padding_side="left"), device)
    new = model.generate(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"), extra_media=batch["extra_media"],
                         features=batch.get("features"), max_new_tokens=max_new_tokens,
                         pad_token_id=processor.tokenizer.pad_token_id)
    return [t.strip() for t in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A collated batch with its tensors on ``device``, the per-kind tensors of ``extra_media`` included."""
    def move(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.to(device, non_blocking=True)
        return [move(x) for x in v] if isinstance(v, list) and any(isinstance(x, torch.Tensor) for x in v) else v

    return {k: move(v) for k, v in batch.items()}


def evaluate_records(model: MultimodalLM, processor: MultimodalProcessor, records: Iterable[Record], *, batch_size: int = 16,
                     max_new_tokens: int = 32, predictions_path: str | Path | None = None, progress: bool = False) -> dict[str, Any]:
    """Metrics over records. A record with ``choices`` is scored by log-likelihood; otherwise its answer is generated.
    ``answer_type`` (closed/open) defaults to closed when choices exist, else open."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows: list[dict[str, Any]] = []
    chunk: list[Record] = []

    def flush() -> None:
        with_choices = [r for r in chunk if r.choices]
        free = [r for r in chunk if not r.choices]
        preds = dict(zip((r.key for r in with_choices), _choose(model, processor, with_choices, device) if with_choices else []))
        preds.update(zip((r.key for r in free), _generate(model, processor, free, device, max_new_tokens) if free else []))
        for r in chunk:
            target = _split(r)[1]
            kind = r.answer_type or ("closed" if r.choices else "open")
            recall, f1 = token_recall_f1(preds[r.key], target)
            rows.append({"key": r.key, "type": kind, "prediction": preds[r.key], "target": target,
                         "correct": normalise_answer(preds[r.key]) == normalise_answer(target), "recall": recall, "f1": f1})
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
    return summarise(rows)


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    closed = [r for r in rows if r["type"] == "closed"]
    open_ = [r for r in rows if r["type"] == "open"]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {
        "samples": len(rows),
        "exact_match": mean([float(r["correct"]) for r in rows]),
        "closed": {"samples": len(closed), "accuracy": mean([float(r["correct"]) for r in closed])},
        "open": {"samples": len(open_), "token_recall": mean([r["recall"] for r in open_]), "token_f1": mean([r["f1"] for r in open_])},
    }


def evaluate_shards(model: MultimodalLM, processor: MultimodalProcessor, patterns: str | list[str], *, max_samples: int | None = None,
                    batch_size: int = 16, max_new_tokens: int = 32, error_budget: int = 10,
                    predictions_path: str | Path | None = None, progress: bool = False,
                    layout: SampleFormat = SampleFormat()) -> dict[str, Any]:
    shards = expand_shards(patterns)
    failures = FailureBudget(error_budget)

    def limited() -> Iterable[Record]:
        for n, record in enumerate(iter_records(shards, processor.domains, failures=failures, split=False, layout=layout,
                                                         media_token=processor.media_token)):
            if max_samples is not None and n >= max_samples:
                return
            yield record

    report = evaluate_records(model, processor, limited(), batch_size=batch_size, max_new_tokens=max_new_tokens,
                              predictions_path=predictions_path, progress=progress)
    report["skipped_samples"] = len(failures.failures)
    return report
