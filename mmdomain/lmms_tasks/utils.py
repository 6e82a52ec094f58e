"""The functions the lmms-eval task templates name (``!function mmdomain.lmms_tasks.utils.*``): a doc is one line of
the index `mmdomain lmms-task` writes (shard, key, question, answer, choices, answer_type); scores are mmdomain's own
(normalised exact match; token recall / F1 for open answers), so lmms-eval reports what `mmdomain eval` reports."""
from __future__ import annotations

from typing import Any

from mmdomain.evaluate import normalise_answer, token_recall_f1


def doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    """Nothing for lmms-eval to load: the mmdomain model reads the sample's media from its shard with the run's own
    domain decoders (windowing, band statistics, resampling), exactly as `mmdomain eval` does."""
    return []


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    choices = f" ({' / '.join(doc['choices'])})" if doc.get("choices") and kwargs.get("list_choices") else ""
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{choices}{kwargs.get('post_prompt', '')}"


def doc_to_target(doc: dict[str, Any]) -> str:
    return doc["answer"]


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, Any]:
    """Per doc: exact match always; closed accuracy for closed questions, token recall / F1 for open ones (None where a
    metric does not apply; the aggregations skip those)."""
    prediction = results[0] if results else ""
    correct = float(normalise_answer(prediction) == normalise_answer(doc["answer"]))
    closed = doc.get("answer_type") == "closed"
    recall, f1 = token_recall_f1(prediction, doc["answer"])
    return {"exact_match": correct, "closed_accuracy": correct if closed else None,
            "open_token_recall": None if closed else recall, "open_token_f1": None if closed else f1, "accuracy": correct}


def mean_of_present(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None
