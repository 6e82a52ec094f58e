"""The `mmdomain` command: parses argv and calls library functions; `main(argv)` is what tests call."""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Sequence

# The commands that live in their own modules (each light to import: argparse and its own lazy imports).
from .generate_cli import add_device_argument, add_generate_command
from .lmms_task_writer import add_lmms_task_command
from .review_cli import add_review_command
from .serve_cli import add_serve_command

log = logging.getLogger("mmdomain")


def _recipe_and_overrides(given: str, overrides: list[str]) -> tuple[Path, list[str]]:
    """A recipe file, or a run directory: its resolved recipe.yaml, with output_dir set to that directory (a run
    copied or moved elsewhere continues where it now is, never in the folder its recipe was first written for)."""
    path = Path(given)
    if path.is_dir() and (path / "recipe.yaml").is_file():
        return path / "recipe.yaml", [f"output_dir={path}", *overrides]
    return path, overrides


def _cmd_run(args: argparse.Namespace) -> int:
    from .recipe import load_recipe
    from .train import train

    path, overrides = _recipe_and_overrides(args.recipe, [*args.overrides, *(["resume=true"] if args.resume else [])])
    result = train(load_recipe(path, overrides), accept_changes=args.accept_changes)
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank returns the result; one prints it
        print(json.dumps(result, indent=2))
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from .preflight import check_models, input_problems
    from .recipe import dump_recipe, load_recipe

    recipe = load_recipe(*_recipe_and_overrides(args.recipe, args.overrides))
    check_models(recipe.model)  # encoder and LLM files exist, random towers are asked for, the tokenizer round-trips
    print(dump_recipe(recipe), end="")
    # Not errors here: validating the instruct stage before the align stage has run, or before make-shards, is normal.
    for problem in input_problems(recipe):
        print(f"# not there yet: {problem}", file=sys.stderr)
    print(f"# {args.recipe}: valid (models checked: encoder and LLM files, tokenizer)", file=sys.stderr)
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _cmd_plan(args: argparse.Namespace) -> int:
    from .errors import MmdomainError
    from .gpus import find_gpu
    from .plan import make_plan, render
    from .recipe import load_recipe

    if not 0 < args.mfu <= 1:
        raise MmdomainError(f"--mfu {args.mfu} is a fraction of the GPU's peak: give a number in (0, 1], e.g. 0.35")
    recipe = load_recipe(*_recipe_and_overrides(args.recipe, args.overrides))
    plan = make_plan(recipe, find_gpu(args.gpu), gpus=args.gpus, seq=args.seq_len, items=args.media_items, answer=args.answer_tokens, mfu=args.mfu, samples=args.samples)
    print(json.dumps(plan, indent=2) if args.json else render(plan, args.recipe))
    return 0


def _cmd_ls(args: argparse.Namespace) -> int:
    if args.what == "encoders":
        from encoders import describe_encoders

        for name, text in describe_encoders().items():
            print(f"{name:20s} {text}")
    elif args.what == "connectors":
        from connectors import list_connectors

        print("\n".join(list_connectors()))
    else:
        from .demo import recipes_dir

        root = recipes_dir()
        for path in sorted(root.rglob("*.yaml")):
            first = path.read_text().splitlines()[0].lstrip("# ").strip() if path.stat().st_size else ""
            print(f"{str(path.relative_to(root)):55s} {first}")
    return 0


def _cmd_make_shards(args: argparse.Namespace) -> int:
    from .domains import build_domain
    from .shards import make_shards

    if args.recipe:
        from .recipe import RecipeError, load_recipe

        if args.media_token:
            raise RecipeError("--media-token and --recipe both name the media marker; the recipe's model.media_token decides, drop --media-token")

        model = load_recipe(args.recipe).model
        domains = {kind.token: build_domain(kind.domain.name, kind.domain.options, raw=True) for kind in model.kinds()}
        media_token = model.media_token
    else:
        media_token = args.media_token or "<image>"
        domains = {media_token: _domain_from_flags(args.domain, args.domain_options)}
    manifest = make_shards(args.jsonl, args.media, args.out, prefix=args.prefix, samples_per_shard=args.samples_per_shard,
                           caption_prompt=args.caption_prompt, overwrite=args.overwrite, domain=domains, media_token=media_token)
    print(json.dumps(manifest, indent=2))
    return 0


