"""`mmdomain review RUN --data SHARDS --out judgements.jsonl`: the expert review page as a command (the parser and
the wiring; the page is review_app, the queue review_session, the file review_store)."""
from __future__ import annotations

import argparse
import getpass
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def add_review_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("review", help="a local web page where a domain expert judges the model's answers (preference pairs for make-shards)",
                       description="Serves a page on 127.0.0.1 showing each sample's media (decoded as the run decodes them), its "
                                   "question and two answers; keys 1/2 pick the better one, Shift+1/2 edit one into the preferred "
                                   "answer, f flags, s skips. Each judgement is appended to --out (fsynced) with the item's media "
                                   "copied to OUT.media/; starting again continues where the file ends.")
    p.add_argument("run", help="run directory or checkpoint directory")
    p.add_argument("--data", required=True, action="append", help="shard pattern, e.g. 'shards/heldout-*.tar' (repeat for several)")
    p.add_argument("--out", required=True, help="the judgements JSONL (appended to; media go to OUT.media/ beside it)")
    p.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (0: a free one); for a remote machine use ssh -L")
    p.add_argument("--judge", help="who judges (written into each line; default: the OS user name)")
    p.add_argument("--mode", choices=["pair", "reference"], default="pair",
                   help="pair: two sampled answers; reference: the model's greedy answer against the sample's own answer, in random order")
    p.add_argument("--limit", type=int, help="review only the first N samples of --data")
    p.add_argument("--temperature", type=float, default=0.8, help="pair mode sampling temperature")
    p.add_argument("--top-p", type=float, default=0.95, help="pair mode nucleus sampling")
    p.add_argument("--max-new-tokens", type=int, help="default: the training recipe's eval.max_new_tokens")
    p.add_argument("--seed", type=int, default=0, help="seeds each item's answers (with its key): a restart shows the same ones")
    p.add_argument("--composite", help="GeoTIFFs: three positions among the run's selected bands shown as R,G,B, e.g. 2,1,0 "
                                       "(default: a composite run's own bands, else the first three)")
    p.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:1 or auto")
    p.add_argument("--max-side", type=int, default=2048, help="images larger than this (pixels, longer side) are shown shrunk")
    p.set_defaults(func=run_review_command)


def default_judge() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name known to the OS (a container's numeric uid)
        return "unknown"


def parse_composite(text: str | None) -> tuple[int, int, int] | None:
    from .review_store import ReviewError

    if text is None:
        return None
    try:
        bands = tuple(int(b) for b in text.split(","))
    except ValueError:
        bands = ()
    if len(bands) != 3 or min(bands) < 0:
        raise ReviewError(f"--composite {text!r}: give three band positions (0-based, among the run's selected bands), e.g. 2,1,0")
    return bands  # type: ignore[return-value]


def run_review_command(args: argparse.Namespace) -> int:
    import fastapi  # noqa: F401 - the optional extra `serve`: missing, the CLI names it before anything loads
    import uvicorn  # noqa: F401

    from .builder import load_pretrained
    from .checkpoint import resolve_checkpoint
    from .cli import _eval_settings
    from .data import expand_shards
    from .device import resolve_device
    from .domains import build_domain
    from .review_answers import Sampling
    from .review_app import create_app, serve
    from .review_items import ReviewData
    from .review_session import ReviewSession
    from .review_store import JudgementStore, ReviewError

    composite = parse_composite(args.composite)
    # Named like `generate` and `serve` name it, before the model loads: torch's own error ("no NVIDIA driver", a list of
    # every device type) came after the load and read as a defect of mmdomain.
    device = resolve_device(args.device, "--device")
    if args.limit is not None and args.limit < 1:
        raise ReviewError(f"--limit {args.limit}: give a positive number of samples")
    checkpoint = resolve_checkpoint(args.run)
    max_new_tokens = _eval_settings(checkpoint, args)["max_new_tokens"]
    expand_shards(args.data)  # a pattern that matches nothing is named before a model loads
    store = JudgementStore(args.out)  # before the model too: a second review of the same file stops at once
    try:
        model, processor = load_pretrained(checkpoint)
        model.to(device).eval()
        data = ReviewData(args.data, processor, limit=args.limit)
        raw = {kind.token: build_domain(kind.domain.name, kind.domain.options, raw=True) for kind in model.spec.kinds()}
        settings = Sampling(mode=args.mode, temperature=args.temperature, top_p=args.top_p, max_new_tokens=max_new_tokens, seed=args.seed)
        session = ReviewSession(model, processor, data, store, settings, judge=args.judge or default_judge(), run=str(checkpoint),
                                raw_domains=raw, composite=composite, max_side=args.max_side)
    except BaseException:
        store.abandon()
        raise
    try:
        session.current()  # the first item is ready (or the data is found empty) before the address is printed
        progress = session.progress()
        title = f"mmdomain review · {Path(args.run).name}"

        def ready(url: str) -> None:
            print(f"review page: {url}  ({progress['judged']} / {progress['total']} judged; Ctrl-C stops, every judgement made is "
                  f"already in {store.path})", flush=True)

        serve(create_app(session, title=title), args.port, on_ready=ready)
    finally:
        session.close()
    progress = session.progress()
    print(f"{progress['judged']} / {progress['total']} judged in {store.path} (media in {store.media_dir}); "
          f"train on them: mmdomain make-shards --jsonl {store.path} --media {store.media_dir} ...", file=sys.stderr)
    return 0
