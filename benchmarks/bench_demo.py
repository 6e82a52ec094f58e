"""`mmdomain demo` wall time and held-out accuracy: the demo recipes with the next batch decoded in a worker
(``data.num_workers=1``, what they set during issue 16's loaded-machine round) vs in the training process between
steps (the recipes as they are: ``num_workers`` 0). On the quiet 2-core machine the worker process competes with the
step's two torch threads and the demo ran slower with it (1.62x faster measured under load turned into 0.83x quiet).
Both arms run in one process, alternating, each into a fresh folder; the batches, their order and so the trained
weights do not depend on the worker count, so accuracy must be equal. Reported: per-round ratio of wall times
(before / after, > 1 is faster now), stage seconds, accuracies.

    python benchmarks/bench_demo.py --rounds 2 --out benchmarks/results/demo_cpu.json

``--before`` / ``--after`` replace an arm's overrides (the recipes then, not now, can be one of them): the quiet
worker comparison ran when the recipes set ``num_workers`` 1, i.e. ``--before data.num_workers=0 --after
data.num_workers=1`` today.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from environment import environment, write_report  # noqa: E402

DEFAULT_ARMS = {"before": ["data.num_workers=1"], "after": []}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out")
    parser.add_argument("--before", action="append", metavar="FIELD=VALUE", help="the before arm's overrides (repeatable)")
    parser.add_argument("--after", action="append", metavar="FIELD=VALUE", help="the after arm's overrides (repeatable)")
    args = parser.parse_args()
    # append onto a list default would add to it, so an arm not given on the command line takes its default here
    arms = {"before": args.before if args.before is not None else DEFAULT_ARMS["before"],
            "after": args.after if args.after is not None else DEFAULT_ARMS["after"]}
    logging.basicConfig(level=logging.WARNING)
    from mmdomain.demo import run_demo

    runs = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for arm, overrides in (arms.items() if r % 2 == 0 else reversed(arms.items())):  # alternate who goes first
                t0 = time.perf_counter()
                summary = run_demo(Path(tmp) / f"{arm}-{r}", threads=args.threads, overrides=tuple(overrides))
                runs[arm].append({"wall_s": time.perf_counter() - t0, "align_s": summary["align"]["seconds"],
                                  "instruct_s": summary["instruct"]["seconds"], "accuracy": summary["heldout_accuracy_after"],
                                  "final_loss": summary["instruct"]["final_loss"]})
                print(arm, r, json.dumps(runs[arm][-1]), flush=True)
    ratios = [b["wall_s"] / a["wall_s"] for b, a in zip(runs["before"], runs["after"])]
    report = {"arms": arms, "rounds": args.rounds, "runs": runs,
              "wall_ratio_before_over_after": {"median": statistics.median(ratios), "all": ratios},
              "accuracy_equal": all(b["accuracy"] == a["accuracy"] for b, a in zip(runs["before"], runs["after"])),
              "env": environment("cpu")}
    write_report(report, args.out)


if __name__ == "__main__":
    main()
