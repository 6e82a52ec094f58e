"""Captions and reports -> instructions through a teacher LLM: prompt per task kind, JSON reply validated against a
schema, retries within a budget, rejects counted by reason, a resumable cache, provenance on every line.

    teacher = OpenAITeacher("http://127.0.0.1:8000/v1", "Qwen2.5-7B-Instruct")
    items = read_text_table("reports.csv", text_key="report", group_key="patient_id")
    result = run_teacher(items, teacher, kinds=["closed_qa"], cache=TeacherCache("cache.jsonl"), seed=0,
                         scrubber=Scrubber())
    result.instructions  # mmdomain.instruction_set.Instruction objects, for write_instruction_set
    result.rejects       # Counter of reject reasons; result.report: counts for report.json

This file is long (~510 lines) because the run loop, its counting, the input table and the reply schemas belong
together: each check of a reply feeds the counts the report gives.
"""
from __future__ import annotations

import difflib
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import MmdomainError
from .instruction_set import Instruction, InstructionSetError, check_media_paths
from .report_scrub import Scrubber
from .teacher_backends import TeacherBackend, TeacherRetryable
from .teacher_cache import TeacherCache, cache_key

log = logging.getLogger(__name__)

TASK_KINDS = ("describe", "open_qa", "closed_qa", "multi_turn")


class TeacherInputError(MmdomainError, ValueError):
    """A bad table, template file or option for the teacher path; the message names it and the fix."""


# ----- reply schemas: one per task kind -------------------------------------------------------------------------

Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]


class _Reply(BaseModel):
    model_config = ConfigDict(extra="ignore")  # teachers often add a note or a rationale field; it is not used


class DescribeReply(_Reply):
    description: Text


class OpenQAReply(_Reply):
    question: Text
    answer: Text


class ClosedQAReply(_Reply):
    question: Text
    answer: Text
    choices: list[Text]

    @field_validator("choices")
    @classmethod
    def _distinct(cls, choices: list[str]) -> list[str]:
        if not 2 <= len(choices) <= 10:
            raise ValueError(f"needs 2 to 10 choices, got {len(choices)}")
        if len(set(choices)) != len(choices):
            raise ValueError("choices repeat")
        return choices

    @model_validator(mode="after")
    def _answer_once(self) -> ClosedQAReply:
        if self.choices.count(self.answer) != 1:
            raise ValueError(f"answer {self.answer!r} must be among the choices exactly once")
        return self


class Turn(_Reply):
    question: Text
    answer: Text


class MultiTurnReply(_Reply):
    turns: list[Turn]

    @field_validator("turns")
    @classmethod
    def _two_or_more(cls, turns: list[Turn]) -> list[Turn]:
        if len(turns) < 2:
            raise ValueError(f"a conversation needs 2 or more turns, got {len(turns)}")
        return turns


REPLY_SCHEMAS: dict[str, type[_Reply]] = {"describe": DescribeReply, "open_qa": OpenQAReply, "closed_qa": ClosedQAReply,
                                          "multi_turn": MultiTurnReply}

# A refusal: the whole reply, or an answer field, opening like a model declining. Checked before the schema so it
# is counted as a refusal rather than as malformed JSON.
_REFUSAL = re.compile(r"^\W*(i\s*(?:'m|am)\s+(?:sorry|unable|not able)|i\s+(?:can(?:no|')t|cannot|won't|will not)|"
                      r"sorry\b|as an ai\b|unfortunately,? i\b)", re.IGNORECASE)


