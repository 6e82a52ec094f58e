"""`mmdomain make-instructions captions|reports`: the argparse wiring of the teacher path, kept apart from cli.py so
that file registers it with one call: ``add_teacher_commands(make_instructions_subparsers)``."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def add_teacher_commands(subparsers: Any) -> None:
    """Register ``captions`` and ``reports`` on ``subparsers`` (from ``parser.add_subparsers()``), each with
    ``set_defaults(func=...)`` as cli.main expects."""
    for source, text_key, help_text in (
        ("captions", "caption", "conversations from image captions, written by a teacher LLM"),
        ("reports", "report", "conversations from reports (scrubbed of names, dates and IDs first), written by a teacher LLM"),
    ):
        p = subparsers.add_parser(source, help=help_text)
        p.add_argument("table", help=f"a CSV or JSONL with columns media, {text_key} (and the group key)")
        p.add_argument("--out", required=True, help="folder for train/val/heldout.jsonl and report.json")
        teacher = p.add_mutually_exclusive_group(required=True)
        teacher.add_argument("--teacher", help="an OpenAI-compatible endpoint you run, e.g. http://127.0.0.1:8000/v1 (vLLM)")
        teacher.add_argument("--teacher-model-dir", help="or a local transformers chat model directory (never downloaded)")
        p.add_argument("--model", help="with --teacher: the model name the server serves")
        p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the endpoint's key")
        p.add_argument("--timeout", type=float, default=60.0, help="seconds per request before it counts as a timeout")
        p.add_argument("--kinds", default="describe,open_qa,closed_qa", help="comma-separated: describe, open_qa, closed_qa, multi_turn")
        p.add_argument("--templates", help="a YAML of your own prompt templates (kinds you give replace the shipped ones)")
        p.add_argument("--text-key", default=text_key)
        p.add_argument("--media-key", default="media")
        p.add_argument("--group-key", help="column to split by (patient, scene); default: the first media path")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--retries", type=int, default=2, help="extra attempts per request after a failure")
        p.add_argument("--concurrency", type=int, default=4, help="requests in flight at once")
        p.add_argument("--cache", help="answer cache (JSONL) to resume from; default: OUT.teacher-cache.jsonl beside --out")
        p.add_argument("--leak-words", type=int, default=12, help="an answer sharing this many consecutive words with its source is a leak")
        p.add_argument("--keep-leaks", action="store_true", help="keep leaking answers (flagged in provenance) instead of dropping them")
        p.add_argument("--phi-allow", action="append", default=[], help="a word never scrubbed as a name (e.g. Parkinson); repeat")
        p.add_argument("--phi-allow-file", action="append", default=[], help="a file of such words, one per line")
        p.add_argument("--split", default="0.8,0.1,0.1", help="fractions of groups for train,val,heldout")
        p.add_argument("--overwrite", action="store_true")
        p.set_defaults(func=_cmd_teacher, teacher_source=source)


def _cmd_teacher(args: argparse.Namespace) -> int:
    from .instruction_set import check_out, parse_split, summary_lines, write_instruction_set
    from .report_scrub import Scrubber, load_allow_list
    from .teacher import TRANSPORT_FAILURES, TeacherInputError, TeacherUnreachable, load_templates, read_text_table, run_teacher
    from .teacher_backends import OpenAITeacher, TransformersTeacher
    from .teacher_cache import TeacherCache

    if args.teacher and not args.model:
        raise TeacherInputError("--teacher needs --model, the name the server serves (vLLM: the path or --served-model-name)")
    # Everything that can be refused is refused before the first (paid) request.
    out = Path(args.out).resolve()
    check_out(out, args.overwrite)
    fractions = parse_split(args.split)
    templates = load_templates(args.templates)
    teacher = (OpenAITeacher(args.teacher, args.model, api_key_env=args.api_key_env, timeout=args.timeout) if args.teacher
               else TransformersTeacher(args.teacher_model_dir))
    reports = args.teacher_source == "reports"
    scrubber = Scrubber(allow=load_allow_list(args.phi_allow, args.phi_allow_file)) if reports else None
    items = read_text_table(args.table, text_key=args.text_key, media_key=args.media_key, group_key=args.group_key)
    # Beside --out, not in it: --out stays empty until the set is written, so a rerun after an outage is not refused.
    cache = TeacherCache(args.cache or out.with_name(out.name + ".teacher-cache.jsonl"))
    result = run_teacher(items, teacher, kinds=[k.strip() for k in args.kinds.split(",") if k.strip()], cache=cache,
                         seed=args.seed, source="report" if reports else "caption", templates=templates,
                         retries=args.retries, concurrency=args.concurrency, scrubber=scrubber, leak_words=args.leak_words,
                         drop_leaks=not args.keep_leaks)
    unsettled = {reason: n for reason, n in result.rejects.items() if reason in TRANSPORT_FAILURES}
    if unsettled:
        # A set written now would lack these answers for good; the cache keeps the rest, so a rerun asks only for them.
        raise TeacherUnreachable(f"{sum(unsettled.values())} requests never reached an answer ({unsettled}); nothing was written to "
                                 f"{out}. The {len(cache)} answers so far are cached in {cache.path}: rerun the same command once the "
                                 "teacher is up, and only the missing requests are sent")
    summary = write_instruction_set(result.instructions, out, seed=args.seed, fractions=fractions,
                                    rejects=result.rejects, extra_report={"teacher": result.report}, overwrite=args.overwrite)
    log.info("teacher cache: %s (%d answers)", cache.path, len(cache))
    print("\n".join(summary_lines(summary, out)))
    return 0
