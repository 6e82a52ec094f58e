"""Stage-2 step (connector + LoRA r16) on variable-length conversations: padded batch vs packed rows.

Each round draws 16 conversations from a seeded chat-length distribution (one 64 px image = 64 tokens, a question,
and an answer whose length is log-normal: median ~90 words, long tail, capped at 700) and runs the same samples
padded (16 rows x the longest) and packed (rows of --pack-length tokens, block-diagonal attention). Reports real
(non-pad) tokens/s, the ratio of packed to padded (median of per-round ratios, IQR), and whether the two losses
agree to 1e-5 in every round.

    python benchmarks/bench_packing.py --rounds 12 --out benchmarks/results/packing_tiny_cpu.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from environment import environment  # noqa: E402
from presets import build  # noqa: E402


def conversations(rng: np.random.Generator, n: int, vocab: int) -> list[list[dict]]:
    out = []
    for _ in range(n):
        answer = int(np.clip(rng.lognormal(np.log(90), 0.9), 4, 700))
        words = lambda k: " ".join(f"w{int(j)}" for j in rng.integers(0, vocab - 8, k))  # noqa: E731
        out.append([{"role": "user", "content": [{"type": "image", "image": torch.rand(3, 64, 64)}, {"type": "text", "text": words(12)}]},
                    {"role": "assistant", "content": words(answer)}])
    return out


def main() -> None:
    from mmdomain.builder import build_model
    from mmdomain.spec import ModelSpec

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--pack-length", type=int, default=800)  # just above the longest sample: on CPU the masked
    # attention still computes every score of a row, so rows much longer than the samples waste quadratic work
    parser.add_argument("--out")
    args = parser.parse_args()

    built = build("tiny")  # its Llama (256 wide, 4 layers, vocab 32000) is the LLM here
    torch.manual_seed(0)
    model, proc = build_model(ModelSpec.model_validate({
        "encoder": {"name": "tiny-vit", "options": {"image_size": 64, "patch_size": 8}},
        "llm": {"path": str(built.root / "llm"), "lora": {"r": 16, "alpha": 32, "dropout": 0.0}}, "max_length": 1024}))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    rng = np.random.default_rng(0)

    def step(batch):
        t0 = time.perf_counter()
        out = model(**batch)
        out.loss.backward()
        opt.zero_grad(set_to_none=True)  # no update: both layouts must see the same weights for the loss check
        return time.perf_counter() - t0, out.loss.item()

    rows, equal = [], True
    for r in range(args.rounds + 1):
        samples = [proc(c, key=str(i)) for i, c in enumerate(conversations(rng, args.batch, built.preset["vocab"]))]
        padded, packed = proc.collate(samples), proc.collate_packed(samples, args.pack_length)
        t_pad, l_pad = step(padded)
        t_pack, l_pack = step(packed)
        if r == 0:
            continue  # warm-up round
        equal &= abs(l_pad - l_pack) <= 1e-5
        rows.append({"real_tokens": padded["num_tokens"], "padded_shape": list(padded["input_ids"].shape),
                     "packed_shape": list(packed["input_ids"].shape), "padded_s": t_pad, "packed_s": t_pack})
    ratios = [row["padded_s"] / row["packed_s"] for row in rows]
    q = statistics.quantiles(ratios, n=4)
    fill = statistics.mean(row["real_tokens"] / (row["padded_shape"][0] * row["padded_shape"][1]) for row in rows)
    report = {
        "rounds": args.rounds, "batch": args.batch, "pack_length": args.pack_length,
        "padded_fill": fill,
        "packed_fill": statistics.mean(row["real_tokens"] / (row["packed_shape"][0] * row["packed_shape"][1]) for row in rows),
        "padded_tokens_per_s": statistics.median(row["real_tokens"] / row["padded_s"] for row in rows),
        "packed_tokens_per_s": statistics.median(row["real_tokens"] / row["packed_s"] for row in rows),
        "speedup_packed_vs_padded": {"median": statistics.median(ratios), "iqr": [q[0], q[2]]},
        "loss_equal_1e-5_every_round": equal, "rounds_detail": rows, "env": environment(),
    }
    print(json.dumps({k: v for k, v in report.items() if k != "rounds_detail"}, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
