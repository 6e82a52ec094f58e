"""What raising glibc's mmap and trim thresholds (`--allocator tuned`, glibc_allocator.py) does to step times.

The allocator's settings are process-wide, so the two arms cannot share a process: each pair of rounds runs
`bench_step.py --no-memory` once with `--allocator system` and once with `--allocator tuned`, in fresh processes,
alternating which goes first. Reported per variant: the tuned/system ratio of median step times of each pair
(< 1 is faster) and its median over pairs; the HF Llava baseline is included because it is what the allocator
moves most (its all-position logits are hundreds of MB every step).

    python benchmarks/bench_host_allocator.py --pairs 3 --out benchmarks/results/host_allocator_tiny_cpu.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from environment import environment, write_report  # noqa: E402

STEP = Path(__file__).resolve().parent / "bench_step.py"


def one_run(allocator: str, args, out: Path) -> dict:
    cmd = [sys.executable, str(STEP), "--preset", args.preset, "--rounds", str(args.rounds), "--variants", args.variants,
           "--allocator", allocator, "--no-memory", "--out", str(out)] + (["--threads", str(args.threads)] if args.threads else [])
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.read_text())["variants"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds inside each process")
    parser.add_argument("--variants", default="baseline,default,full")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out")
    args = parser.parse_args()
    names = args.variants.split(",")
    runs = {"system": [], "tuned": []}
    with tempfile.TemporaryDirectory() as tmp:
        for pair in range(args.pairs):
            for allocator in (("system", "tuned") if pair % 2 == 0 else ("tuned", "system")):
                result = one_run(allocator, args, Path(tmp) / f"{allocator}-{pair}.json")
                runs[allocator].append({n: result[n]["median_ms"] for n in names})
                print(allocator, pair, json.dumps(runs[allocator][-1]), flush=True)
    ratios = {n: [t[n] / s[n] for s, t in zip(runs["system"], runs["tuned"])] for n in names}
    report = {"preset": args.preset, "pairs": args.pairs, "rounds_per_process": args.rounds, "median_step_ms": runs,
              "tuned_over_system": {n: {"median": statistics.median(r), "all": r} for n, r in ratios.items()},
              "env": environment("cpu")}
    write_report(report, args.out)


if __name__ == "__main__":
    main()
