"""The instruction-set writer of `make-instructions`: hygiene, the split by group, and train/val/heldout JSONL + report.

Every source (labels, captions, reports through a teacher) yields ``Instruction`` objects and hands them to
``write_instruction_set``, which:
- rejects questions or answers that are empty or over ``MAX_QUESTION_CHARS`` / ``MAX_ANSWER_CHARS``, and closed
  questions whose ``choices`` do not hold the answer exactly once (with ``conversations``, the final assistant turn,
  which is the answer make-shards checks against ``choices``);
- drops, per media item, exact duplicate questions and near duplicates (same text once lowercased, punctuation and
  whitespace collapsed), keeping the first;
- splits by ``group`` (patient, scene): groups are shuffled with the seed and dealt to train / val / heldout by
  ``fractions`` of the groups, so one group never lands on two sides;
- writes ``train.jsonl``, ``val.jsonl``, ``heldout.jsonl`` (the make-shards format: ``media``, ``question``,
  ``answer``, ``choices``, ``answer_type`` or ``conversations``; plus ``id``, unique per file and safe as a sample key,
  ``kind``, ``group`` and ``provenance``, which make-shards ignores) and ``report.json``, each to a temporary file,
  fsynced and renamed.
"""
from __future__ import annotations

import json
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, Iterable, Literal, Mapping

from .errors import MmdomainError

SPLITS = ("train", "val", "heldout")
REPORT = "report.json"
MAX_QUESTION_CHARS = 1000
MAX_ANSWER_CHARS = 4000


class InstructionSetError(MmdomainError, ValueError):
    """Bad input for writing an instruction set; the message names the output folder, the field or the item, and the fix."""


@dataclass
class Instruction:
    """One question about one or more media items. ``group`` (patient, scene) decides the split; it defaults to the
    first media path. ``conversations`` (``[{"role": "user"|"assistant", "content": ...}, ...]``) makes it multi-turn;
    ``question`` / ``answer`` are then its first pair, used for de-duplication and the report."""

    media: list[str]
    question: str
    answer: str
    choices: list[str] | None = None
    answer_type: Literal["closed", "open"] = "open"
    conversations: list[dict] | None = None
    group: str = ""
    provenance: dict = field(default_factory=dict)
    kind: str = "open_qa"

    def __post_init__(self) -> None:
        self.media = [self.media] if isinstance(self.media, str) else list(self.media)
        if not self.media:
            raise InstructionSetError(f"instruction {self.question!r} has no media; give at least one media path")
        if self.answer_type not in ("closed", "open"):
            raise InstructionSetError(f"instruction {self.question!r}: answer_type must be 'closed' or 'open', got {self.answer_type!r}")
        if not self.group:
            self.group = self.media[0]

    def final_answer(self) -> str:
        """The answer make-shards checks against ``choices``: the last assistant turn, or ``answer``."""
        if self.conversations:
            answers = [t.get("content", t.get("value")) for t in self.conversations if t.get("role", t.get("from")) in ("assistant", "gpt")]
            if answers:
                return str(answers[-1])
        return self.answer

    def record(self, key: str) -> dict[str, Any]:
        """The JSONL line make-shards reads."""
        out: dict[str, Any] = {"id": key, "media": self.media}
        if self.conversations:
            out["conversations"] = self.conversations
        else:
            out.update(question=self.question, answer=self.answer)
        if self.choices is not None:
            out["choices"] = self.choices
        out.update(answer_type=self.answer_type, kind=self.kind, group=self.group, provenance=self.provenance)
        return out


