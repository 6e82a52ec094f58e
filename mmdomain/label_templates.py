"""Labels -> closed questions: a table of media and labels turned into Instructions by YAML templates.

The table is a CSV (header row) or a JSONL (one object per line); the media are never opened. Columns:
- ``media``: the media path(s), relative to the folder make-shards gets as ``--media``; several separated by ``;``
  in a CSV, or a list in a JSONL.
- ``label``: the image's label(s), several separated by ``;`` (a list in a JSONL). With exactly one label a row gets
  a classification question (choices: the labels of the whole column); every row gets presence questions ("Is there
  any {label}?", yes/no) for its labels and as many absent ones (one when it has none), never "no" for an object the
  row's ``count_``/``location_``/``box_`` columns show; ``none``, ``normal``, ``no finding`` and empty mean no finding.
  Labels that differ only in case or spacing are one class, shown in their most frequent spelling (the report's
  ``labels.merged_labels`` lists the merges).
- ``label_<attribute>``: another classification, e.g. ``label_view`` -> "What is the view of this image?".
- ``count_<object>``: a whole number -> "How many instances of <object> are there?" with numeric choices around it.
- ``location`` / ``location_<object>``: a place in words ("upper left"), or a box ``x0,y0,x1,y1`` relative to the
  image size (0..1), turned into words ("upper left", "center", "lower right", ...); ``box`` / ``box_<object>``
  likewise. Choices: the places seen in that column.
- the ``--group-key`` column (patient, scene): the split keeps each group on one side.
Column names (and ``--group-key``) match case- and whitespace-insensitively; a UTF-8 byte-order mark (Excel's
"CSV UTF-8") is fine. Underscores in a column's suffix read as spaces (``count_lymph_node`` -> "lymph node"). Which columns feed which
task is the templates' ``columns`` (``mmdomain/templates/labels.yaml``); ``--templates my.yaml`` adds or replaces
tasks. A bad row is an error naming ``file:line`` and the problem.
"""
from __future__ import annotations

import random
import string
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import MmdomainError
from .instruction_set import Instruction, InstructionSetError, check_media_paths
from .table_rows import read_table_rows

DEFAULT_TEMPLATES = Path(__file__).resolve().parent / "templates" / "labels.yaml"
PLACEHOLDERS = {"label"}
KIND_DEFAULT_CHOICES = {"classification": 6, "location": 9, "count": 4, "presence": 2}


class LabelTableError(MmdomainError, ValueError):
    """A label table or templates file that cannot be used; the message names the file (line, task, field) and the fix."""


