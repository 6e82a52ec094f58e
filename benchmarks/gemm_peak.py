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
    """Matmul FLOPs (2mnk) of one optimizer step of ``variant`` on ``batch`` (attention scores counted in full), from
    ``mmdomain.cost_model``, the model `mmdomain plan` estimates with."""
    from mmdomain.cost_model import Stack, forward_flops, head_flops, step_flops as stack_flops

    b, t = batch["input_ids"].shape
    k = int((batch["labels"][:, 1:] != -100).sum())  # supervised positions
    n = (p["image"] // p["patch"]) ** 2
    dv, fv, d, f, v = p["v_hidden"], p["v_ffn"], p["hidden"], p["ffn"], p["vocab"]
    vision_layers = {"baseline": p["v_layers"], "cache": 0}.get(variant, p["v_layers"] - 1)  # mmdomain prunes layer -1
    vision = Stack(layers=vision_layers, width=dv, attn_width=dv, kv_width=dv, ffn=fv, gated=False, heads=p["v_heads"],
                   matmul_params=4 * dv * dv + 2 * dv * fv)
    llm = Stack(layers=p["layers"], width=d, attn_width=d, kv_width=d, ffn=f, gated=True, heads=p["heads"], matmul_params=4 * d * d + 3 * d * f)
    connector_fwd = 2 * b * n * (dv * d + d * d)
    connector = connector_fwd * 2 + 2 * b * n * d * d  # forward, weight grads, input grad of the second layer
    # Input gradients always reach the connector through the LLM; its weight gradients only when it trains whole.
    llm_step = stack_flops(llm, b * t, t, input_grads=True, weight_grads=variant == "full")
    head_positions = b * t if variant == "baseline" else k
    return float(b * forward_flops(vision, n + 1, n + 1) + connector + llm_step + head_flops(head_positions, d, v, trains=variant == "full"))


if __name__ == "__main__":
    print(json.dumps(gemm_peak("cuda" if torch.cuda.is_available() else "cpu"), indent=2))
