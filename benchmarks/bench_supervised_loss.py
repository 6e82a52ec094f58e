"""Stage-1 training step with the LM head at supervised positions only vs at every position (same model, same loss).

Preset `tiny` (benchmarks/presets.py): HF CLIP vision 256 wide, 4 layers, 224 px, patch 16 -> 196 tokens, layer
-2, CLS dropped; Llama 256 wide, 4 layers, FFN 688, vocab 32000, untied; batch 8; an image and a 60-word caption
(+ EOS) supervised. Encoder and LLM frozen, AdamW over the connector. Both variants run in this one process, interleaved
step by step; the ratio is the median of per-round ratios (these machines are noisy, so never compare absolute
times across runs).

    python benchmarks/bench_supervised_loss.py --rounds 12 --out benchmarks/results/supervised_loss.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from environment import environment  # noqa: E402
from presets import build, spec  # noqa: E402


def build_tiny():
    """The `tiny` preset's model (benchmarks/presets.py) and its batch."""
    from mmdomain.builder import build_model

    built = build("tiny")
    model, _ = build_model(spec(built.root))
    return model, built.batch


def full_logit_loss(model, batch):
    """What an all-position head does (HF's causal-LM loss): logits [B, T, V], then cross-entropy."""
    out = model(**batch, return_logits=True)
    logits = out.logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=-100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, batch = build_tiny()
    model.train()
    opt = torch.optim.AdamW(model.connector.parameters(), lr=1e-4)
    variants = {"supervised_only": lambda: model(**batch).loss, "all_positions": lambda: full_logit_loss(model, batch)}
    losses = {name: fn().item() for name, fn in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(2):  # warm-up
        for fn in variants.values():
            fn().backward()
            opt.zero_grad(set_to_none=True)
    for _ in range(args.rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times[name].append(time.perf_counter() - t0)
    ratios = [a / b for a, b in zip(times["all_positions"], times["supervised_only"])]
    q = statistics.quantiles(ratios, n=4)
    result = {
        "preset": "tiny", "batch": 8, "seq_len": int(batch["input_ids"].shape[1]),
        "supervised_tokens": int((batch["labels"][:, 1:] != -100).sum()),
        "median_ms": {k: 1000 * statistics.median(v) for k, v in times.items()},
        "speedup_supervised_only_vs_all_positions": {"median": statistics.median(ratios), "iqr": [q[0], q[2]]},
        "step0_loss": losses, "loss_equal_1e-5": abs(losses["supervised_only"] - losses["all_positions"]) < 1e-5,
        "env": environment(),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
