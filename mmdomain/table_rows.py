"""Rows of a CSV or JSONL table, each with the line it came from: the one reader of the tables users bring
(label tables, caption and report tables, samples for `tiny-llm`), so each gets the same checks and messages."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any


def read_table_rows(path: Path, error: type[Exception], *, jsonl: bool | None = None) -> list[tuple[int, dict[str, Any]]]:
    """``[(line number, row)]`` of ``path``; a JSONL file (``.jsonl``/``.json``, or ``jsonl=True``) holds one object per
    line, a CSV names its columns on line 1. Both may start with a byte-order mark (Excel's "CSV UTF-8" writes one,
    which would otherwise glue onto the first column's name). A CSV row's number is the line it ends on (a quoted
    cell may span lines). Every problem raises ``error`` naming ``path:line`` and the fix."""
    path = Path(path)
    if jsonl is None:
        jsonl = path.suffix.lower() in (".jsonl", ".json")
    rows: list[tuple[int, dict[str, Any]]] = []
    if jsonl:
        with path.open(encoding="utf-8-sig") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise error(f"{path}:{line_no}: not valid JSON ({exc.msg}); each line must be one JSON object") from None
                if not isinstance(row, dict):
                    raise error(f"{path}:{line_no}: a line must be a JSON object, got {type(row).__name__}")
                rows.append((line_no, row))
        return rows
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise error(f"{path}: no header line; the first line names the columns, e.g. media,label,patient")
        for row in reader:
            if None in row:
                raise error(f"{path}:{reader.line_num}: more fields than the header's {len(reader.fieldnames)}; quote values "
                            "that hold commas (boxes: \"0.1,0.2,0.5,0.6\")")
            rows.append((reader.line_num, row))
    return rows
