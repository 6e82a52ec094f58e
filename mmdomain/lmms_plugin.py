"""The `lmms_eval.models` entry point: tells lmms-eval (0.7.3+) that `--model mmdomain` is ``lmms_model.MmdomainLMM``.
Light on purpose: lmms-eval loads every plugin's entry point at start-up, so nothing heavy is imported here."""
from __future__ import annotations

from typing import Any

MODEL_ID = "mmdomain"


def manifest() -> Any:
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path="mmdomain.lmms_model.MmdomainLMM")
