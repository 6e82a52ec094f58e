"""The machine's measured matrix-multiply ceiling, and the analytic FLOPs of a training step per variant.

    python benchmarks/gemm_peak.py        # prints the ceiling (fp32 on CPU, bf16 on a GPU)
"""
from __future__ import annotations

import json
import statistics
import time

import torch


def gemm_peak(device: str = "cpu", sizes=(512, 1024, 2048), repeats: int = 5) -> dict:
    """Best median throughput of square matmuls; the ceiling MFU is measured against on this machine."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    by_size = {}
    for n in sizes:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        a @ b  # warm-up
        runs = []
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            a @ b
            if device == "cuda":
                torch.cuda.synchronize()
            runs.append(time.perf_counter() - t0)
        by_size[n] = 2 * n**3 / statistics.median(runs)
    return {"flop_per_s": max(by_size.values()), "gflop_per_s_by_size": {k: v / 1e9 for k, v in by_size.items()},
            "dtype": str(dtype), "threads": torch.get_num_threads()}


def step_flops(p: dict, batch: dict, variant: str) -> float:
    """Matmul FLOPs (2mnk) of one optimizer step of ``variant`` on ``batch`` (attention scores counted in full)."""
    b, t = batch["input_ids"].shape
    k = int((batch["labels"][:, 1:] != -100).sum())  # supervised positions
    n = (p["image"] // p["patch"]) ** 2
    dv, fv, d, f, v = p["v_hidden"], p["v_ffn"], p["hidden"], p["ffn"], p["vocab"]
    vision_layer = (n + 1) * (2 * (4 * dv * dv + 2 * dv * fv) + 4 * (n + 1) * dv)
    vision_layers = {"baseline": p["v_layers"], "cache": 0}.get(variant, p["v_layers"] - 1)  # mmdomain prunes layer -1
    vision = b * vision_layers * vision_layer
    connector_fwd = 2 * b * n * (dv * d + d * d)
    connector = connector_fwd * 2 + 2 * b * n * d * d  # forward, weight grads, input grad of the second layer
    llm_fwd = b * t * p["layers"] * (2 * (4 * d * d + 3 * d * f) + 4 * t * d)
    llm_bwd = llm_fwd * (2 if variant == "full" else 1)  # input grads always (to reach the connector); weight grads if full
    head_positions = b * t if variant == "baseline" else k
    head = 2 * head_positions * d * v * (3 if variant == "full" else 2)
    return float(vision + connector + llm_fwd + llm_bwd + head)


if __name__ == "__main__":
    print(json.dumps(gemm_peak("cuda" if torch.cuda.is_available() else "cpu"), indent=2))