def normalise_text(text: str) -> str:
    """The near-duplicate key: lowercase, punctuation dropped, whitespace collapsed."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _problem(item: Instruction) -> str | None:
    """Why ``item`` is rejected (a report reason), or None."""
    if not item.question.strip():
        return "empty_question"
    if not item.answer.strip():
        return "empty_answer"
    # A user turn is a question and an assistant turn an answer: each is held to its own limit.
    turns = [(t.get("role", t.get("from")), str(t.get("content", t.get("value", "")))) for t in item.conversations or []]
    if len(item.question) > MAX_QUESTION_CHARS or any(role in ("user", "human") and len(t) > MAX_QUESTION_CHARS for role, t in turns):
        return "question_too_long"
    if len(item.answer) > MAX_ANSWER_CHARS or any(role not in ("user", "human") and len(t) > MAX_ANSWER_CHARS for role, t in turns):
        return "answer_too_long"
    if item.choices is not None:
        hits = [str(c) for c in item.choices].count(item.final_answer())
        if hits == 0:
            return "answer_not_in_choices"
        if hits > 1:
            return "answer_repeated_in_choices"
    return None


def clean(instructions: Iterable[Instruction], rejects: Counter) -> list[Instruction]:
    """The instructions that pass the checks and are not (near) duplicates of an earlier one on the same media;
    ``rejects`` counts the rest by reason."""
    kept, exact, near = [], set(), set()
    for item in instructions:
        reason = _problem(item)
        media = tuple(item.media)
        if reason is None and (media, item.question) in exact:
            reason = "duplicate_question"
        elif reason is None and (media, normalise_text(item.question)) in near:
            reason = "near_duplicate_question"
        if reason is not None:
            rejects[reason] += 1
            continue
        exact.add((media, item.question))
        near.add((media, normalise_text(item.question)))
        kept.append(item)
    return kept


def parse_split(text: str) -> tuple[float, float, float]:
    """``--split 0.8,0.1,0.1`` as three fractions (checked further when the set is written)."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise InstructionSetError(f"--split {text!r} must be three fractions train,val,heldout, e.g. 0.8,0.1,0.1")
    return values  # type: ignore[return-value]


def _check_fractions(fractions: Iterable[float]) -> tuple[float, float, float]:
    values = tuple(float(f) for f in fractions)
    if len(values) != 3 or any(f < 0 for f in values) or abs(sum(values) - 1) > 1e-6:
        raise InstructionSetError(f"split fractions {values} must be three non-negative numbers (train, val, heldout) that sum to 1, "
                                  "e.g. 0.8,0.1,0.1")
    return values  # type: ignore[return-value]


def split_groups(groups: Iterable[str], fractions: tuple[float, float, float], seed: int) -> dict[str, str]:
    """``{group: split}``: the sorted groups shuffled with ``seed`` and dealt by fraction of groups (largest remainder);
    every split with a non-zero fraction gets a group when there are enough groups."""
    ordered = sorted(set(groups))
    random.Random(seed).shuffle(ordered)
    n = len(ordered)
    exact = [f * n for f in fractions]
    sizes = [int(x) for x in exact]
    for i in sorted(range(3), key=lambda i: exact[i] - sizes[i], reverse=True)[: n - sum(sizes)]:
        sizes[i] += 1
    # A tiny table would otherwise leave val or heldout empty: lend them a group from the largest side.
    for i in range(3):
        if fractions[i] > 0 and sizes[i] == 0 and max(sizes) > 1:
            sizes[sizes.index(max(sizes))] -= 1
            sizes[i] = 1
    out, start = {}, 0
    for name, size in zip(SPLITS, sizes):
        out.update({g: name for g in ordered[start:start + size]})
        start += size
    return out