class Task(BaseModel):
    """One kind of question and the columns it reads."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["classification", "presence", "count", "location"]
    columns: list[str] = Field(min_length=1)
    questions: list[str] = Field(min_length=1)
    label: str = "finding"
    max_choices: int | None = Field(None, ge=2)
    none_values: list[str] = ["", "none", "normal", "no finding"]

    @field_validator("questions")
    @classmethod
    def _placeholders(cls, questions: list[str]) -> list[str]:
        for i, question in enumerate(questions):
            try:
                names = {name for _, name, _, _ in string.Formatter().parse(question) if name is not None}
            except ValueError as exc:
                raise ValueError(f"question {i} {question!r}: {exc} (write a literal brace as {{{{ or }}}})") from None
            unknown = names - PLACEHOLDERS
            if unknown:
                raise ValueError(f"question {i} {question!r} has placeholder(s) {sorted(unknown)}; the only one is {{label}}")
        return questions

    def choices_limit(self) -> int:
        return self.max_choices or KIND_DEFAULT_CHOICES[self.kind]


class TemplateFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tasks: dict[str, Task | None]


def _read_template_file(path: Path) -> dict[str, Task | None]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise LabelTableError(f"templates {path}: not valid YAML{at}: {getattr(exc, 'problem', None) or exc}") from None
    try:
        return TemplateFile.model_validate(data).tasks
    except ValidationError as exc:
        problems = "; ".join(f"{_where(list(e['loc']))}: {e['msg']}" for e in exc.errors())
        raise LabelTableError(f"templates {path}: {problems} (a file holds `tasks: {{name: {{kind, columns, questions}}}}`; "
                              f"see {DEFAULT_TEMPLATES})") from None


def _where(loc: list) -> str:
    if len(loc) >= 2 and loc[0] == "tasks":
        # pydantic puts the union branch ("Task") in the path; the reader wants the task and the field.
        field = ".".join(str(p) for p in loc[2:] if p != "Task") or "(task)"
        return f"task {loc[1]!r}, field {field}"
    return f"field {'.'.join(map(str, loc)) or '(top level)'}"


def load_templates(path: str | Path | None = None) -> dict[str, Task]:
    """The shipped tasks, with those of ``path`` added or replacing them by name (``name: null`` removes one)."""
    tasks = {k: v for k, v in _read_template_file(DEFAULT_TEMPLATES).items() if v is not None}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise LabelTableError(f"templates file {str(path)!r} does not exist")
        for name, task in _read_template_file(path).items():
            if task is None:
                tasks.pop(name, None)
            else:
                tasks[name] = task
    return tasks


# -- reading the table ------------------------------------------------------------------------------------------------


def read_label_table(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """``[(line number, row)]`` of a CSV (header on line 1) or a JSONL table."""
    path = Path(path)
    if not path.is_file():
        raise LabelTableError(f"label table {str(path)!r} does not exist")
    rows = [(line_no, _normalise_keys(row, f"{path}:{line_no}")) for line_no, row in read_table_rows(path, LabelTableError)]
    if rows and path.suffix.lower() not in (".jsonl", ".json") and "media" not in rows[0][1]:
        raise LabelTableError(f"{path}: no 'media' column (columns: {', '.join(map(repr, rows[0][1]))}); the first line "
                              "names the columns, e.g. media,label,patient")
    if not rows:
        raise LabelTableError(f"label table {path} has no rows")
    return rows


def column_key(name: Any) -> str:
    """How a column name is matched: case-insensitive, surrounding whitespace dropped, inner whitespace collapsed
    (`` Label `` and ``label`` are one column)."""
    return " ".join(str(name).split()).lower()


def _normalise_keys(row: dict[str, Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in row.items():
        key = column_key(name)
        if key in out:
            raise LabelTableError(f"{where}: two columns read as {key!r} (names match case- and whitespace-insensitively); "
                                  "rename or drop one")
        out[key] = value
    return out


def label_key(value: str) -> str:
    """One class per label whatever its case or spacing (``Effusion``, ``effusion``, ``pleural  effusion``)."""
    return " ".join(value.split()).lower()


def in_sentence(label: str) -> str:
    """``label`` as it reads inside a question: lowercased word by word, except words that look like acronyms or
    names with inner capitals (``COPD``, ``pH``, ``T2``)."""
    return " ".join(w if any(c.isupper() for c in w[1:]) or (len(w) > 1 and w.isupper()) else w.lower() for w in label.split())


def _values(raw: Any) -> list[str]:
    if raw is None:
        return []
    items = raw if isinstance(raw, list) else str(raw).split(";")
    return [str(v).strip() for v in items if str(v).strip()]


def _media(raw: Any, where: str) -> list[str]:
    try:
        return check_media_paths(_values(raw), where)
    except InstructionSetError as exc:
        raise LabelTableError(str(exc)) from None


_ROWS, _COLS = ("upper", "", "lower"), ("left", "", "right")


def box_to_words(box: str, where: str) -> str:
    """``x0,y0,x1,y1`` relative to the image size -> the third of the image (rows and columns) its center falls in."""
    try:
        x0, y0, x1, y1 = (float(v) for v in box.split(","))
    except ValueError:
        raise LabelTableError(f"{where}: box {box!r} is not four numbers x0,y0,x1,y1") from None
    if not all(0 <= v <= 1 for v in (x0, y0, x1, y1)) or x1 < x0 or y1 < y0:
        raise LabelTableError(f"{where}: box {box!r} must be x0,y0,x1,y1 relative to the image size (0..1, x0 <= x1, y0 <= y1); "
                              "divide pixel coordinates by the width and height")
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    words = f"{_ROWS[min(int(cy * 3), 2)]} {_COLS[min(int(cx * 3), 2)]}".strip()
    return words or "center"


def _place(raw: Any, where: str) -> str | None:
    text = str(raw).strip() if raw is not None else ""
    if not text:
        return None
    if text.count(",") == 3:
        return box_to_words(text, where)
    return text


def _matching(task: Task, columns: list[str]) -> list[tuple[str, str]]:
    """``[(column, its {label})]`` of the table's (normalised) columns this task reads."""
    found = []
    for pattern in map(column_key, task.columns):
        if pattern.endswith("_*"):
            prefix = pattern[:-1]
            found += [(c, c[len(prefix):].replace("_", " ")) for c in columns if c.startswith(prefix) and len(c) > len(prefix)]
        elif pattern in columns:
            found.append((pattern, task.label))
    return found


