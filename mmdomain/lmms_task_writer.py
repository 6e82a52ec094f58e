"""`mmdomain lmms-task`: turn shards into an lmms-eval task: an index of the samples (shard, key, question, answer,
choices) and a task YAML that includes one of the shipped templates (mmdomain/lmms_tasks/) and reads that index."""
from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import Any

from .errors import MmdomainError

TEMPLATES = ("medical_vqa", "scene_classification")


class LmmsTaskError(MmdomainError, ValueError):
    """A task that cannot be written: an unknown template, a bad name, no samples; the message says the fix."""


def templates_dir() -> Path:
    return Path(__file__).with_name("lmms_tasks")


def write_lmms_task(processor: Any, patterns: str | list[str], out: str | Path, *, name: str, template: str,
                    error_budget: int = 10) -> dict[str, Any]:
    """Write ``out/<name>.jsonl`` (one line per sample of ``patterns``, in `mmdomain eval`'s order) and ``out/<name>.yaml``.
    Run it with ``lmms-eval --model mmdomain --model_args run=RUN --tasks <name> --include_path <out>``."""
    from .data import FailureBudget, expand_shards, iter_records
    from .evaluate import _split

    if template not in TEMPLATES:
        raise LmmsTaskError(f"--template {template!r} is not one of {', '.join(TEMPLATES)}")
    if not re.fullmatch(r"[A-Za-z0-9_]+", name):
        raise LmmsTaskError(f"--name {name!r}: use letters, digits and _ only (it is an lmms-eval task name)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    failures = FailureBudget(error_budget)
    marker = re.compile("|".join(re.escape(k.token) for k in processor.kinds))
    rows = []
    for shard in expand_shards(patterns):  # shard by shard, as the plugin reads them back (keys are formed the same way)
        for record in iter_records([shard], processor.domains, failures=failures, media_token=processor.media_token):
            prompt, answer = _split(record)
            question = " ".join(" ".join(marker.sub(" ", t["content"]).split()) for t in prompt if t["role"] == "user")
            rows.append({"mmdomain_shard": str(Path(shard).resolve()), "mmdomain_key": record.key, "question": question,
                         "answer": answer, "choices": list(record.choices or []),
                         "answer_type": record.answer_type or ("closed" if record.choices else "open")})
    if not rows:
        raise LmmsTaskError(f"no samples in {patterns!r} (skipped: {failures.total}); check the shard pattern")
    index, task = out / f"{name}.jsonl", out / f"{name}.yaml"
    _write_atomically(index, "".join(json.dumps(r) + "\n" for r in rows))
    _write_atomically(task, f"# written by `mmdomain lmms-task`: {len(rows)} samples of {patterns}\n"
                            f"include: {templates_dir() / (template + '.yaml')}\n"
                            f"task: {name}\n"
                            f"dataset_kwargs:\n  data_files:\n    test: {index.name}\n")
    return {"task": name, "yaml": str(task), "index": str(index), "samples": len(rows), "skipped": failures.total,
            "shards": sorted({r["mmdomain_shard"] for r in rows})}


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def add_lmms_task_command(sub: Any) -> None:
    p = sub.add_parser("lmms-task", help="write an lmms-eval task (index + YAML) over shards, for `lmms-eval --model mmdomain`")
    p.add_argument("checkpoint", help="the run whose domain decoders read the shards (run or checkpoint directory)")
    p.add_argument("--data", required=True, help="shard pattern, e.g. 'shards/test-*.tar'")
    p.add_argument("--out", required=True, help="folder for <name>.yaml and <name>.jsonl; give it to lmms-eval as --include_path")
    p.add_argument("--name", required=True, help="the lmms-eval task name (letters, digits, _)")
    p.add_argument("--template", choices=TEMPLATES, default="medical_vqa",
                   help="medical_vqa: closed + open VQA (exact match, closed accuracy, open token recall/F1); "
                        "scene_classification: accuracy")
    p.set_defaults(func=_cmd_lmms_task)


def _cmd_lmms_task(args: argparse.Namespace) -> int:
    import sys

    from .inference_run import load_for_inference

    run = load_for_inference(args.checkpoint, "cpu")
    summary = write_lmms_task(run.processor, args.data, args.out, name=args.name, template=args.template)
    print(json.dumps(summary, indent=2))
    print(f"# run it: HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 lmms-eval --model mmdomain --model_args run={args.checkpoint} "
          f"--tasks {args.name} --include_path {args.out} --output_path results/  (pip install 'mmdomain[lmms-eval]')", file=sys.stderr)
    return 0