def answer_balance(items: Iterable[Instruction]) -> dict[str, dict[str, dict[str, int]]]:
    """Per kind of closed question: how often each choice position holds the answer (``"2/4"``: second of four), and
    each answer's frequency."""
    balance: dict[str, dict[str, Counter]] = {}
    for item in items:
        if item.answer_type != "closed" or not item.choices:
            continue
        entry = balance.setdefault(item.kind, {"positions": Counter(), "answers": Counter()})
        answer = item.final_answer()
        # "2/4": the answer is the second of four choices (items with three and four choices are counted apart).
        entry["positions"][f"{[str(c) for c in item.choices].index(answer) + 1}/{len(item.choices)}"] += 1
        entry["answers"][answer] += 1
    return {kind: {k: dict(sorted(v.items())) for k, v in entry.items()} for kind, entry in sorted(balance.items())}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an ``--out`` that is a file, or a folder with files in it (unless ``overwrite``); run before any work
    that costs (a teacher's requests), not only when writing."""
    if out.exists() and not out.is_dir():
        raise InstructionSetError(f"--out {out} is a file; give a folder for train.jsonl, val.jsonl, heldout.jsonl and report.json")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InstructionSetError(f"{out} is not empty; choose another --out, or pass --overwrite to replace its instruction files")


def check_media_paths(raw: Any, where: str) -> list[str]:
    """A row's media as make-shards will read them: one path, a list, or ``a.png;b.png``; each relative to make-shards'
    --media folder without '..' (make-shards refuses the others, after the work of making the instructions)."""
    if isinstance(raw, str):
        raw = [m.strip() for m in raw.split(";")]
    if not isinstance(raw, list) or not all(isinstance(m, str) for m in raw):
        raise InstructionSetError(f"{where}: media must be a path, 'a.png;b.png' or a list of paths; got {raw!r}")
    media = [m for m in raw if m]
    if not media:
        raise InstructionSetError(f"{where}: no media; write the media path relative to make-shards' --media folder")
    for rel in media:
        if PurePath(rel).is_absolute() or ".." in PurePath(rel).parts:
            raise InstructionSetError(f"{where}: media path {rel!r} must be relative to make-shards' --media folder, without '..'")
    return media


def write_instruction_set(instructions: Iterable[Instruction], out: Path, *, seed: int, fractions=(0.8, 0.1, 0.1),
                          rejects: Mapping[str, int] | None = None, extra_report: dict | None = None,
                          overwrite: bool = False) -> dict:
    """Check, de-duplicate and split ``instructions`` by group; write ``out/{train,val,heldout}.jsonl`` and
    ``out/report.json``; return the report. ``rejects`` (reason -> count, e.g. a teacher's failures) joins the report's
    own; ``extra_report`` adds keys to it (the source table, the teacher, the templates)."""
    out = Path(out)
    fractions = _check_fractions(fractions)
    check_out(out, overwrite)
    counted: Counter = Counter({k: int(v) for k, v in (rejects or {}).items()})
    items = list(instructions)
    kept = clean(items, counted)
    if not kept:
        raise InstructionSetError(f"no instruction is left to write to {out} ({len(items)} made, rejected: {dict(counted) or 'none'}); "
                                  "check the input table and templates")
    side = split_groups((i.group for i in kept), fractions, seed)
    by_split: dict[str, list[Instruction]] = {name: [] for name in SPLITS}
    for item in kept:
        by_split[side[item.group]].append(item)

    out.mkdir(parents=True, exist_ok=True)
    for name, members in by_split.items():
        lines = [json.dumps(item.record(f"{name}-{i:07d}")) + "\n" for i, item in enumerate(members)]
        _write_atomic(out / f"{name}.jsonl", "".join(lines))
    kinds = sorted({i.kind for i in kept})
    report = {
        "seed": seed,
        "fractions": dict(zip(SPLITS, fractions)),
        "made": len(items),
        "written": len(kept),
        "samples": {name: len(members) for name, members in by_split.items()},
        "groups": {name: len({i.group for i in members}) for name, members in by_split.items()},
        "kinds": {kind: {name: sum(i.kind == kind for i in members) for name, members in by_split.items()} for kind in kinds},
        "rejects": dict(sorted(counted.items())),
        "answer_balance": answer_balance(kept),
        "limits": {"question_chars": MAX_QUESTION_CHARS, "answer_chars": MAX_ANSWER_CHARS},
        **(extra_report or {}),
    }
    _write_atomic(out / REPORT, json.dumps(report, indent=2) + "\n")
    try:  # the renames are durable only once the folder itself is synced
        fd = os.open(out, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the files themselves are synced
    return report


def summary_lines(report: dict, out: Path) -> list[str]:
    """A few lines for the terminal: what was written where, and what was dropped."""
    s, g = report["samples"], report["groups"]
    lines = [f"wrote {report['written']} of {report['made']} instructions to {out}: " +
             ", ".join(f"{name} {s[name]} ({g[name]} groups)" for name in SPLITS)]
    lines += [f"  {kind}: " + ", ".join(f"{name} {n}" for name, n in per.items()) for kind, per in report["kinds"].items()]
    if report["rejects"]:
        lines.append("rejected: " + ", ".join(f"{reason} {n}" for reason, n in report["rejects"].items()))
    lines.append(f"report: {out / REPORT}")
    return lines
