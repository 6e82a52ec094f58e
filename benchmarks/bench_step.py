"""Stage-1 (and stage-2) training step: HF LlavaForConditionalGeneration vs mmdomain, same seeded weights, same batch.

Variants: `baseline` (HF Llava, vision + LLM frozen, AdamW over the projector), `default` (mmdomain: pruned tower,
LM head at supervised positions only), `cache` (mmdomain from precomputed encoder features: the feature cache),
`lora` (stage 2: connector + LoRA r16 on all linear layers), `full` (stage 2: connector + the whole LLM), and, when
named, `compiled` (`default` under `optim.compile`: its first forward + step, the compile, is reported on its own as
`warmup_s`, never in its step times). All run in
one process, interleaved step by step for --rounds rounds; each reports median step ms (IQR), samples/s, tokens/s,
its ratio to the baseline (median of per-round ratios, IQR), step-0 loss (must equal the baseline's to 1e-5 in fp32,
else the run is marked invalid), analytic GFLOP/s and the fraction of the measured GEMM ceiling. Peak step memory
is measured in a fresh process per variant: peak RSS during 3 steps minus RSS before step 0 (VmHWM reset through
/proc/self/clear_refs); on a GPU, max_memory_allocated.

`--allocator tuned` first raises glibc's mmap and trim thresholds for the whole process (glibc_allocator.py: freed
large blocks stay in the heap), which steadies and speeds up the baseline; `system` (the default) leaves glibc's
defaults, under which every step page-faults its large tensors in again (the baseline's 266 MB logits most of all).

    python benchmarks/bench_step.py --preset tiny --rounds 12 --out benchmarks/results/step_tiny_cpu.json
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from environment import environment, write_report  # noqa: E402
from gemm_peak import gemm_peak, step_flops  # noqa: E402
from presets import build, copy_projector, spec  # noqa: E402

VARIANTS = ("baseline", "default", "cache", "lora", "full")  # the default set; "compiled" is run when named
WIDE_IQR = 0.25  # baseline IQR / median above this: the run is flagged (its ratios would move between runs)


def make_variants(names, built, device):
    """name -> (step function returning the loss tensor, parameters trained)."""
    from mmdomain.builder import build_model
    from mmdomain.evaluate import to_device
    from mmdomain.media import MediaBatch

    llava, batch = built.llava.to(device), to_device(built.batch, device)
    out = {}
    for name in names:
        if name == "baseline":
            llava.requires_grad_(False)
            llava.model.multi_modal_projector.requires_grad_(True)
            params = list(llava.model.multi_modal_projector.parameters())
            fn = lambda: llava(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],  # noqa: E731
                               pixel_values=batch["media"][0].values, labels=batch["labels"]).loss
        else:
            llm = {"lora": {"lora": {"r": 16, "alpha": 32, "dropout": 0.0}}}.get(name, {})
            model, _ = build_model(spec(built.root, **llm))
            copy_projector(model, llava)
            model.to(device).train()
            if name == "full":
                model.llm.requires_grad_(True)
            if name == "compiled":
                from mmdomain.compiled_step import compile_model

                compile_model(model)
            if name == "cache":
                with torch.no_grad():
                    features = model.encoder(batch["media"][0].values)  # fp32 here: the same computation, exactly
                cached = {**batch, "media": [MediaBatch(features, encoded=True)]}
                fn = (lambda m, b: lambda: m(**b).loss)(model, cached)
            else:
                fn = (lambda m: lambda: m(**batch).loss)(model)
            params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5)

        def step(fn=fn, opt=opt):
            loss = fn()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        out[name] = (step, fn)
    return out


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_of(variant: str, preset: str, device: str) -> dict:
    """Run in a fresh process: peak step memory of one variant."""
    built = build(preset)
    step, _ = make_variants([variant], built, device)[variant]
    step()  # first step allocates optimizer state; measure the steady step after it
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        return {"peak_step_bytes": torch.cuda.max_memory_allocated() - before, "kind": "cuda max_memory_allocated"}
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (the peak RSS) to the current RSS
    before = _rss_kib("VmRSS")
    for _ in range(3):
        step()
    return {"peak_step_bytes": (_rss_kib("VmHWM") - before) * 1024, "kind": "peak RSS - RSS before step"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--threads", type=int)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--allocator", choices=("system", "tuned"), default="system")
    parser.add_argument("--memory-only", help=argparse.SUPPRESS)
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    allocator = "system (glibc defaults)"
    if args.allocator == "tuned":
        from glibc_allocator import tune_host_allocator

        allocator = tune_host_allocator()
    if args.memory_only:
        print(json.dumps(memory_of(args.memory_only, args.preset, args.device)))
        return

    names = args.variants.split(",")
    built = build(args.preset)
    variants = make_variants(names, built, args.device)
    warmup = {}
    for n, (step, fn) in variants.items():  # first forward + a warm-up step: optimizer state, allocator, kernels, compile
        t0 = time.perf_counter()
        warmup[n] = fn().item()
        step()
        warmup[n] = (warmup[n], time.perf_counter() - t0)
    losses = {n: loss for n, (loss, _) in warmup.items()}
    times = {n: [] for n in names}
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    for _ in range(args.rounds):
        for n, (step, _) in variants.items():
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            times[n].append(time.perf_counter() - t0)

    peak = gemm_peak(args.device)
    tokens = int(built.batch["attention_mask"].sum())
    results = {}
    for n in names:
        med = statistics.median(times[n])
        q = statistics.quantiles(times[n], n=4)
        flops = step_flops(built.preset, built.batch, n)
        row = {"median_ms": 1000 * med, "iqr_ms": [1000 * q[0], 1000 * q[2]], "samples_per_s": built.preset["batch"] / med,
               "tokens_per_s": tokens / med, "step0_loss": losses[n], "warmup_s": warmup[n][1], "gflop_per_step": flops / 1e9,
               "gflop_per_s": flops / med / 1e9, "fraction_of_gemm_peak": flops / med / peak["flop_per_s"]}
        if "baseline" in times:
            ratios = [b / t for b, t in zip(times["baseline"], times[n])]
            rq = statistics.quantiles(ratios, n=4)
            row["speedup_vs_baseline"] = {"median": statistics.median(ratios), "iqr": [rq[0], rq[2]]}
            row["loss_matches_baseline_1e-5"] = abs(losses[n] - losses["baseline"]) <= 1e-5
        results[n] = row
    if not args.no_memory:
        for n in names:
            # Always under glibc's defaults: with the tuned allocator the step's memory is already resident before
            # the step (kept from the warm-up), and peak RSS minus RSS before it would read as ~0 for every variant.
            proc = subprocess.run([sys.executable, __file__, "--preset", args.preset, "--device", args.device, "--memory-only", n]
                                  + (["--threads", str(args.threads)] if args.threads else []), capture_output=True, text=True, check=True)
            results[n]["memory"] = json.loads(proc.stdout.strip().splitlines()[-1])
        if "baseline" in results:
            base = results["baseline"]["memory"]["peak_step_bytes"]
            for n in names:
                results[n]["memory"]["ratio_vs_baseline"] = results[n]["memory"]["peak_step_bytes"] / max(base, 1)
    if "baseline" in results:  # a ratio is only as steady as its baseline: its own spread is reported and a wide one flagged
        base = results["baseline"]
        base["relative_iqr"] = (base["iqr_ms"][1] - base["iqr_ms"][0]) / base["median_ms"]
        base["iqr_wide"] = base["relative_iqr"] > WIDE_IQR
    report = {"preset": args.preset, "preset_dims": built.preset, "rounds": args.rounds, "seq_len": int(built.batch["input_ids"].shape[1]),
              "supervised_tokens": int((built.batch["labels"][:, 1:] != -100).sum()), "gemm_peak": peak, "variants": results,
              "valid": all(r.get("loss_matches_baseline_1e-5", True) for r in results.values()),
              "baseline_iqr_wide": results.get("baseline", {}).get("iqr_wide"), "host_allocator": allocator,
              "env": environment(args.device)}
    write_report(report, args.out)


if __name__ == "__main__":
    main()
