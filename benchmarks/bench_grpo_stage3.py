"""GRPO as stage 3 on the demo task, over seeds: align, a deliberately short instruct stage (under-trained stage 2),
then `recipes/demo/grpo_tinyvit_tinyllama.yaml` from it; held-out closed accuracy (200 questions, chance 0.25) after
stage 2 and after stage 3 per seed, the gain, and the seed-to-seed spread, plus each run's reward curve.
The recipe runs 200 GRPO steps (about 6 minutes a seed on one quiet thread): with 40 or 100 every seed stopped near
0.5, having learned upper/lower but not left/right (results/grpo_stage3_40steps.json, grpo_stage3_100steps.json).

    python benchmarks/bench_grpo_stage3.py --seeds 0 1 2 --out benchmarks/results/grpo_stage3.json
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from environment import environment  # noqa: E402

from mmdomain.demo_stage3 import run_stage3_demo  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--stage2-steps", type=int, default=80)
    parser.add_argument("--stage3-steps", type=int, default=None, help="default: the recipe's optim.max_steps")
    parser.add_argument("--train-samples", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            s = run_stage3_demo(Path(tmp) / f"seed{seed}", objective="grpo", seed=seed, train_samples=args.train_samples,
                                stage2_steps=args.stage2_steps, stage3_steps=args.stage3_steps, threads=args.threads)
            run = {"seed": seed, "after_stage2": s["heldout_accuracy_after_instruct"], "after_grpo": s["heldout_accuracy_after_grpo"],
                   "gain": round(s["heldout_accuracy_after_grpo"] - s["heldout_accuracy_after_instruct"], 4),
                   "grpo_seconds": s["stage3"]["seconds"], "reward_curve": s["stage3_curve"]}
            print(json.dumps({k: v for k, v in run.items() if k != "reward_curve"}), flush=True)
            runs.append(run)
    gains = [r["gain"] for r in runs]
    spread = lambda xs: round(max(xs) - min(xs), 4)  # noqa: E731
    summary = {
        "mean_after_stage2": round(statistics.mean(r["after_stage2"] for r in runs), 4),
        "mean_after_grpo": round(statistics.mean(r["after_grpo"] for r in runs), 4),
        "mean_gain": round(statistics.mean(gains), 4), "min_gain": min(gains),
        "gain_std": round(statistics.stdev(gains), 4) if len(gains) > 1 else None,
        "spread_after_stage2": spread([r["after_stage2"] for r in runs]), "spread_after_grpo": spread([r["after_grpo"] for r in runs]),
        "spread_gain": spread(gains),
    }
    result = {"benchmark": "grpo_stage3", "environment": environment(), "settings": vars(args) | {"out": str(args.out)},
              "summary": summary, "runs": runs}
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