class ReplyRejected(Exception):
    """A reply that does not give a usable instruction; ``reason``: refusal, malformed_json or schema."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def parse_reply(kind: str, text: str) -> _Reply:
    """The reply ``text`` validated against the schema of ``kind``, or ReplyRejected saying why not."""
    if not text.strip() or _REFUSAL.match(text):
        raise ReplyRejected("refusal", text[:80])
    # Models wrap JSON in ```json fences or a sentence; the object is what lies between the outer braces.
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        raise ReplyRejected("malformed_json", "no JSON object in the reply")
    try:
        data = json.loads(text[start:end + 1])
    except json.JSONDecodeError as exc:
        raise ReplyRejected("malformed_json", str(exc)) from exc
    try:
        reply = REPLY_SCHEMAS[kind].model_validate(data)
    except ValidationError as exc:
        raise ReplyRejected("schema", str(exc).splitlines()[0]) from exc
    if any(not a or _REFUSAL.match(a) for a in _answers(reply)):
        raise ReplyRejected("refusal", "an answer declines")
    return reply


def _answers(reply: _Reply) -> list[str]:
    if isinstance(reply, DescribeReply):
        return [reply.description]
    if isinstance(reply, MultiTurnReply):
        return [t.answer for t in reply.turns]
    return [reply.answer]  # type: ignore[attr-defined]


# ----- templates ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Template:
    kind: str
    id: str
    system: str
    user: str
    question: str = ""  # for describe: the user question of the written instruction

    def messages(self, source: str, text: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system},
                {"role": "user", "content": self.user.format(source=source, text=text)}]


def load_templates(path: str | Path | None = None) -> dict[str, Template]:
    """The shipped templates (mmdomain/templates/teacher.yaml), with the kinds in ``path`` replacing them."""
    shipped = yaml.safe_load(resources.files("mmdomain").joinpath("templates/teacher.yaml").read_text(encoding="utf-8"))
    raw = dict(shipped)
    if path is not None:
        try:
            own = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise TeacherInputError(f"template file {str(path)!r} cannot be read: {exc}") from exc
        if not isinstance(own, dict) or set(own) - set(TASK_KINDS):
            raise TeacherInputError(f"template file {str(path)!r}: top-level keys must be task kinds {list(TASK_KINDS)}")
        raw.update(own)
    templates = {}
    for kind, spec in raw.items():
        if not isinstance(spec, dict):
            raise TeacherInputError(f"template {kind!r}{f' in {str(path)!r}' if path else ''} must be a mapping with id, system and user")
        missing = {"id", "system", "user"} - set(spec)
        if missing:
            raise TeacherInputError(f"template {kind!r}{f' in {str(path)!r}' if path else ''} lacks {sorted(missing)}")
        if not isinstance(spec.get("user"), str) or "{text}" not in spec["user"]:
            raise TeacherInputError(f"template {kind!r}: its user prompt must be text containing {{text}} where the source text goes")
        try:
            spec["user"].format(source="caption", text="")
        except (KeyError, IndexError, ValueError) as exc:
            raise TeacherInputError(f"template {kind!r}: its user prompt may hold only {{source}} and {{text}} (write {{{{ and }}}} for "
                                    f"literal braces): {type(exc).__name__} {exc}") from None
        templates[kind] = Template(kind=kind, id=spec["id"], system=spec["system"], user=spec["user"],
                                   question=spec.get("question", "Describe the image in detail."))
    return templates


# ----- input table ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TextItem:
    """One row of a captions/reports table: its media, its text, its split group, and where it came from."""
    media: list[str]
    text: str
    group: str
    source_file: str
    row: int


def read_text_table(path: str | Path, *, text_key: str, media_key: str = "media", group_key: str | None = None) -> list[TextItem]:
    """Rows of a CSV (header row) or JSONL table. ``media`` may be one path, a JSON list, or ``a.png;b.png`` in CSV.
    Without ``group_key`` each row's first media path is its group (a split by image, not by patient)."""
    path = Path(path)
    if not path.is_file():
        raise TeacherInputError(f"table {str(path)!r} not found; give a CSV or JSONL with columns {media_key}, {text_key}")
    from .table_rows import read_table_rows

    items = []
    for number, row in read_table_rows(path, TeacherInputError):
        # make-shards reads `image` as well as `media`; so does this, so the same caption JSONL serves both.
        row_media_key = "image" if media_key == "media" and "media" not in row and "image" in row else media_key
        for key in (row_media_key, text_key, group_key):
            if key is not None and key not in row:
                raise TeacherInputError(f"{path}:{number}: no column {key!r} (columns: {sorted(row)}); "
                                        f"name it with --{'text' if key == text_key else 'media' if key == media_key else 'group'}-key")
        where = f"{path}:{number}"
        media = row[row_media_key]
        if isinstance(media, str) and media.startswith("["):
            try:
                media = json.loads(media)
            except json.JSONDecodeError:
                raise TeacherInputError(f"{where}: media {media!r} starts like a JSON list but is not one") from None
        try:
            media = check_media_paths(media, where)
        except InstructionSetError as exc:
            raise TeacherInputError(str(exc)) from None
        group = row[group_key] if group_key else media[0]
        if group is None or not str(group).strip():
            raise TeacherInputError(f"{where}: the group column {group_key!r} is empty; every row needs its patient or scene id "
                                    "(else one patient may land on both sides of the split)")
        text = row[text_key]
        items.append(TextItem(media=media, text="" if text is None else str(text), row=number, source_file=str(path), group=str(group)))
    return items


