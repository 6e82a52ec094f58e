"""Connectors on the demo task, each against `mlp` (LLaVA-1.5's projector): stage-1 step time as a ratio to mlp's,
interleaved step by step in one process, media tokens per item, and held-out accuracy after the demo's training
budget (align, then instruct from it, as `mmdomain demo`; chance 0.25).

The step is the demo's align step (frozen tiny ViT, 8x8 = 64 patch tokens, frozen tiny Llama, connector trained,
batch 32): fewer media tokens shorten the LLM's sequence, so a token-cutting connector can be faster than mlp even
though it computes more itself. Every token-cutting connector is set to 16 tokens, so their accuracies compare at
one budget. Results are per-round ratios (median, IQR), never absolute times compared across runs.

    python benchmarks/bench_connectors.py --rounds 12 --out benchmarks/results/connectors.json
    python benchmarks/bench_connectors.py --rounds 3 --train-samples 400 --align-steps 10 --instruct-steps 40   # a quick check
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from environment import environment, write_report  # noqa: E402

# name in the results -> (registry name, options); 16 media tokens for each connector that sets its count
CONNECTORS = {
    "mlp": ("mlp", {"depth": 2}),
    "linear": ("linear", {}),
    "pixel_shuffle": ("pixel_shuffle", {"factor": 2}),
    "avg_pool": ("avg_pool", {"factor": 2}),
    "ldp": ("ldp", {}),
    "c_abstractor": ("c_abstractor", {"grid": 4, "depth": 2}),
    "perceiver": ("perceiver", {"num_queries": 16, "depth": 2, "heads": 4}),
    "qformer": ("qformer", {"num_queries": 16, "depth": 2, "heads": 4}),
    "qformer_window": ("qformer", {"window": 16, "num_queries": 4, "depth": 2, "heads": 4}),
}


def overrides_for(name: str) -> list[str]:
    registry_name, options = CONNECTORS[name]
    return [f"model.connector.name={registry_name}", f"model.connector.options={json.dumps(options)}"]


def step_functions(out: Path, names: list[str], batch_size: int, llm: Path):
    """name -> (one stage-1 training step, media tokens per item), each model built from the demo's align recipe."""
    from mmdomain.builder import build_model
    from mmdomain.demo import stage_recipes
    from mmdomain.demo_data import CAPTION
    from mmdomain.trainability import apply_trainable, param_groups

    steps = {}
    for name in names:
        align, _ = stage_recipes(out / "timing" / name, llm=llm, align_train="unused", instruct_train="unused", heldout="unused",
                                 overrides=tuple(overrides_for(name)))
        torch.manual_seed(0)
        model, processor = build_model(align.model)
        apply_trainable(model, align.trainable)
        model.train()
        g = torch.Generator().manual_seed(1)
        quadrants = ["upper left", "upper right", "lower left", "lower right"]
        samples = [processor([{"role": "user", "content": align.model.media_token},
                              {"role": "assistant", "content": CAPTION.format(quadrants[i % 4])}],
                             [torch.rand(1, 64, 64, generator=g)], key=str(i)) for i in range(batch_size)]
        batch = processor.collate(samples)
        optimizer = torch.optim.AdamW(param_groups(model, align.lr, align.optim.lr, align.optim.weight_decay))

        def step(model=model, batch=batch, optimizer=optimizer) -> float:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return float(loss.detach())

        steps[name] = (step, model.tokens_per_item, sum(p.numel() for p in model.connector.parameters()))
    return steps


def time_steps(steps, rounds: int) -> dict[str, list[float]]:
    for step, _, _ in steps.values():  # warm-up: optimizer state, allocator
        step()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, (step, _, _) in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return times


