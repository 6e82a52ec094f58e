"""Verifiable rewards for GRPO: a small registry of functions that score one sampled answer against its sample.

A verifier is built from its recipe options once (``make(options) -> score``) and scores an answer as
``score(answer, reference, choices) -> float`` (``reference``: the sample's own answer; ``choices``: a closed
question's choices or None). Shipped: ``exact_choice``, ``regex``, ``f1``, ``format`` and ``sum`` (weighted parts,
e.g. correctness plus format). Add one in Python with ``@register_verifier("name")``, or from a package through the
``mmdomain.verifiers`` entry-point group (the entry point names a factory as above); recipes name verifiers by name,
never by import path.
"""
from __future__ import annotations

import re
from importlib.metadata import entry_points
from typing import Any, Callable

from ..errors import MmdomainError
from ..evaluate import normalise_answer, token_recall_f1

Score = Callable[[str, str, "list[str] | None"], float]
ENTRY_POINT_GROUP = "mmdomain.verifiers"
_REGISTRY: dict[str, Callable[[dict[str, Any]], Score]] = {}
_PUNCTUATION = re.compile(r"[^\w\s]")


class VerifierError(MmdomainError, ValueError):
    """An unknown verifier or options it does not take; the message names it and the fix."""


def register_verifier(name: str) -> Callable[[Callable[[dict[str, Any]], Score]], Callable[[dict[str, Any]], Score]]:
    def add(factory: Callable[[dict[str, Any]], Score]) -> Callable[[dict[str, Any]], Score]:
        _REGISTRY[name] = factory
        return factory

    return add


def available_verifiers() -> list[str]:
    return sorted({*_REGISTRY, *(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))})


def make_verifier(name: str, options: dict[str, Any] | None = None) -> Score:
    """The scoring function of verifier ``name`` with ``options`` (grpo.verifier in a recipe)."""
    factory = _REGISTRY.get(name)
    if factory is None:
        found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
        if not found:
            raise VerifierError(f"grpo.verifier.name: no verifier {name!r} (known: {', '.join(available_verifiers())}); register one "
                                f"with @register_verifier or a package's {ENTRY_POINT_GROUP!r} entry point")
        factory = found[0].load()
    try:
        return factory(dict(options or {}))
    except (TypeError, ValueError, KeyError, re.error) as exc:
        raise VerifierError(f"grpo.verifier {name!r}: options {options} are not usable ({exc})") from None


def _take(options: dict[str, Any], name: str, allowed: set[str]) -> None:
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r} for {name} (options: {', '.join(sorted(allowed)) or 'none'})")


def mentioned_choices(answer: str, choices: list[str]) -> list[str]:
    """The choices an answer names as whole words, longer choices first, so 'upper left' is not also read as 'left'."""
    text = f" {normalise_answer(_PUNCTUATION.sub(' ', answer))} "  # '<answer>upper left</answer>' names a choice too
    found = []
    for choice in sorted(choices, key=lambda c: -len(normalise_answer(c))):
        words = normalise_answer(choice)
        if words and f" {words} " in text:
            found.append(choice)
            text = text.replace(f" {words} ", "  ")
    return found


@register_verifier("exact_choice")
def exact_choice(options: dict[str, Any]) -> Score:
    """1 for the right answer of a closed question, else 0. ``match: exact`` (default): the normalised answer equals
    the reference; ``match: contains``: the answer names exactly one choice, the right one ("It is in the upper left
    quadrant."); naming two choices never scores. ``invalid``: the reward of an answer naming no choice (default 0;
    a negative value discourages off-set answers more than wrong ones)."""
    _take(options, "exact_choice", {"match", "invalid"})
    match, invalid = options.get("match", "exact"), float(options.get("invalid", 0.0))
    if match not in ("exact", "contains"):
        raise ValueError(f"match is exact or contains, got {match!r}")

    def score(answer: str, reference: str, choices: list[str] | None) -> float:
        said = normalise_answer(answer)
        if match == "exact":
            if said == normalise_answer(reference):
                return 1.0
            return 0.0 if not choices or said in {normalise_answer(c) for c in choices} else invalid
        named = mentioned_choices(answer, choices or [reference])
        if not named:
            return invalid
        return 1.0 if len(named) == 1 and normalise_answer(named[0]) == normalise_answer(reference) else 0.0

    return score


@register_verifier("regex")
def regex(options: dict[str, Any]) -> Score:
    """``pattern`` searched in the answer. Without a group: 1 when it matches. With a group (the first, or one named
    ``answer``): 1 when the captured text equals the reference (normalised), e.g. ``pattern: '<answer>(.*?)</answer>'``."""
    _take(options, "regex", {"pattern", "flags"})
    if "pattern" not in options:
        raise ValueError("regex needs options.pattern")
    flags = re.IGNORECASE | re.DOTALL if options.get("flags", "is") == "is" else 0
    pattern = re.compile(str(options["pattern"]), flags)

    def score(answer: str, reference: str, choices: list[str] | None) -> float:
        found = pattern.search(answer)
        if found is None:
            return 0.0
        if not pattern.groups:
            return 1.0
        captured = found.group("answer") if "answer" in pattern.groupindex else found.group(1)
        return float(normalise_answer(captured or "") == normalise_answer(reference))

    return score


@register_verifier("f1")
def f1(options: dict[str, Any]) -> Score:
    """Token F1 against the reference (SQuAD normalisation), for open answers."""
    _take(options, "f1", set())
    return lambda answer, reference, choices: token_recall_f1(answer, reference)[1]


@register_verifier("format")
def format_reward(options: dict[str, Any]) -> Score:
    """1 when the whole answer matches ``pattern`` (default: ``<think>...</think> <answer>...</answer>``, the R1 layout)
    and, with ``max_words``, is at most that long."""
    _take(options, "format", {"pattern", "max_words"})
    pattern = re.compile(str(options.get("pattern", r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*")), re.DOTALL)
    max_words = options.get("max_words")

    def score(answer: str, reference: str, choices: list[str] | None) -> float:
        if max_words is not None and len(answer.split()) > int(max_words):
            return 0.0
        return float(pattern.fullmatch(answer) is not None)

    return score


@register_verifier("sum")
def weighted_sum(options: dict[str, Any]) -> Score:
    """``parts: [{name, options, weight}]``: the weighted sum of other verifiers (correctness + 0.2 x format)."""
    _take(options, "sum", {"parts"})
    parts = [(make_verifier(p["name"], p.get("options")), float(p.get("weight", 1.0))) for p in options["parts"]]
    if not parts:
        raise ValueError("sum needs at least one part")
    return lambda answer, reference, choices: sum(w * f(answer, reference, choices) for f, w in parts)
