"""GRPO verifiers: each shipped reward on right, wrong and malformed answers, the registry and its errors."""
from __future__ import annotations

import pytest

from mmdomain.objectives import verifiers
from mmdomain.objectives.verifiers import VerifierError, available_verifiers, make_verifier, register_verifier

CHOICES = ["upper left", "upper right", "lower left", "lower right"]


def test_exact_choice():
    exact = make_verifier("exact_choice")
    assert exact("Upper left.", "upper left", CHOICES) == 1.0
    assert exact("upper right", "upper left", CHOICES) == 0.0
    assert make_verifier("exact_choice", {"invalid": -0.5})("banana", "upper left", CHOICES) == -0.5
    contains = make_verifier("exact_choice", {"match": "contains"})
    assert contains("The lesion is in the upper left quadrant.", "upper left", CHOICES) == 1.0
    assert contains("upper left or lower right", "upper left", CHOICES) == 0.0  # two choices named never scores
    assert contains("left", "upper left", CHOICES) == 0.0  # 'left' alone is no choice here
    assert contains("left", "left", ["left", "right"]) == 1.0


def test_regex_f1_format_and_sum():
    assert make_verifier("regex", {"pattern": r"<answer>(.*?)</answer>"})("<answer> Upper left </answer>", "upper left", None) == 1.0
    assert make_verifier("regex", {"pattern": r"<answer>(.*?)</answer>"})("<answer>lower</answer>", "upper left", None) == 0.0
    assert make_verifier("regex", {"pattern": r"\d+ mm"})("about 12 mm", "x", None) == 1.0
    assert make_verifier("f1")("a small effusion on the left", "small left effusion", None) == pytest.approx(2 * 0.75 / 1.75)  # articles dropped: 3 of 4 words match
    fmt = make_verifier("format")
    assert fmt("<think>bright spot top left</think> <answer>upper left</answer>", "", None) == 1.0
    assert fmt("upper left", "", None) == 0.0
    both = make_verifier("sum", {"parts": [{"name": "exact_choice", "options": {"match": "contains"}},
                                           {"name": "format", "weight": 0.2}]})
    assert both("<think>x</think><answer>upper left</answer>", "upper left", CHOICES) == pytest.approx(1.2)


def test_registry_errors_and_extension(monkeypatch):
    with pytest.raises(VerifierError, match="no verifier 'nope' .*exact_choice"):
        make_verifier("nope")
    with pytest.raises(VerifierError, match="unknown option 'patern'"):
        make_verifier("regex", {"patern": "x"})
    with pytest.raises(VerifierError, match="match is exact or contains"):
        make_verifier("exact_choice", {"match": "fuzzy"})
    monkeypatch.setattr(verifiers, "_REGISTRY", dict(verifiers._REGISTRY))

    @register_verifier("short")
    def short(options):
        return lambda answer, reference, choices: float(len(answer.split()) <= options.get("words", 3))

    assert "short" in available_verifiers() and make_verifier("short", {"words": 2})("upper left", "", None) == 1.0


def test_entry_point_verifiers_are_found(monkeypatch):
    class EntryPoint:
        name = "from_package"

        def load(self):
            return lambda options: (lambda answer, reference, choices: 0.5)

    monkeypatch.setattr(verifiers, "entry_points", lambda group: [EntryPoint()] if group == verifiers.ENTRY_POINT_GROUP else [])
    assert "from_package" in available_verifiers() and make_verifier("from_package")("a", "b", None) == 0.5
