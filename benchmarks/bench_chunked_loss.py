"""The LM head + summed cross-entropy at supervised positions: plain (``F.cross_entropy`` over the whole
``[supervised, vocab]`` logits, the loss mmdomain used before) vs chunked (``mmdomain.chunked_loss``), forward and
backward, same inputs, interleaved. Stage-1 shape (frozen head, gradient to the hidden rows) and full-training shape
(head weight trained too). Per-call peak memory is measured in a fresh process per variant (peak RSS - RSS before).

    python benchmarks/bench_chunked_loss.py --rounds 12 --out benchmarks/results/chunked_loss_cpu.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from environment import environment  # noqa: E402
from presets import PRESETS  # noqa: E402


def setup(preset: str, train_head: bool):
    from mmdomain.chunked_loss import chunked_cross_entropy

    p = PRESETS[preset]
    torch.manual_seed(0)
    rows = p["batch"] * (p["caption"] + 1)  # the caption and EOS of every sample are supervised
    head = torch.nn.Linear(p["hidden"], p["vocab"], bias=False).requires_grad_(train_head)
    hidden = torch.randn(rows, p["hidden"], requires_grad=True)
    targets = torch.randint(0, p["vocab"], (rows,))
    wrt = [hidden, head.weight] if train_head else [hidden]
    fns = {"plain": lambda: F.cross_entropy(head(hidden).float(), targets, reduction="sum"),
           "chunked": lambda: chunked_cross_entropy(hidden, targets, head)}

    def call(name):
        loss = fns[name]()
        grads = torch.autograd.grad(loss, wrt)
        return loss.detach(), grads
    return call


def _kib(field: str) -> int:
    return next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,tiny-qwen-vocab")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--memory-only", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_only:
        preset, shape, name = args.memory_only
        call = setup(preset, shape == "full")
        call(name)
        Path("/proc/self/clear_refs").write_text("5")
        before = _kib("VmRSS")
        call(name)
        print(json.dumps({"peak_bytes": (_kib("VmHWM") - before) * 1024}))
        return
    report = {"rounds": args.rounds, "results": {}, "env": environment("cpu")}
    for preset in args.presets.split(","):
        for shape in ("stage1", "full"):
            call = setup(preset, shape == "full")
            (plain_loss, plain_grads), (chunk_loss, chunk_grads) = call("plain"), call("chunked")
            grad_diff = max(float((a - b).abs().max()) for a, b in zip(plain_grads, chunk_grads))
            times = {"plain": [], "chunked": []}
            for _ in range(args.rounds):
                for name in times:
                    t0 = time.perf_counter()
                    call(name)
                    times[name].append(time.perf_counter() - t0)
            ratios = [a / b for a, b in zip(times["plain"], times["chunked"])]
            q = statistics.quantiles(ratios, n=4)
            row = {"plain_ms": 1000 * statistics.median(times["plain"]), "chunked_ms": 1000 * statistics.median(times["chunked"]),
                   "speedup": {"median": statistics.median(ratios), "iqr": [q[0], q[2]]},
                   "loss_diff": abs(float(plain_loss - chunk_loss)), "max_grad_diff": grad_diff}
            for name in times:
                cmd = [sys.executable, __file__, "--memory-only", preset, shape, name] + (["--threads", str(args.threads)] if args.threads else [])
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
                row[f"{name}_peak_bytes"] = json.loads(out)["peak_bytes"]
            row["memory_ratio"] = row["chunked_peak_bytes"] / max(row["plain_peak_bytes"], 1)
            report["results"][f"{preset}/{shape}"] = row
            print(preset, shape, json.dumps(row), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