# ----- leak check -----------------------------------------------------------------------------------------------

def longest_shared_words(a: str, b: str) -> int:
    """The longest run of consecutive words (case-insensitive) that ``a`` and ``b`` share."""
    wa, wb = re.findall(r"\w+", a.lower()), re.findall(r"\w+", b.lower())
    return difflib.SequenceMatcher(None, wa, wb, autojunk=False).find_longest_match(0, len(wa), 0, len(wb)).size


# ----- output ---------------------------------------------------------------------------------------------------

def to_instruction(item: TextItem, kind: str, reply: _Reply, template: Template, provenance: dict[str, Any]) -> Instruction:
    """The instruction a validated reply makes, for ``instruction_set.write_instruction_set``."""
    conversations = None
    choices = None
    if isinstance(reply, DescribeReply):
        question, answer = template.question, reply.description
    elif isinstance(reply, MultiTurnReply):
        question, answer = reply.turns[0].question, reply.turns[0].answer
        conversations = [turn for t in reply.turns
                         for turn in ({"role": "user", "content": t.question}, {"role": "assistant", "content": t.answer})]
    elif isinstance(reply, ClosedQAReply):
        question, answer, choices = reply.question, reply.answer, list(reply.choices)
    else:
        question, answer = reply.question, reply.answer  # type: ignore[attr-defined]
    return Instruction(media=list(item.media), question=question, answer=answer, choices=choices,
                       answer_type="closed" if choices else "open", conversations=conversations, group=item.group,
                       provenance=provenance, kind=kind)


# ----- the run --------------------------------------------------------------------------------------------------

@dataclass
class TeacherResult:
    instructions: list[Instruction]
    rejects: Counter[str]
    report: dict[str, Any]


@dataclass
class _Outcome:
    index: int
    kind: str
    key: str
    reply: str | None
    reason: str | None
    attempts: int
    failures: Counter[str] = field(default_factory=Counter)
    cached: bool = False


# Failures of the way to the teacher, not of its answer: never cached, so a rerun asks again.
TRANSPORT_FAILURES = ("timeout", "connection", "server_error")
# Requests in a row that fail on the way: the teacher is down, not one answer hard (each has used its retries already).
UNREACHABLE_AFTER = 3


class TeacherUnreachable(MmdomainError, RuntimeError):
    """The endpoint keeps failing; the message says so and how to continue (the answers so far are cached)."""


class StopRun(Exception):
    """Raised by an ``on_answer`` callback to stop a run; settled answers stay in the cache."""


