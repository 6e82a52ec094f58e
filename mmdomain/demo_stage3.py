"""`mmdomain demo --stages sft,grpo` (or `sft,dpo`): the demo's align stage, a deliberately short instruct stage, then
stage 3 from it, with held-out accuracy after stage 2 and after stage 3 (what learning from rewards or preferences
adds). Same synthetic quadrant task and tiny models as `mmdomain demo`; everything stays on the CPU."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from . import demo_data
from .builder import load_pretrained
from .demo import prepare, recipes_dir, stage_recipes
from .evaluate import evaluate_shards
from .recipe import load_recipe
from .shards import make_shards
from .train import train

log = logging.getLogger(__name__)

STAGE3 = {"grpo": "demo/grpo_tinyvit_tinyllama.yaml", "dpo": "demo/dpo_tinyvit_tinyllama.yaml"}


def run_stage3_demo(out: str | Path = "runs/demo-stage3", *, objective: str = "grpo", seed: int = 0, train_samples: int = 1500,
                    heldout_samples: int = 200, stage2_steps: int = 80, stage3_steps: int | None = None, threads: int | None = None,
                    stage3_overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """Align, instruct for only ``stage2_steps`` steps, then ``objective`` (grpo or dpo) from there; returns (and writes
    to ``{out}/summary.json``) held-out closed accuracy after each stage."""
    if objective not in STAGE3:
        raise ValueError(f"stage 3 is grpo or dpo, not {objective!r}")
    started = time.perf_counter()
    out = Path(out)
    prepare(out, seed=seed, train_samples=train_samples, heldout_samples=heldout_samples, shuffle_images=False)
    shards = out / "shards"
    if objective == "dpo":
        # Prefixes that no other split's glob matches (heldout-*.tar must not pick up held-out pairs).
        for name, n, offset in (("dpo-train", train_samples, 4), ("dpo-heldout", heldout_samples, 5)):
            jsonl = demo_data.write_split(out / "raw", name, n=n, seed=seed + offset, kind="pairs")
            make_shards(jsonl, out / "raw" / "media", shards, prefix=name, samples_per_shard=500, overwrite=True)
    align, instruct = stage_recipes(out, llm=out / "tiny-llm", align_train=shards / "align-*.tar", instruct_train=shards / "instruct-*.tar",
                                    heldout=shards / "heldout-*.tar", seed=seed, threads=threads)
    instruct = instruct.model_copy(update={"optim": instruct.optim.model_copy(update={"max_steps": stage2_steps, "warmup_steps": min(5, stage2_steps)})})
    train(align)
    stage2 = train(instruct)
    heldout = shards / ("dpo-heldout-*.tar" if objective == "dpo" else "heldout-*.tar")  # dpo: its eval reports preference accuracy
    overrides = [f"model.llm.path={out / 'tiny-llm'}", f"init_from={out / 'instruct'}", f"output_dir={out / objective}", f"seed={seed}",
                 f"data.eval={heldout}", *([f"threads={threads}"] if threads else []),
                 *([f"optim.max_steps={stage3_steps}"] if stage3_steps else []), *stage3_overrides]
    overrides.append(f"data.train={shards / ('dpo-train-*.tar' if objective == 'dpo' else 'instruct-*.tar')}")
    stage3 = train(load_recipe(recipes_dir() / STAGE3[objective], overrides))
    closed = stage3["eval"]["closed"]["accuracy"]
    if objective == "dpo":  # closed accuracy on the very questions stage 2 was measured on
        model, processor = load_pretrained(stage3["checkpoint"])
        closed = evaluate_shards(model, processor, str(shards / "heldout-*.tar"), max_samples=heldout_samples)["closed"]["accuracy"]
    metrics = [json.loads(line) for line in (out / objective / "metrics.jsonl").read_text().splitlines()]
    summary = {
        "task": "quadrant of a lesion in synthetic 64x64 scans (4 choices)",
        "chance": 0.25,
        "stages": ["align", "instruct", objective],
        "instruct_steps": stage2_steps,
        "heldout_accuracy_after_instruct": stage2["eval"]["closed"]["accuracy"],
        f"heldout_accuracy_after_{objective}": closed,
        "stage3": {k: stage3[k] for k in ("steps", "first_loss", "final_loss", "seconds")},
        "stage3_curve": [{k: v for k, v in m.items() if k in ("step", "reward_mean", "reward_std_in_group", "equal_reward_groups",
                                                             "kl_to_reference", "answer_tokens", "reward_margin", "preference_accuracy")}
                         for m in metrics if "loss" in m],
        "seconds": round(time.perf_counter() - started, 1),
        "checkpoint": stage3["checkpoint"],
    }
    if objective == "dpo" and stage3["eval"].get("dpo"):
        summary["heldout_preference"] = stage3["eval"]["dpo"]
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