def heldout_accuracy(out: Path, name: str, align_steps: int | None, instruct_steps: int | None, seed: int) -> dict:
    """The demo's two stages with this connector; held-out accuracy after each (chance 0.25)."""
    from mmdomain.demo import stage_recipes
    from mmdomain.train import seed_everything, train

    shards = out / "shards"

    def stage(index: int, steps: int | None):  # steps: a shorter budget than the demo's, for a quick check of the harness
        extra = overrides_for(name) + ([f"optim.max_steps={steps}"] if steps else [])
        return stage_recipes(out / "runs" / name, llm=out / "tiny-llm", align_train=shards / "align-*.tar", instruct_train=shards / "instruct-*.tar",
                             heldout=shards / "heldout-*.tar", seed=seed, overrides=tuple(extra))[index]

    align, instruct = stage(0, align_steps), stage(1, instruct_steps)
    seed_everything(seed)
    started = time.perf_counter()
    first = train(align)
    second = train(instruct)
    return {"accuracy_after_align": first["eval"]["closed"]["accuracy"], "accuracy_after_instruct": second["eval"]["closed"]["accuracy"],
            "align_steps": first["steps"], "instruct_steps": second["steps"], "instruct_final_loss": second["final_loss"],
            "train_seconds": round(time.perf_counter() - started, 1)}


def ratio_summary(values: list[float]) -> dict:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0], values[0], values[0]]
    return {"median": statistics.median(values), "iqr": [q[0], q[2]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connectors", default=",".join(CONNECTORS), help="comma-separated names from CONNECTORS (mlp is always included)")
    parser.add_argument("--rounds", type=int, default=12, help="interleaved timing rounds")
    parser.add_argument("--batch", type=int, default=32, help="timing batch (the demo's)")
    parser.add_argument("--train-samples", type=int, default=4000, help="demo training samples per stage (the demo's 4000)")
    parser.add_argument("--heldout-samples", type=int, default=200)
    parser.add_argument("--align-steps", type=int, help="override the demo's align steps (80) for a quick check")
    parser.add_argument("--instruct-steps", type=int, help="override the demo's instruct steps (400) for a quick check")
    parser.add_argument("--no-accuracy", action="store_true", help="timing and token counts only")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="runs/bench-connectors", help="where the demo data, tiny LLM and runs are written")
    parser.add_argument("--out")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = ["mlp"] + [n for n in args.connectors.split(",") if n and n != "mlp"]
    unknown = [n for n in names if n not in CONNECTORS]
    if unknown:
        parser.error(f"unknown connectors {unknown}; known: {', '.join(CONNECTORS)}")

    from mmdomain.demo import prepare

    work = Path(args.work)
    prepare(work, seed=args.seed, train_samples=args.train_samples, heldout_samples=args.heldout_samples, shuffle_images=False)
    steps = step_functions(work, names, args.batch, work / "tiny-llm")
    times = time_steps(steps, args.rounds)
    results = {}
    for name in names:
        _, tokens, params = steps[name]
        results[name] = {"registry_name": CONNECTORS[name][0], "options": CONNECTORS[name][1], "media_tokens_per_item": tokens,
                         "connector_parameters": params, "median_step_ms": 1000 * statistics.median(times[name]),
                         "step_time_vs_mlp": ratio_summary([t / b for t, b in zip(times[name], times["mlp"])])}
    del steps
    if not args.no_accuracy:
        for name in names:
            results[name]["heldout"] = heldout_accuracy(work, name, args.align_steps, args.instruct_steps, args.seed)
            print(f"{name}: {json.dumps(results[name]['heldout'])}", file=sys.stderr, flush=True)
    report = {"task": "demo: quadrant of a lesion in synthetic 64x64 scans, 4 choices (chance 0.25)", "rounds": args.rounds,
              "batch": args.batch, "train_samples": args.train_samples, "heldout_samples": args.heldout_samples,
              "align_steps": args.align_steps or "demo (80)", "instruct_steps": args.instruct_steps or "demo (400)",
              "connectors": results, "env": environment("cpu")}
    write_report(report, args.out)


if __name__ == "__main__":
    main()
