"""Text generation with a trained model: decoding settings (greedy, sampling, beams, stop strings, repetition
penalty), batches of prompts, and streaming, on the device the caller names. ``evaluate``, the CLI and the server
all decode through here."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from .device import to_device
from .errors import MmdomainError


class GenerationError(MmdomainError, ValueError):
    """Decoding settings that cannot work together or are out of range; the message names the setting."""


@dataclass(frozen=True)
class GenerationOptions:
    """How to decode. The default is greedy (what evaluation scores); ``do_sample`` turns on sampling, shaped by
    ``temperature``, ``top_p`` and ``top_k`` (0: off); ``num_beams`` > 1 runs beam search; ``stop`` strings end an
    answer (they are not part of it); ``seed`` makes sampling repeatable. The repetition penalty counts generated tokens
    only: the prompt reaches the LLM as embeddings (media spliced in), so there are no prompt ids to penalise."""

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    num_beams: int = 1
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        checks = [
            (self.max_new_tokens >= 1, f"max_new_tokens must be at least 1, got {self.max_new_tokens}"),
            (self.temperature > 0, f"temperature must be above 0, got {self.temperature} (for greedy decoding leave sampling off)"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be 0 (off) or more, got {self.top_k}"),
            (self.num_beams >= 1, f"num_beams must be at least 1, got {self.num_beams}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be above 0, got {self.repetition_penalty}"),
            (all(isinstance(s, str) and s for s in self.stop), f"stop strings must be non-empty strings, got {list(self.stop)!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise GenerationError(message)

    def generate_kwargs(self, tokenizer: Any) -> dict[str, Any]:
        """Keywords for ``MultimodalLM.generate``: every knob explicit, so none of the LLM's own sampling defaults
        half-applies (see ``MultimodalLM.generate``)."""
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample, "num_beams": self.num_beams,
                                  "repetition_penalty": self.repetition_penalty,
                                  "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        if self.stop:
            # Our own criterion, not transformers' stop_strings: that one maps every vocabulary entry to its text once
            # and fails on tokenizers whose pieces do not round-trip (word-level ones, e.g. the tiny stand-in LLMs).
            from transformers import StoppingCriteriaList

            kwargs["stopping_criteria"] = StoppingCriteriaList([StopStrings(self.stop, tokenizer)])
        return kwargs


class StopStrings:
    """A stopping criterion: a row is done once the text of its last tokens holds a stop string. The answer's text is
    cut exactly afterwards (``cut_at_stop``); this only spares generating past the stop."""

    def __init__(self, stops: Sequence[str], tokenizer: Any) -> None:
        self.stops, self.tokenizer = list(stops), tokenizer
        self.window = max(len(s) for s in self.stops) + 2  # every token that is not special spells at least one character

    def __call__(self, input_ids: torch.Tensor, scores: Any, **_: Any) -> torch.Tensor:
        tails = self.tokenizer.batch_decode(input_ids[:, -self.window:].tolist(), skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in tails], dtype=torch.bool, device=input_ids.device)


@dataclass
class Completion:
    """One generated answer: its text (cut before any stop string, stripped), why it ended (``stop``: an end token
    or a stop string; ``length``: max_new_tokens reached) and how many tokens were generated."""

    text: str
    finish_reason: str
    token_ids: list[int]
    """The generated ids, through the end token when there is one."""

    @property
    def tokens(self) -> int:
        return len(self.token_ids)


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the earliest stop string (not included), and whether one was found."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


class _Seeded:
    """Seeds torch's generators for one generation when a seed is given, and puts the previous state back after
    (a request's seed never changes the next request's randomness)."""

    def __init__(self, seed: int | None, device: torch.device) -> None:
        self.seed, self.device, self.fork = seed, device, None

    def __enter__(self) -> None:
        if self.seed is None:
            return
        devices = [self.device.index if self.device.index is not None else torch.cuda.current_device()] if self.device.type == "cuda" else []
        self.fork = torch.random.fork_rng(devices=devices)
        self.fork.__enter__()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc: Any) -> None:
        if self.fork is not None:
            self.fork.__exit__(*exc)


def _end_ids(tokenizer: Any, model: Any) -> set[int]:
    ends = [tokenizer.eos_token_id, getattr(getattr(model, "llm", None), "generation_config", None)]
    ids: set[int] = set()
    for end in ends:
        end = getattr(end, "eos_token_id", end)
        if end is not None:
            ids.update(int(t) for t in (end if isinstance(end, (list, tuple)) else [end]))
    return ids


def generate_batch(model: Any, processor: Any, samples: Sequence[Any], options: GenerationOptions,
                   device: torch.device) -> list[Completion]:
    """Answers for several processed prompts at once (left-padded into one batch, every tensor on ``device``)."""
    tokenizer = processor.tokenizer
    batch = to_device(processor.collate(list(samples), padding_side="left"), device)
    with torch.no_grad(), _Seeded(options.seed, device):
        new = model.generate(batch["input_ids"], batch["attention_mask"], batch["media"], **options.generate_kwargs(tokenizer))
    ends = _end_ids(tokenizer, model)
    out = []
    for row in new.tolist():
        ended = next((i for i, t in enumerate(row) if t in ends), None)
        count = len(row) if ended is None else ended + 1
        text, stopped = cut_at_stop(tokenizer.decode(row[:count], skip_special_tokens=True), options.stop)
        finish = "stop" if stopped or ended is not None or count < options.max_new_tokens else "length"
        out.append(Completion(text.strip(), finish, row[:count]))
    return out


class StopCutter:
    """Streamed text pieces in, the text to send out: cut before the first stop string, with anything that may still
    become one held back (so no client ever sees part of a stop string), and stripped like a non-streamed answer
    (leading space dropped, trailing space sent only once more text follows)."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops, self.pending, self.started, self.stopped = list(stops), "", False, False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.pending += piece
        if not self.started:
            self.pending = self.pending.lstrip()
        cut, self.stopped = cut_at_stop(self.pending, self.stops)
        if self.stopped:
            self.pending = ""
            return self._send(cut.rstrip())
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        safe = self.pending[: len(self.pending) - hold].rstrip()
        self.pending = self.pending[len(safe):]
        return self._send(safe)

    def finish(self) -> str:
        """What is left at the end of generation (a held-back prefix of a stop string that never completed)."""
        rest, self.pending = ("" if self.stopped else self.pending.rstrip()), ""
        return self._send(rest)

    def _send(self, text: str) -> str:
        self.started = self.started or bool(text)
        return text


