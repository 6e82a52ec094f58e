"""Loader throughput against what the training step consumes: raw tar reading, decode + preprocess + tokenise,
and cached features, with 0 and 2 DataLoader workers, on the `tiny` preset's 224 px images.

    python benchmarks/bench_loader.py --samples 320 --step-json benchmarks/results/step_tiny_cpu.json \
        --out benchmarks/results/loader_tiny_cpu.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from environment import environment  # noqa: E402
from presets import build  # noqa: E402


def _rate(loader, batch_key: str | None = None) -> float:
    t0, n = time.perf_counter(), 0
    for item in loader:
        n += len(item["keys"]) if isinstance(item, dict) and "keys" in item else 1
    return n / (time.perf_counter() - t0)


def main() -> None:
    from mmdomain.data import FailureBudget, SampleFormat, ShardCatalog, expand_shards
    from mmdomain.feature_cache import cache_features, open_cache
    from mmdomain.shard_index import ShardReader
    from mmdomain.train_stream import BatchStream, TrainBatches
    from mmdomain.builder import build_model
    from mmdomain.recipe import validate_recipe
    from mmdomain.shards import make_shards

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=320)
    parser.add_argument("--step-json", help="a bench_step result, for the samples/s the step consumes")
    parser.add_argument("--out")
    args = parser.parse_args()

    built = build("tiny")
    work = Path(tempfile.mkdtemp(prefix="mmdomain-loader-"))
    (work / "media").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(args.samples):
        Image.fromarray((rng.random((224, 224, 3)) * 255).astype(np.uint8)).save(work / "media" / f"{i}.jpg", quality=90)
        rows.append({"id": f"s{i}", "image": f"{i}.jpg", "caption": " ".join(f"w{int(j)}" for j in rng.integers(0, 31000, 60))})
    (work / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    make_shards(work / "s.jsonl", work / "media", work / "shards", samples_per_shard=max(1, args.samples // 4))
    recipe = validate_recipe({
        "model": {"encoder": {"name": f"hf:{built.root / 'vision'}", "options": {"layer": -2}}, "llm": {"path": str(built.root / "llm")}},
        "data": {"train": str(work / "shards" / "train-*.tar"), "shuffle_buffer": 0}, "optim": {"max_steps": 1, "batch_size": 8},
        "output_dir": str(work / "run")})
    cache_features(recipe, work / "cache")

    results = {}
    shards = expand_shards(recipe.data.train)

    def raw_members():
        reader = ShardReader(shards)  # the tar index and member reads training uses, without decoding
        return (reader.read(s, i) for s in range(len(shards)) for i in range(len(reader.index(s))))

    def one_epoch(patterns, proc, workers):
        failures = FailureBudget(0)
        dataset = TrainBatches(ShardCatalog(patterns, failures), proc, layout=SampleFormat(), seed=0, shuffle_buffer=0, limit=None,
                               batch_size=8)
        stream = BatchStream(dataset, num_workers=workers, failures=failures)
        return (stream.next_batch()[1] for _ in range(dataset.batches_per_epoch()))

    results["raw_tar_read"] = {"workers_0": _rate(raw_members())}
    for mode in ("decode_preprocess", "cached_features"):
        model, proc = build_model(recipe.model)
        patterns = shards
        if mode == "cached_features":
            patterns = expand_shards(open_cache(work / "cache", model, proc, recipe)[0])
        for workers in (0, 2):
            _rate(one_epoch(patterns, proc, workers))  # warm the page cache
            results.setdefault(mode, {})[f"workers_{workers}"] = _rate(one_epoch(patterns, proc, workers))
    report = {"samples": args.samples, "samples_per_s": results, "env": environment()}
    if args.step_json:
        step = json.loads(Path(args.step_json).read_text())["variants"]
        consumed = {"decode_preprocess": step["default"]["samples_per_s"], "cached_features": step["cache"]["samples_per_s"]}
        report["step_consumes_samples_per_s"] = consumed
        report["loader_over_step"] = {m: {w: r / consumed[m] for w, r in results[m].items()} for m in consumed}
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