def run_teacher(items: Sequence[TextItem], teacher: TeacherBackend, *, kinds: Iterable[str] = ("describe", "open_qa", "closed_qa"),
                cache: TeacherCache, seed: int = 0, source: str = "caption", templates: dict[str, Template] | None = None,
                retries: int = 2, concurrency: int = 4, backoff_s: float = 1.0, scrubber: Scrubber | None = None,
                leak_words: int = 12, drop_leaks: bool = True, on_answer: Callable[[int], None] | None = None) -> TeacherResult:
    """Ask ``teacher`` for one instruction per (item, kind); see the module docstring.

    ``retries``: extra attempts per request after a timeout, connection or server error, a malformed, off-schema or
    refusing reply (a deterministic teacher is not re-asked after a bad reply: it would repeat it). ``scrubber``
    cleans each text before it is put in a prompt and each written question/answer. An answer sharing
    ``leak_words`` or more consecutive words with its source is counted as a leak and dropped (``drop_leaks``) or
    kept with ``provenance["leak"] = True``. ``on_answer(n_settled)`` runs after each settled request; raising
    StopRun (or anything) stops the run cleanly: requests in flight finish and are cached."""
    kinds = list(kinds)
    templates = templates or load_templates()
    unknown = [k for k in kinds if k not in templates]
    if unknown:
        raise TeacherInputError(f"unknown task kind {unknown[0]!r}; choose from {sorted(templates)}")
    if retries < 0 or concurrency < 1:
        raise TeacherInputError(f"retries must be >= 0 and concurrency >= 1 (got {retries}, {concurrency})")
    scrubbed: Counter[str] = Counter()
    texts = []
    for item in items:
        text = item.text
        if scrubber is not None:
            text, counts = scrubber.scrub(text)
            scrubbed.update(counts)
        texts.append(text)

    jobs = []  # (index, kind, messages, key)
    empty = 0
    for index, text in enumerate(texts):
        if not text.strip():  # nothing to write about: not worth a request
            empty += len(kinds)
            continue
        for kind in kinds:
            template = templates[kind]
            messages = template.messages(source, text)
            prompt = json.dumps(messages, ensure_ascii=False)
            jobs.append((index, kind, messages, cache_key(teacher.teacher_id, teacher.model, template.id, prompt, seed)))

    def ask(index: int, kind: str, messages: list[dict[str, str]], key: str) -> _Outcome:
        failures: Counter[str] = Counter()
        for attempt in range(retries + 1):
            if attempt and backoff_s:
                time.sleep(backoff_s * attempt)
            try:
                text = teacher.complete(messages, seed=seed + attempt)
            except TeacherRetryable as exc:
                failures[exc.reason] += 1
                continue
            try:
                parse_reply(kind, text)
            except ReplyRejected as exc:
                failures[exc.reason] += 1
                if teacher.deterministic:
                    break
                continue
            outcome = _Outcome(index, kind, key, text, None, attempt + 1, failures)
            cache.put(key, {"reply": text, "reason": None, "attempts": attempt + 1})
            return outcome
        last = list(failures)[-1]
        # A reply that failed every attempt is settled (cached); transport failures are not, so a resumed run asks again
        # once the server is back.
        settled = last not in TRANSPORT_FAILURES
        if settled:
            cache.put(key, {"reply": None, "reason": last, "attempts": sum(failures.values())})
        return _Outcome(index, kind, key, None, last, sum(failures.values()), failures)

    outcomes: list[_Outcome] = []
    pending_jobs = []
    # Reports repeat ("No acute cardiopulmonary process."): a request is sent once per key and its answer shared.
    sharing: dict[str, list[tuple[int, str]]] = {}
    for index, kind, messages, key in jobs:
        hit = cache.get(key)
        if hit is not None:
            outcomes.append(_Outcome(index, kind, key, hit["reply"], hit["reason"], 0, cached=True))
        elif key in sharing:
            sharing[key].append((index, kind))
        else:
            sharing[key] = []
            pending_jobs.append((index, kind, messages, key))

    executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="teacher")
    try:
        # Submit no more than the pool can run, so a stop leaves nothing queued that was never asked.
        queue = iter(pending_jobs)
        running: set[Future[_Outcome]] = set()

        def top_up() -> None:
            while len(running) < concurrency:
                job = next(queue, None)
                if job is None:
                    return
                running.add(executor.submit(ask, *job))

        consecutive = 0
        top_up()
        while running:
            done, running_now = wait(running, return_when=FIRST_COMPLETED)
            running.clear()
            running.update(running_now)
            for future in done:
                outcome = future.result()
                outcomes.append(outcome)
                outcomes.extend(_Outcome(i, k, outcome.key, outcome.reply, outcome.reason, 0, cached=True)
                                for i, k in sharing[outcome.key])
                transport = outcome.reply is None and outcome.reason in TRANSPORT_FAILURES
                consecutive = consecutive + 1 if transport else 0
                if consecutive >= UNREACHABLE_AFTER:
                    raise TeacherUnreachable(f"the teacher ({teacher.teacher_id}, model {teacher.model}) failed {consecutive} requests in a "
                                             f"row ({outcome.reason}); is it running and reachable? Answers so far are cached in "
                                             f"{cache.path}: rerun the same command to continue")
                if on_answer is not None:
                    on_answer(sum(not o.cached for o in outcomes))
            top_up()
    finally:
        executor.shutdown(wait=True, cancel_futures=True)

    return _collect(items, texts, outcomes, teacher, templates, source=source, seed=seed, scrubber=scrubber, scrubbed=scrubbed,
                    leak_words=leak_words, drop_leaks=drop_leaks, retries=retries, empty=empty)