def _domain_from_flags(name: str, options: str):
    """--domain and --domain-options as a domain; a typo is a ShardError naming the flag and the fix, not a traceback."""
    from pydantic import ValidationError

    from .domains import build_domain, validate_options
    from .shards import ShardError

    try:
        parsed = json.loads(options)
    except json.JSONDecodeError as exc:
        raise ShardError(f"--domain-options is not valid JSON ({exc.msg}); write an object, e.g. '{{\"max_pixels\": 100000000}}'") from None
    if not isinstance(parsed, dict):
        raise ShardError(f"--domain-options must be a JSON object, got {options!r}; e.g. '{{\"max_pixels\": 100000000}}'")
    try:
        validate_options(name, parsed)  # an unknown --domain is a KeyError that names the choices
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(options)'}: {e['msg']}" for e in exc.errors())
        raise ShardError(f"--domain-options for the {name} domain: {problems} (the options are the fields of the options class in mmdomain/domains/{name}.py)") from None
    return build_domain(name, parsed)


def _cmd_make_instructions_labels(args: argparse.Namespace) -> int:
    from .instruction_set import parse_split, summary_lines, write_instruction_set
    from .label_templates import instructions_from_labels

    fractions = parse_split(args.split)
    made, skipped, facts = instructions_from_labels(args.table, templates=args.templates, group_key=args.group_key, seed=args.seed)
    report = write_instruction_set(made, Path(args.out), seed=args.seed, fractions=fractions, rejects=skipped,
                                   extra_report={"labels": facts}, overwrite=args.overwrite)
    print("\n".join(summary_lines(report, Path(args.out))))
    for column, merges in facts["merged_labels"].items():
        print(f"# {column}: labels differing only in case or spacing merged into one class: "
              + "; ".join(f"{', '.join(map(repr, seen))} -> {kept!r}" for kept, seen in merges.items()), file=sys.stderr)
    if facts["ignored_columns"]:
        print(f"# columns no task reads (a typo?): {', '.join(facts['ignored_columns'])}", file=sys.stderr)
    if args.group_key is None:
        print("# no --group-key: each media item is its own group, so one patient's images may land on both sides", file=sys.stderr)
    return 0


def _cmd_data_stats(args: argparse.Namespace) -> int:
    from .band_stats import write_band_stats

    stats = write_band_stats(args.recipe, args.out, overrides=args.overrides, max_samples=args.max_samples)
    print(json.dumps(stats, indent=2))
    return 0


def _cmd_cache_features(args: argparse.Namespace) -> int:
    from .feature_cache import cache_features
    from .recipe import load_recipe

    meta = cache_features(load_recipe(*_recipe_and_overrides(args.recipe, args.overrides)), args.out, batch_size=args.batch_size,
                          device=args.device)
    print(json.dumps(meta, indent=2))
    # The same overrides again: the cache is refused for a recipe whose encoder, weights or preprocessing differ. A run
    # directory names a run that exists already, so the new run gets its recipe and a folder of its own.
    recipe, overrides = args.recipe, list(args.overrides)
    if Path(recipe).is_dir():
        recipe, overrides = str(Path(recipe) / "recipe.yaml"), [*overrides, f"output_dir={Path(args.recipe)}-cached"]
    command = ["mmdomain", "run", recipe, *overrides, f"data.feature_cache={args.out}"]
    print(f"# train from it: {shlex.join(command)}", file=sys.stderr)
    return 0