# -- making questions -------------------------------------------------------------------------------------------------


def _pick_choices(answer: str, pool: list[str], limit: int, rng: random.Random) -> list[str]:
    others = [c for c in pool if c != answer]
    choices = [answer, *rng.sample(others, min(limit - 1, len(others)))]
    rng.shuffle(choices)
    return choices


def instructions_from_labels(table: str | Path, *, templates: str | Path | None = None, group_key: str | None = None,
                             seed: int = 0) -> tuple[list[Instruction], Counter, dict[str, Any]]:
    """Closed questions for every row of ``table``: (instructions, skipped by reason, facts for the report)."""
    table = Path(table)
    tasks = load_templates(templates)
    rows = read_label_table(table)
    columns = list(dict.fromkeys(c for _, row in rows for c in row))
    if group_key is not None:
        group_key = column_key(group_key)
    if group_key is not None and group_key not in columns:
        raise LabelTableError(f"{table}: --group-key {group_key!r} is not a column (columns: {', '.join(columns)})")
    plan = {name: _matching(task, columns) for name, task in tasks.items()}
    if not any(plan.values()):
        wanted = sorted({c for t in tasks.values() for c in t.columns})
        raise LabelTableError(f"{table}: no column feeds a question (columns: {', '.join(columns)}); the tasks read {', '.join(wanted)} "
                              "(see `mmdomain make-instructions labels --help`)")
    used = {"media", group_key, *(c for found in plan.values() for c, _ in found)}

    # Choice sets come from the whole column, so every row's question offers the same places or classes.
    parsed: list[tuple[int, str, dict[str, Any]]] = []
    for line, row in rows:
        where = f"{table}:{line}"
        entry: dict[str, Any] = {"media": _media(row.get("media"), where)}
        if group_key is not None:
            group = str(row.get(group_key) or "").strip()
            if not group:
                raise LabelTableError(f"{where}: empty {group_key!r}; every row needs its group (patient, scene) for the split")
            entry["group"] = group
        for name, task in tasks.items():
            for column, _ in plan[name]:
                raw = row.get(column)
                if task.kind == "location":
                    entry[column] = _place(raw, where)
                elif task.kind == "count":
                    text = str(raw).strip() if raw is not None else ""
                    if text and (not text.isdigit()):
                        raise LabelTableError(f"{where}: {column} is {text!r}; write a whole number >= 0 (or leave it empty)")
                    entry[column] = int(text) if text else None
                else:
                    entry[column] = _values(raw)
        parsed.append((line, where, entry))
    merged = _merge_spellings(tasks, plan, parsed)
    vocab: dict[tuple[str, str], list[str]] = {}
    for name, task in tasks.items():
        for column, _ in plan[name]:
            if task.kind in ("classification", "location"):
                values = {e[column] if task.kind == "location" else e[column][0] for _, _, e in parsed
                          if e[column] and (task.kind == "location" or len(e[column]) == 1)}
            elif task.kind == "presence":
                none = {label_key(v) for v in task.none_values}
                values = {v for _, _, e in parsed for v in e[column] if label_key(v) not in none}
            else:
                continue
            vocab[(name, column)] = sorted(values)

    made: list[Instruction] = []
    skipped: Counter = Counter()
    for line, where, entry in parsed:
        for name, task in tasks.items():
            for column, label in plan[name]:
                rng = random.Random(f"{seed}:{line}:{name}:{column}")
                value = entry[column]

                def ask(question_label: str, answer: str, choices: list[str]) -> None:
                    index = rng.randrange(len(task.questions))
                    question = task.questions[index].format(label=in_sentence(question_label))
                    made.append(Instruction(media=entry["media"], question=question, answer=answer, choices=choices, answer_type="closed",
                                            group=entry.get("group", ""), kind=task.kind,
                                            provenance={"source": str(table), "row": line, "column": column,
                                                        "template": f"{name}:{index}", "seed": seed}))

                if task.kind == "classification":
                    pool = vocab[(name, column)]
                    if len(pool) < 2:
                        skipped[f"{name}_fewer_than_two_classes"] += 1
                    elif len(value) != 1:
                        skipped[f"{name}_needs_one_label"] += 1
                    else:
                        ask(label, value[0], _pick_choices(value[0], pool, task.choices_limit(), rng))
                elif task.kind == "presence":
                    pool = vocab[(name, column)]
                    none = {label_key(v) for v in task.none_values}
                    present = sorted({v for v in value if label_key(v) not in none})
                    # A "no" must not contradict the row's other columns: count_nodule > 0, box_nodule or location_nodule
                    # say the nodule is there whatever the label column says (count 0 leaves "no" right).
                    shown = {*map(label_key, present), *objects_shown(entry, plan, tasks)}
                    absent = [v for v in pool if not _same_object(label_key(v), shown)]
                    # As many negatives as positives (one for a row without findings): the yes/no answers stay balanced.
                    negatives = rng.sample(absent, min(len(absent), max(len(present), 1)))
                    for item, answer in [*((p, "yes") for p in present), *((n, "no") for n in negatives)]:
                        ask(item, answer, _pick_choices(answer, ["yes", "no"], 2, rng))
                elif task.kind == "count":
                    if value is None:
                        continue
                    n = task.choices_limit()
                    start = max(0, value - rng.randrange(n))
                    choices = [str(v) for v in range(start, start + n)]
                    rng.shuffle(choices)
                    ask(label, str(value), choices)
                elif value is not None:  # location
                    pool = vocab[(name, column)]
                    if len(pool) < 2:
                        skipped[f"{name}_fewer_than_two_places"] += 1
                    else:
                        ask(label, value, _pick_choices(value, pool, task.choices_limit(), rng))
    facts = {"source": str(table), "rows": len(rows), "group_key": group_key, "templates": str(templates or DEFAULT_TEMPLATES),
             "tasks": {name: [c for c, _ in found] for name, found in plan.items() if found},
             "ignored_columns": [c for c in columns if c not in used], "merged_labels": merged}
    return made, skipped, facts


