"""`mmdomain demo`: synthetic scans -> shards -> tiny models -> align -> instruct -> held-out accuracy, on CPU.

Everything is generated locally (no downloads): the data (see demo_data), a word-level tokenizer and a random
tiny Llama. Held-out accuracy is measured before training and after each stage by answer log-likelihood over
the four quadrants (chance 0.25); ``summary.json`` in the run directory records it.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from . import demo_data
from .evaluate import evaluate_shards
from .builder import build_model
from .recipe import load_recipe
from .shards import make_shards
from .tiny_models import write_tiny_llm
from .train import seed_everything, train

log = logging.getLogger(__name__)

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
ALIGN = "demo/align_tinyvit_tinyllama.yaml"
INSTRUCT = "demo/instruct_tinyvit_tinyllama.yaml"


def recipes_dir() -> Path:
    if not RECIPES.is_dir():
        raise FileNotFoundError(f"the recipes folder {RECIPES} is missing; install mmdomain from a source checkout with `pip install -e .`")
    return RECIPES


def prepare(out: Path, *, seed: int, train_samples: int, heldout_samples: int, shuffle_images: bool) -> None:
    """Write the tiny LLM and the align / instruct / held-out shards under ``out``."""
    raw = out / "raw"
    write_tiny_llm(out / "tiny-llm", demo_data.vocabulary(), hidden=128, ffn=256, layers=2, heads=4, seed=seed)
    splits = {
        "align": dict(n=train_samples, seed=seed + 1, kind="caption", shuffle_images=shuffle_images),
        "instruct": dict(n=train_samples, seed=seed + 2, kind="vqa", shuffle_images=shuffle_images),
        "heldout": dict(n=heldout_samples, seed=seed + 3, kind="vqa"),  # always truthful: the test of learning
    }
    for name, options in splits.items():
        jsonl = demo_data.write_split(raw, name, **options)
        make_shards(jsonl, raw / "media", out / "shards", prefix=name, samples_per_shard=500, overwrite=True)


def stage_recipes(out: Path, *, llm: str | Path, align_train: str | Path, instruct_train: str | Path, heldout: str | Path,
                  seed: int = 0, threads: int | None = None, overrides: tuple[str, ...] = ()) -> tuple[Any, Any]:
    """The demo's align and instruct recipes on these shards and LLM, with runs in ``out/align`` and ``out/instruct``
    (instruct starts from align); ``overrides`` apply to both. Also what a test of other demo-like data trains with."""
    common = [f"model.llm.path={llm}", f"data.eval={heldout}", f"seed={seed}", "overwrite=true", *([f"threads={threads}"] if threads else [])]
    align = load_recipe(recipes_dir() / ALIGN, [*common, f"data.train={align_train}", f"output_dir={out / 'align'}", *overrides])
    instruct = load_recipe(recipes_dir() / INSTRUCT, [*common, f"data.train={instruct_train}", f"output_dir={out / 'instruct'}",
                                                     f"init_from={out / 'align'}", *overrides])
    return align, instruct


def run_demo(out: str | Path = "runs/demo", *, seed: int = 0, train_samples: int = 4000, heldout_samples: int = 200,
             shuffle_images: bool = False, threads: int | None = None, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run the whole demo and return (and write to ``{out}/summary.json``) its summary."""
    started = time.perf_counter()
    out = Path(out)
    log.info("demo: writing synthetic scans, shards and a tiny LLM under %s", out)
    prepare(out, seed=seed, train_samples=train_samples, heldout_samples=heldout_samples, shuffle_images=shuffle_images)

    shards = out / "shards"
    align, instruct = stage_recipes(out, llm=out / "tiny-llm", align_train=shards / "align-*.tar", instruct_train=shards / "instruct-*.tar",
                                    heldout=shards / "heldout-*.tar", seed=seed, threads=threads, overrides=overrides)

    seed_everything(seed)  # the untrained model is the one align starts from
    model, processor = build_model(align.model)
    before = evaluate_shards(model, processor, align.data.eval, max_samples=heldout_samples)
    log.info("held-out accuracy before training: %.3f", before["closed"]["accuracy"])
    align_result = train(align)
    instruct_result = train(instruct)

    summary = {
        "task": "quadrant of a lesion in synthetic 64x64 scans (4 choices)",
        "chance": 0.25,
        "heldout_samples": before["samples"],
        "heldout_accuracy_before": before["closed"]["accuracy"],
        "heldout_accuracy_after_align": align_result["eval"]["closed"]["accuracy"],
        "heldout_accuracy_after": instruct_result["eval"]["closed"]["accuracy"],
        "align": {k: align_result[k] for k in ("steps", "first_loss", "final_loss", "seconds")},
        "instruct": {k: instruct_result[k] for k in ("steps", "first_loss", "final_loss", "seconds")},
        "shuffled_images_control": shuffle_images,
        "seconds": round(time.perf_counter() - started, 1),
        "checkpoint": instruct_result["checkpoint"],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
