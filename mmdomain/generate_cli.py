"""`mmdomain generate`: answer questions about media files with a trained run; decoding flags shared with `serve`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .errors import MmdomainError


class GenerateArgumentError(MmdomainError, ValueError):
    """Flags of `mmdomain generate` that do not fit together; the message names them."""


def add_device_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where the model runs (default: the training recipe's device)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"],
                   help="cast every weight to this dtype (bf16/fp16 halve a GPU model's memory; scores may then move); default: "
                        "the dtypes the run trained and evaluated with (e.g. a bf16 LLM beside an fp32 connector)")


def add_decoding_arguments(p: argparse.ArgumentParser) -> None:
    """The decoding flags (`generate`); greedy unless --do-sample or --num-beams ask otherwise."""
    p.add_argument("--max-new-tokens", type=int, help="default: the training recipe's eval.max_new_tokens")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding (with --temperature/--top-p/--top-k)")
    p.add_argument("--temperature", type=float, help="sampling temperature (> 0; needs --do-sample; default 1.0)")
    p.add_argument("--top-p", type=float, help="nucleus sampling: keep the smallest set of tokens with this much probability (needs --do-sample)")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens, 0 = all (needs --do-sample)")
    p.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (1: off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeating tokens (1: off)")
    p.add_argument("--stop", action="append", default=[], help="end the answer before this string (repeat for several)")
    p.add_argument("--seed", type=int, help="seed for sampling, so a sampled answer can be reproduced")


def decoding_options(args: argparse.Namespace, max_new_tokens: int) -> Any:
    from .generation import GenerationOptions

    sampling = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    given = [f"--{name.replace('_', '-')}" for name, value in sampling.items() if value is not None]
    if given and not args.do_sample:
        raise GenerateArgumentError(f"{', '.join(given)} shape sampling, which is off: add --do-sample (decoding is greedy without it)")
    return GenerationOptions(max_new_tokens=max_new_tokens, do_sample=args.do_sample, num_beams=args.num_beams,
                             repetition_penalty=args.repetition_penalty, stop=tuple(args.stop), seed=args.seed,
                             **{name: value for name, value in sampling.items() if value is not None})


def add_generate_command(sub: Any, eval_settings: Any) -> None:
    p = sub.add_parser("generate", help="answer questions about media files with a trained run (batched, sampled, beams, streamed)")
    p.add_argument("checkpoint")
    p.add_argument("--image", "--media", dest="image", required=True, action="append",
                   help="a media file (an image, a DICOM, a WAV, ...); repeat for several prompts, answered in batches")
    p.add_argument("--question", required=True, action="append",
                   help="the question; once for every media file, or once per --image in the same order")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    p.add_argument("--stream", action="store_true", help="print the answer as it is generated (one prompt, no beams)")
    add_decoding_arguments(p)
    add_device_argument(p)
    p.set_defaults(func=lambda args: cmd_generate(args, eval_settings))


def cmd_generate(args: argparse.Namespace, eval_settings: Any) -> int:
    from .checkpoint import resolve_checkpoint
    from .generation import generate_batch, stream_generate
    from .inference_run import load_for_inference

    media = [Path(m) for m in args.image]
    for path in media:
        if not path.is_file():
            raise FileNotFoundError(f"media file {str(path)!r} does not exist")
    questions = args.question * len(media) if len(args.question) == 1 else args.question
    if len(questions) != len(media):
        raise GenerateArgumentError(f"{len(args.question)} --question for {len(media)} --image: give one question for all, or one per image")
    if args.stream and len(media) > 1:
        raise GenerateArgumentError("--stream prints one answer as it is generated: give one --image (or drop --stream to batch them)")
    if args.batch_size < 1:
        raise GenerateArgumentError(f"--batch-size must be at least 1, got {args.batch_size}")
    checkpoint = resolve_checkpoint(args.checkpoint)
    options = decoding_options(args, eval_settings(checkpoint, args)["max_new_tokens"])
    run = load_for_inference(checkpoint, args.device, args.dtype)
    processor = run.processor
    samples = []
    for path, question in zip(media, questions):
        conversation, items = processor.decode_media([{"role": "user", "content": f"{processor.media_token} {question}"}],
                                                     [(path.name, path.read_bytes())])
        samples.append(processor(conversation, items, key=path.name, add_generation_prompt=True))
    if args.stream:
        stream = stream_generate(run.model, processor, samples[0], options, run.device)
        for piece in stream:
            print(piece, end="", flush=True)
        print()
        return 0
    for start in range(0, len(samples), args.batch_size):
        for path, done in zip(media[start:], generate_batch(run.model, processor, samples[start:start + args.batch_size], options, run.device)):
            print(done.text if len(media) == 1 else f"{path}\t{done.text}")
            if not done.text:
                # An empty line alone looks like a crash; say what the model did.
                first = processor.tokenizer.convert_ids_to_tokens(done.token_ids[0]) if done.token_ids else None
                said = f"its first new token was {first!r}, which ends the answer" if first is not None else "it produced no token"
                print(f"# {path.name}: the model answered nothing: {said} (common early in training; check the run's eval in result.json, "
                      f"or train longer). Up to {options.max_new_tokens} tokens (--max-new-tokens).", file=sys.stderr)
    return 0