def _eval_settings(checkpoint: Path, args: argparse.Namespace) -> dict:
    """The eval settings a command uses: each flag given on the command line, else the training recipe's ``eval``
    (which the checkpoint carries), else the recipe defaults; so `eval` scores as the run's own evaluation did.
    Not ``max_samples``: the recipe's cap keeps evaluation during training short, a test set is scored whole."""
    from .checkpoint import read_json
    from .recipe import Eval
    from .train_state import STATE

    recipe_eval = {}
    if (checkpoint / STATE).is_file():
        recipe_eval = (read_json(checkpoint / STATE).get("recipe") or {}).get("eval") or {}
    settings = {**Eval.model_validate(recipe_eval).model_dump(exclude={"every_steps"}), "max_samples": None}
    for name in settings:
        given = getattr(args, name, None)
        if given is not None:
            settings[name] = given
    return settings


def _cmd_eval(args: argparse.Namespace) -> int:
    from .checkpoint import CHECKPOINTS, resolve_checkpoint
    from .evaluate import evaluate_shards
    from .inference_run import load_for_inference

    checkpoint = resolve_checkpoint(args.checkpoint)
    settings = _eval_settings(checkpoint, args)
    run = load_for_inference(checkpoint, args.device, args.dtype)  # on --device, else the training recipe's device
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINTS else checkpoint.parent
    out = Path(args.out) if args.out else run_dir / "eval_report.json"
    report = evaluate_shards(run.model, run.processor, args.data, max_samples=settings["max_samples"], batch_size=settings["batch_size"],
                             max_new_tokens=settings["max_new_tokens"], predictions_path=out.with_suffix(".predictions.jsonl"),
                             progress=True, choice_score=settings["choice_score"], device=run.device)
    report.update(checkpoint=str(checkpoint), data=args.data, settings=settings, device=str(run.device))
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export

    out = export(args.run, args.out, args.format, merge_lora=args.merge_lora, overwrite=args.overwrite, bases=args.bases)
    print(out)
    return 0


def _cmd_tiny_llm(args: argparse.Namespace) -> int:
    from .tiny_models import write_tiny_llm_for

    summary = write_tiny_llm_for(args.jsonl, args.out, hidden=args.hidden, layers=args.layers, seed=args.seed,
                                 caption_prompt=args.caption_prompt, overwrite=args.overwrite)
    print(summary["path"])
    print(f"# a random Llama ({summary['parameters']:,} parameters, {summary['vocab_size']} tokens covering every word of "
          f"{', '.join(summary['sources'])}); it knows no language until trained.\n"
          f"# use it: mmdomain run RECIPE model.llm.path={summary['path']}", file=sys.stderr)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if stages != ["sft"]:
        return _stage3_demo(args, stages)
    summary = run_demo(args.out, seed=args.seed, train_samples=args.train_samples, heldout_samples=args.heldout_samples,
                       shuffle_images=args.shuffle_images, threads=args.threads, overrides=tuple(args.overrides))
    print(json.dumps(summary, indent=2))
    print(f"\nheld-out accuracy {summary['heldout_accuracy_after']:.3f} (before training {summary['heldout_accuracy_before']:.3f}, "
          f"chance {summary['chance']:.2f}) in {summary['seconds']:.0f} s; summary: {Path(args.out) / 'summary.json'}")
    return 0