class _Cancelled:
    """A stopping criterion that ends generation once ``event`` is set (a client that hung up, a stop string seen)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: Any, **_: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class StreamedCompletion:
    """Iterate for the answer's text pieces as they are generated; afterwards ``finish_reason`` and ``tokens`` say
    how it ended. ``close()`` (or leaving the loop early) stops generation at the next token."""

    def __init__(self, model: Any, processor: Any, sample: Any, options: GenerationOptions, device: torch.device,
                 timeout_s: float = 600.0) -> None:
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        if options.num_beams > 1:
            raise GenerationError("streaming decodes one sequence at a time; num_beams must be 1 (or turn streaming off for beams)")
        self.options, self.tokenizer = options, processor.tokenizer
        self.cancel, self.error = threading.Event(), None
        self.finish_reason, self.tokens = "stop", 0
        self._streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=timeout_s)
        self._ends = _end_ids(self.tokenizer, model)
        batch = to_device(processor.collate([sample], padding_side="left"), device)
        kwargs = options.generate_kwargs(self.tokenizer)
        kwargs.update(streamer=self._streamer,
                      stopping_criteria=StoppingCriteriaList([*kwargs.get("stopping_criteria", []), _Cancelled(self.cancel)]))
        self._new: torch.Tensor | None = None

        def run() -> None:
            try:
                with torch.no_grad(), _Seeded(options.seed, device):
                    self._new = model.generate(batch["input_ids"], batch["attention_mask"], batch["media"], **kwargs)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
                self.error = exc
                self._streamer.end()  # unblock the consumer

        self._thread = threading.Thread(target=run, name="mmdomain-generate", daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator[str]:
        cutter = StopCutter(self.options.stop)
        try:
            for piece in self._streamer:
                text = cutter.feed(piece)
                if text:
                    yield text
                if cutter.stopped:
                    self.cancel.set()
                    break
            tail = cutter.finish()
            if tail:
                yield tail
        finally:
            self.close()
        if self.error is not None:
            raise self.error
        row = self._new[0].tolist() if self._new is not None else []
        ended = next((i for i, t in enumerate(row) if t in self._ends), None)
        self.tokens = len(row) if ended is None else ended + 1
        stopped = cutter.stopped or ended is not None or self.tokens < self.options.max_new_tokens
        self.finish_reason = "stop" if stopped else "length"

    def close(self) -> None:
        self.cancel.set()
        self._thread.join()


def stream_generate(model: Any, processor: Any, sample: Any, options: GenerationOptions, device: torch.device) -> StreamedCompletion:
    """One prompt's answer as a stream of text pieces (transformers' ``TextIteratorStreamer`` fed by a generation
    thread); joined, the pieces are exactly ``generate_batch``'s text for the same prompt and settings."""
    return StreamedCompletion(model, processor, sample, options, device)