def _merge_spellings(tasks: dict[str, Task], plan: dict[str, list[tuple[str, str]]],
                     parsed: list[tuple[int, str, dict[str, Any]]]) -> dict[str, dict[str, list[str]]]:
    """Rewrite every label of the classification and presence columns to one spelling per class (the most frequent,
    first seen on a tie), so ``Effusion`` and ``effusion`` are not two classes that contradict each other.
    Returns ``{column: {kept spelling: [every spelling seen]}}`` for the classes that had more than one."""
    columns = {c for name, task in tasks.items() if task.kind in ("classification", "presence") for c, _ in plan[name]}
    merged: dict[str, dict[str, list[str]]] = {}
    for column in sorted(columns):
        spellings: dict[str, Counter] = {}
        for _, _, entry in parsed:
            for value in entry[column]:
                spellings.setdefault(label_key(value), Counter())[value] += 1
        display = {key: " ".join(seen.most_common(1)[0][0].split()) for key, seen in spellings.items()}
        for _, _, entry in parsed:
            entry[column] = list(dict.fromkeys(display[label_key(v)] for v in entry[column]))
        many = {display[key]: sorted(seen) for key, seen in spellings.items() if len(seen) > 1}
        if many:
            merged[column] = many
    return merged


def objects_shown(entry: dict[str, Any], plan: dict[str, list[tuple[str, str]]], tasks: dict[str, Task]) -> set[str]:
    """The objects a row says are there through a suffixed count (> 0), location or box column (``count_nodule``,
    ``box_nodule`` -> ``nodule``), as label keys."""
    shown = set()
    for name, task in tasks.items():
        for column, label in plan[name]:
            if column == label or not column.endswith("_" + label.replace(" ", "_")):
                continue  # not a suffixed column (``location`` -> "finding")
            value = entry[column]
            if (task.kind == "count" and value) or (task.kind == "location" and value is not None):
                shown.add(label_key(label))
    return shown


def _same_object(key: str, shown: set[str]) -> bool:
    """``key`` names an object of ``shown``, allowing a plural s either side (``count_nodules`` vs ``nodule``)."""
    return key in shown or f"{key}s" in shown or (key.endswith("s") and key[:-1] in shown)