def _stage3_demo(args: argparse.Namespace, stages: list[str]) -> int:
    from .demo_stage3 import run_stage3_demo
    from .errors import MmdomainError

    if len(stages) != 2 or stages[0] != "sft" or stages[1] not in ("dpo", "grpo"):
        raise MmdomainError(f"--stages {args.stages}: give sft (the default demo), sft,grpo or sft,dpo")
    out = args.out if args.out != "runs/demo" else f"runs/demo-{stages[1]}"
    summary = run_stage3_demo(out, objective=stages[1], seed=args.seed, train_samples=min(args.train_samples, 1000),
                              heldout_samples=args.heldout_samples, threads=args.threads, stage3_overrides=tuple(args.overrides))
    print(json.dumps({k: v for k, v in summary.items() if k != "stage3_curve"}, indent=2))
    print(f"\nheld-out accuracy after a short instruct stage {summary['heldout_accuracy_after_instruct']:.3f}, after {stages[1]} "
          f"{summary[f'heldout_accuracy_after_{stages[1]}']:.3f} (chance {summary['chance']:.2f}) in {summary['seconds']:.0f} s; "
          f"summary: {Path(out) / 'summary.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmdomain", description="Build domain multimodal models from an encoder, a connector and a local LLM.")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run one recipe stage: mmdomain run RECIPE [key=value ...]")
    p.add_argument("recipe", help="a recipe file, or a run directory (its recipe.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.max_steps=100")
    p.add_argument("--resume", action="store_true", help="continue the run in output_dir from its newest complete checkpoint")
    p.add_argument("--accept-changes", action="store_true",
                   help="with --resume: continue even though the model, data or trainable settings changed")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("validate", help="load and check a recipe; print it fully resolved")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("plan", help="memory, FLOPs and time of a recipe on a GPU, from configs only (no weights loaded), and what makes it fit")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key=value recipe overrides, as for run")
    p.add_argument("--gpu", default="a100-80g", help="h100-80g, a100-80g, a100-40g, l4-24g or cpu (default a100-80g)")
    p.add_argument("--gpus", type=_positive, default=1, help="GPUs (processes under torchrun)")
    p.add_argument("--seq-len", type=_positive, help="tokens per sample (default: the recipe's data.pack_length or model.max_length)")
    p.add_argument("--media-items", type=_positive, default=1, help="media items per sample (default 1)")
    p.add_argument("--answer-tokens", type=_positive, help="supervised (answer) tokens per sample (default: every text token, an upper bound)")
    p.add_argument("--samples", type=_positive, help="training samples per epoch (default: from the shards' manifest.json)")
    p.add_argument("--mfu", type=float, default=0.35, help="model FLOPs utilisation assumed for time (default 0.35)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("ls", help="list encoders, connectors or shipped recipes")
    p.add_argument("what", choices=["encoders", "connectors", "recipes"])
    p.set_defaults(func=_cmd_ls)

    p = sub.add_parser("make-shards", help="write webdataset shards from a media folder and a JSONL of samples")
    p.add_argument("--jsonl", required=True)
    p.add_argument("--media", required=True, help="folder the JSONL's media paths are relative to")
    p.add_argument("--out", required=True)
    p.add_argument("--prefix", default="train")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--caption-prompt", default="Describe the image.")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--domain", default="generic", help="media decoding domain: generic, medical, remote_sensing, audio")
    p.add_argument("--domain-options", default="{}", help='JSON options of the domain, e.g. \'{"phi_allow": ["Modality"]}\'')
    p.add_argument("--media-token", help="the media marker in the JSONL's text (default <image>; with --recipe, the recipe's "
                                          "model.media_token)")
    p.add_argument("--recipe", help="take the domain and its options, and the media markers, from this recipe's model instead")
    p.set_defaults(func=_cmd_make_shards)

    p = sub.add_parser("make-instructions", help="turn labels, captions or reports into instruction JSONL for make-shards: train / "
                                                 "val / heldout, split by group")
    instr_sub = p.add_subparsers(dest="instructions_from", required=True)
    q = instr_sub.add_parser(
        "labels", help="closed questions from a table of media and labels (classification, presence, count, location)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Columns of TABLE (CSV with a header, or JSONL):\n"
                    "  media               path(s) relative to make-shards' --media; several: a;b (a list in JSONL)\n"
                    "  label               label(s) a;b: classification (one label), presence yes/no (none/normal = no finding)\n"
                    "  label_<attribute>   another classification, e.g. label_view\n"
                    "  count_<object>      a whole number: how many <object>s\n"
                    "  location[_<object>] a place in words (upper left), or a box x0,y0,x1,y1 relative to the image size\n"
                    "  box[_<object>]      a box x0,y0,x1,y1 relative to the image size, turned into words\n"
                    "  --group-key column  patient / scene id: a group never lands on two sides of the split\n"
                    "Templates: mmdomain/templates/labels.yaml; --templates adds or replaces tasks by name.")
    q.add_argument("table", help="the label table (.csv or .jsonl)")
    q.add_argument("--out", required=True, help="folder for train.jsonl, val.jsonl, heldout.jsonl and report.json")
    q.add_argument("--group-key", help="column of the patient or scene id (default: each media item is its own group)")
    q.add_argument("--templates", help="a YAML of tasks that add to or replace the shipped ones")
    q.add_argument("--seed", type=int, default=0, help="picks paraphrases, choice order, negatives and the split")
    q.add_argument("--split", default="0.8,0.1,0.1", help="fractions of groups for train,val,heldout")
    q.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    q.set_defaults(func=_cmd_make_instructions_labels)
    from .teacher_cli import add_teacher_commands

    add_teacher_commands(instr_sub)

    p = sub.add_parser("cache-features", help="run the recipe's frozen encoder once over its shards and store the features")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_cmd_cache_features)

    p = sub.add_parser("data", help="dataset tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    q = data_sub.add_parser("stats", help="per-band mean/std of a remote-sensing recipe's training shards, as JSON for options.stats")
    q.add_argument("recipe")
    q.add_argument("overrides", nargs="*")
    q.add_argument("--out", required=True)
    q.add_argument("--max-samples", type=int, default=2000)
    q.set_defaults(func=_cmd_data_stats)

    p = sub.add_parser("eval", help="evaluate a run or checkpoint on shards")
    p.add_argument("checkpoint", help="run directory or checkpoint directory")
    p.add_argument("--data", required=True, help="shard pattern, e.g. 'shards/test-*.tar'")
    p.add_argument("--max-samples", type=int, help="score only the first N samples (default: all)")
    p.add_argument("--batch-size", type=int, help="default: the training recipe's eval.batch_size")
    p.add_argument("--max-new-tokens", type=int, help="default: the training recipe's eval.max_new_tokens")
    p.add_argument("--choice-score", choices=["mean", "sum"],
                   help="closed questions: mean (per token) or summed log-likelihood of each choice; default: the recipe's eval.choice_score")
    p.add_argument("--out", help="JSON report path (default: eval_report.json in the run directory)")
    add_device_argument(p)
    p.set_defaults(func=_cmd_eval)

    add_generate_command(sub, _eval_settings)
    add_serve_command(sub)
    add_lmms_task_command(sub)
    add_review_command(sub)

    p = sub.add_parser("export", help="export a run for use outside mmdomain: llava-hf (transformers/vLLM), native (self-contained, "
                       "PEFT adapters) or encoder (the encoder alone); writes a model card")
    p.add_argument("run", help="a run directory (its newest complete checkpoint) or a checkpoint directory")
    p.add_argument("--format", required=True, choices=["llava-hf", "native", "encoder"])
    p.add_argument("out", help="the folder to write (refused if it exists, unless --overwrite)")
    p.add_argument("--merge-lora", action="store_true", help="native: merge LoRA into the weights instead of writing PEFT adapters")
    p.add_argument("--bases", choices=["copy", "reference"], default="copy",
                   help="native: copy the frozen base LLM and encoder into OUT (default), or reference them by path and sha256")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT (only once the new export is complete)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("tiny-llm", help="write a tiny random LLM whose vocabulary covers every word of your JSONL (a stand-in for trying recipes)")
    p.add_argument("--jsonl", required=True, action="append", help="a samples JSONL, as for make-shards (repeat for several)")
    p.add_argument("--out", required=True, help="folder to write the model to; then give it as model.llm.path")
    p.add_argument("--hidden", type=int, default=128, help="hidden size (a multiple of 4)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--caption-prompt", default="Describe the image.", help="the user turn make-shards writes for captions")
    p.add_argument("--overwrite", action="store_true", help="replace the model already in --out")
    p.set_defaults(func=_cmd_tiny_llm)

    p = sub.add_parser("demo", help="the CPU demo: synthetic scans, tiny models, align + instruct, held-out accuracy")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-samples", type=int, default=4000)
    p.add_argument("--heldout-samples", type=int, default=200)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--shuffle-images", action="store_true", help="control run: images shuffled against answers")
    p.add_argument("--stages", default="sft", help="sft (align + instruct), or sft,grpo / sft,dpo: a deliberately short instruct "
                   "stage, then stage 3 from it (runs/demo-grpo, runs/demo-dpo; overrides then apply to stage 3)")
    p.add_argument("overrides", nargs="*", help="recipe overrides applied to both stages, e.g. optim.max_steps=50")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after flags (`run RECIPE --resume optim.max_steps=9`), which argparse cannot split from its
    # positional list once an option intervenes; any leftover key=value joins the overrides.
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        return args.func(args)
    except Exception as exc:  # noqa: BLE001 - every error becomes one line (the traceback with --debug)
        if args.debug:
            raise
        from .errors import RunInterrupted

        print(f"mmdomain {args.command}: {describe_error(exc)}", file=sys.stderr)
        return exc.exit_code if isinstance(exc, RunInterrupted) else 2 if is_user_error(exc) else 1
    except KeyboardInterrupt:
        if args.debug:
            raise
        hint = {"run": "a run continues from its newest checkpoint with `mmdomain run RECIPE --resume`",
                "make-instructions": "the teacher's answers so far are cached: rerun the same command to continue"}.get(args.command, "")
        print(f"mmdomain {args.command}: interrupted{'; ' + hint if hint else ''}", file=sys.stderr)
        return 130


# Optional libraries of the extras, and the extra that installs each.
_EXTRAS = {"pydicom": "medical", "nibabel": "medical", "tifffile": "remote-sensing", "soundfile": "audio", "pylibjpeg": "dicom-codecs",
           "openjpeg": "dicom-codecs", "libjpeg": "dicom-codecs", "fastapi": "serve", "uvicorn": "serve", "starlette": "serve",
           "lmms_eval": "lmms-eval"}


def _missing_extra(exc: BaseException) -> str | None:
    name = getattr(exc, "name", None) or ""
    return _EXTRAS.get(name.split(".")[0]) if isinstance(exc, ModuleNotFoundError) else None


def is_user_error(exc: BaseException) -> bool:
    """Errors about the user's input or machine (fixable there), as opposed to a defect in mmdomain."""
    from pydantic import ValidationError

    from connectors import ConnectorOptionError
    from encoders import EncoderError

    from .errors import MmdomainError

    return isinstance(exc, (MmdomainError, EncoderError, ConnectorOptionError, OSError, KeyError, ValidationError)) or _missing_extra(exc) is not None


def describe_error(exc: BaseException) -> str:
    extra = _missing_extra(exc)
    if extra is not None:
        return f"error: this needs {exc.name}, which comes with an optional extra: pip install 'mmdomain[{extra}]'"
    if not is_user_error(exc):
        return (f"internal error: {type(exc).__name__}: {exc} (this is a defect in mmdomain, not in your input: rerun with --debug "
                "for the traceback and please report it)")
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc  # KeyError's str() adds quotes
    if isinstance(exc, OSError) and not str(message):
        message = f"{type(exc).__name__} {exc.filename or ''}".strip()
    return f"error: {message}"


if __name__ == "__main__":
    sys.exit(main())
