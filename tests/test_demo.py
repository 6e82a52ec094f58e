"""The demo learns through the image: >= 0.95 held-out accuracy, and chance when images are shuffled."""
from __future__ import annotations

import json

import pytest

from mmdomain.cli import main
from mmdomain.demo import run_demo


@pytest.mark.slow
def test_demo_reaches_target_through_the_cli(tmp_path, capsys):
    assert main(["-q", "demo", "--out", str(tmp_path / "demo")]) == 0
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert {"heldout_accuracy_before", "heldout_accuracy_after", "chance", "seconds"} <= set(summary)
    assert summary["chance"] == 0.25 and summary["heldout_samples"] == 200
    assert summary["heldout_accuracy_before"] < 0.4
    assert summary["heldout_accuracy_after"] >= 0.95
    assert "held-out accuracy" in capsys.readouterr().out


@pytest.mark.slow
def test_shuffled_images_control_stays_near_chance(tmp_path):
    summary = run_demo(tmp_path / "control", shuffle_images=True)
    # The text alone carries no answer: with images shuffled against answers, held-out accuracy stays near 0.25
    # (the binomial 99 % band for 200 samples at p = 0.25 reaches about 0.33).
    assert summary["heldout_accuracy_after"] <= 0.35
    # Per answer token, guessing among 4 quadrants costs 2 ln 2 over 3 supervised tokens ("upper left </s>"): ~0.46.
    # A loss well below that would mean the control leaks the answer some other way.
    assert summary["instruct"]["final_loss"] > 0.4