def _collect(items: Sequence[TextItem], texts: list[str], outcomes: list[_Outcome], teacher: TeacherBackend,
             templates: dict[str, Template], *, source: str, seed: int, scrubber: Scrubber | None, scrubbed: Counter[str],
             leak_words: int, drop_leaks: bool, retries: int, empty: int = 0) -> TeacherResult:
    rejects: Counter[str] = Counter({"empty_text": empty} if empty else {})
    failures: Counter[str] = Counter()
    per_kind: Counter[str] = Counter()
    scrubbed_output: Counter[str] = Counter()
    instructions = []
    leaks = 0
    order = {k: i for i, k in enumerate(TASK_KINDS)}
    for outcome in sorted(outcomes, key=lambda o: (o.index, order.get(o.kind, 99))):
        failures.update(outcome.failures)
        if outcome.reply is None:
            rejects[outcome.reason or "unknown"] += 1
            continue
        item, template = items[outcome.index], templates[outcome.kind]
        reply = parse_reply(outcome.kind, outcome.reply)
        if scrubber is not None:
            # The teacher saw only scrubbed text, but may still invent a name or a date; clean what it wrote too.
            data = json.loads(reply.model_dump_json())
            data, counts = _scrub_tree(data, scrubber)
            scrubbed_output.update(counts)
            try:
                reply = type(reply).model_validate(data)
            except ValidationError:  # e.g. two date choices that both became [DATE]: no longer a question
                rejects["scrubbed_invalid"] += 1
                continue
        leak = max(longest_shared_words(a, texts[outcome.index]) for a in _answers(reply)) >= leak_words
        leaks += leak
        if leak and drop_leaks:
            rejects["leak"] += 1
            continue
        provenance = {"source": source, "source_file": item.source_file, "row": item.row, "teacher": teacher.teacher_id,
                      "model": teacher.model, "template": template.id, "seed": seed, "cache_key": outcome.key}
        if leak:
            provenance["leak"] = True
        instructions.append(to_instruction(item, outcome.kind, reply, template, provenance))
        per_kind[outcome.kind] += 1
    asked = [o for o in outcomes if not o.cached]
    report = {
        "teacher": teacher.teacher_id, "model": teacher.model, "source": source, "seed": seed, "items": len(items),
        "requests_settled": len(outcomes), "from_cache": len(outcomes) - len(asked),
        "requests_sent": sum(o.attempts for o in asked), "retries": sum(max(o.attempts - 1, 0) for o in asked),
        "retry_budget": retries, "parsed": len(instructions) + (rejects["leak"]), "accepted": len(instructions),
        "per_kind": dict(per_kind), "attempt_failures": dict(failures), "rejected": dict(rejects),
        "leaks": leaks, "leak_words": leak_words, "leaks_dropped": drop_leaks,
        "templates": {k: t.id for k, t in templates.items()},
    }
    if scrubber is not None:
        report["scrubbed"] = dict(scrubbed)
        report["scrubbed_in_teacher_output"] = dict(scrubbed_output)
        report["scrubbing_note"] = "pattern scrubbing (names, dates, IDs, phones, emails); not full de-identification"
    return TeacherResult(instructions, rejects, report)


def _scrub_tree(value: Any, scrubber: Scrubber) -> tuple[Any, Counter[str]]:
    counts: Counter[str] = Counter()
    if isinstance(value, str):
        text, counts = scrubber.scrub(value)
        return text, counts
    if isinstance(value, list):
        out = []
        for v in value:
            v, c = _scrub_tree(v, scrubber)
            out.append(v)
            counts.update(c)
        return out, counts
    if isinstance(value, dict):
        out_d = {}
        for k, v in value.items():
            out_d[k], c = _scrub_tree(v, scrubber)
            counts.update(c)
        return out_d, counts
    return value, counts
