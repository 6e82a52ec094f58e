"""How fast the step's own matrix multiplies run alone, against the square-GEMM ceiling `gemm_peak` measures.

The fraction of the GEMM ceiling a step reaches is bounded by the shapes it multiplies: a 256-wide model's
[2088 x 256] @ [256 x 688] runs well below a 2048^3 product. This records every matmul (mm, addmm, bmm) of a few
steps of one `bench_step` variant with the profiler, re-runs each distinct shape alone, and reports the FLOP-weighted
rate those shapes reach in isolation: the best the step could do if nothing but its matmuls ran. Attention (a fused
CPU kernel) is not a matmul call here and is left out of both sides.

    python benchmarks/gemm_shapes.py --preset tiny --variant default --out benchmarks/results/gemm_shapes_tiny_cpu.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import make_variants  # noqa: E402
from environment import environment, write_report  # noqa: E402
from gemm_peak import gemm_peak  # noqa: E402
from presets import build  # noqa: E402


def _flops(name: str, shapes: list) -> tuple[float, tuple] | None:
    """FLOPs and a runnable (m, k, n[, batch]) for one recorded matmul call."""
    try:
        if name == "aten::mm":
            (m, k), (_, n) = shapes[0], shapes[1]
            return 2.0 * m * k * n, (m, k, n, 1)
        if name == "aten::addmm":
            (m, k), (_, n) = shapes[1], shapes[2]
            return 2.0 * m * k * n, (m, k, n, 1)
        if name == "aten::bmm":
            (b, m, k), (_, _, n) = shapes[0], shapes[1]
            return 2.0 * b * m * k * n, (m, k, n, b)
    except (ValueError, IndexError):
        return None
    return None


def time_shape(m: int, k: int, n: int, b: int, repeats: int) -> float:
    a, w = (torch.randn(b, m, k), torch.randn(b, k, n)) if b > 1 else (torch.randn(m, k), torch.randn(k, n))
    mul = torch.bmm if b > 1 else torch.mm
    mul(a, w)
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mul(a, w)
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--variant", default="default")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    built = build(args.preset)
    step, _ = make_variants([args.variant], built, "cpu")[args.variant]
    step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(args.steps):
            step()
    calls, step_matmul_s = Counter(), 0.0
    for event in prof.events():
        found = _flops(event.name, event.input_shapes)
        if found:
            calls[found[1]] += 1
            step_matmul_s += event.self_cpu_time_total / 1e6
    peak = gemm_peak("cpu")["flop_per_s"]
    rows, flops, alone_s = [], 0.0, 0.0
    for (m, k, n, b), count in calls.most_common():
        t = time_shape(m, k, n, b, args.repeats)
        f = 2.0 * m * k * n * b
        flops, alone_s = flops + f * count, alone_s + t * count
        rows.append({"m": m, "k": k, "n": n, "batch": b, "calls": count // args.steps, "fraction_of_gemm_peak_alone": f / t / peak})
    rows.sort(key=lambda r: -r["calls"] * r["m"] * r["k"] * r["n"] * r["batch"])
    report = {"preset": args.preset, "variant": args.variant, "gemm_peak_gflop_per_s": peak / 1e9,
              "matmul_gflop_per_step": flops / args.steps / 1e9,
              "matmuls_alone_fraction_of_gemm_peak": flops / alone_s / peak,
              "matmuls_in_step_fraction_of_gemm_peak": flops / step_matmul_s / peak if step_matmul_s else None,
              "shapes": rows, "env": environment("cpu")}
    write_report(report, args.out)


if __name__ == "__main__":
    main()
