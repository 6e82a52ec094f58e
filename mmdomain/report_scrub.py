"""Pattern scrubbing of patient-identifying strings (names, dates, IDs, phones, emails) from report text, before
the text reaches a teacher LLM or any file.

This is NOT de-identification: patterns catch the common shapes ("Patient: Doe, Jane", "Dr. Smith", "MRN 12345678",
"12 March 2024", 555-123-4567, UUIDs) and miss names written free-form in prose, rare date and ID formats, and
identifying facts that are not strings (a rare condition plus an age and a town). Use it as a last guard on text
that has already been through your institution's de-identification, never instead of it.

    scrubber = Scrubber(allow=load_allow_list(["Parkinson"], files=["medical_terms.txt"]))
    clean, counts = scrubber.scrub("Patient: Doe, Jane. MRN 12345678. Seen 2024-03-12 for Parkinson disease.")
    # clean == "Patient: [NAME]. MRN [ID]. Seen [DATE] for Parkinson disease."; counts == {"name": 1, "id": 1, "date": 1}
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MmdomainError

PLACEHOLDERS = {"name": "[NAME]", "date": "[DATE]", "id": "[ID]", "phone": "[PHONE]", "email": "[EMAIL]"}

# Eponyms that the name patterns could take for a person ("Patient Hodgkin lymphoma follow-up"). Only names that are
# rarely surnames in practice are here: "Smith" or "Wilson" would let "Dr. Smith" through; add those yourself
# (--phi-allow) if your reports need them.
DEFAULT_ALLOW = frozenset({
    "parkinson", "parkinsons", "hodgkin", "hodgkins", "non-hodgkin", "alzheimer", "alzheimers", "crohn", "crohns",
    "cushing", "addison", "huntington", "kaposi", "ewing", "wilms", "bankart", "colles", "schatzki", "kerley",
    "virchow", "babinski", "glasgow", "doppler", "hounsfield", "fleischner", "bosniak", "tirads", "birads", "lirads",
})

_MONTH = (r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|Jun(?:e)?|Jul(?:y)?|Aug(?:ust)?|"
          r"Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)\.?")
# A capitalised word as names are written: O'Neil, Smith-Jones, McDonald.
_NAME_WORD = r"(?:[A-Z]\.|[A-Z][a-zA-Z'\-]+)"  # an initial ("A.") or a capitalised word
# A name stops at a sentence end, so "Doe, Jane. MRN 123" keeps "MRN".
_NAME = rf"{_NAME_WORD}(?:,?[ \t]+{_NAME_WORD}){{0,3}}"

# Order matters: contact details and IDs first, so their digits are not read as dates; dates before bare digit
# runs, so "20240312" inside an ISO timestamp is one date, not a date and an ID.
_PATTERNS: list[tuple[str, re.Pattern[str], int]] = [
    # (kind, pattern, group to replace: 0 = the whole match, 1 = the value after a kept label)
    ("email", re.compile(r"[\w.+\-]+@[\w\-]+(?:\.[\w\-]+)+"), 0),
    ("id", re.compile(r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b"), 0),
    ("id", re.compile(r"(?i:\b(?:MRN|medical record(?: number)?|accession(?: number| no\.?)?|acc(?:ession)?\s*#|"
                      r"patient[ \t]+id|pt[ \t]+id|study[ \t]+id|ID)\b[ \t]*(?:no\.?|number|#)?[ \t]*[:#]?[ \t]*)"
                      r"([A-Za-z]*\d[\w\-/]*)"), 1),
    ("phone", re.compile(r"(?<![\w\-])(?:\+\d{1,3}[ .\-]?)?(?:\(\d{2,4}\)[ .\-]?|\d{3}[ .\-])\d{3}[ .\-]\d{4}(?![\w\-])"), 0),
    ("date", re.compile(r"\b\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+\-]\d{2}:?\d{2})?)?\b"), 0),
    ("date", re.compile(r"\b\d{1,2}[/.\-]\d{1,2}[/.\-](?:\d{4}|\d{2})\b"), 0),
    ("date", re.compile(rf"(?i:\b\d{{1,2}}(?:st|nd|rd|th)?[ \t]+(?:of[ \t]+)?{_MONTH},?[ \t]+\d{{4}}\b)"), 0),
    ("date", re.compile(rf"(?i:\b{_MONTH}[ \t]+\d{{1,2}}(?:st|nd|rd|th)?,?[ \t]+\d{{4}}\b)"), 0),
    ("date", re.compile(rf"(?i:\b{_MONTH}[ \t]+\d{{4}}\b)"), 0),
    ("date", re.compile(r"\b(?:19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\b"), 0),
    ("id", re.compile(r"\b\d{6,}\b"), 0),
    # Names after a label that introduces a person ("Patient: Doe, Jane", "Referring physician: Dr. A. Lee").
    ("name", re.compile(r"(?i:\b(?:patient(?:[ \t]+name)?|name|pt|referring(?:[ \t]+physician)?|physician|radiologist|"
                        r"attending|signed(?:[ \t]+by)?|dictated(?:[ \t]+by)?|reported(?:[ \t]+by)?|read[ \t]+by|"
                        r"technologist|cc)[ \t]*:[ \t]*)(?:(?:Mr|Mrs|Ms|Miss|Dr|Prof)\.?[ \t]+)?" rf"({_NAME})"), 1),
    # Names after a title ("Dr. Smith", "Mrs Jane Doe").
    ("name", re.compile(rf"\b(?:Mr|Mrs|Ms|Miss|Dr|Prof)\.?[ \t]+({_NAME_WORD}(?:[ \t]+{_NAME_WORD}){{0,2}})"), 1),
    # Names after "patient" in prose ("Patient Jane Doe presents with ...").
    ("name", re.compile(rf"(?i:\b(?:patient|pt\.?)[ \t]+)({_NAME_WORD}(?:[ \t]+{_NAME_WORD}){{0,2}})"), 1),
]


class ScrubError(MmdomainError, ValueError):
    """An allow-list file that cannot be read; the message names it."""


def load_allow_list(words: Iterable[str] = (), files: Iterable[str | Path] = (), *, defaults: bool = True) -> frozenset[str]:
    """Lower-cased words never scrubbed as names: ``words`` (--phi-allow), one word per line of each file (``#``
    starts a comment), and DEFAULT_ALLOW unless ``defaults`` is False."""
    allowed = set(DEFAULT_ALLOW) if defaults else set()
    allowed.update(w.strip().lower() for w in words if w.strip())
    for path in files:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ScrubError(f"allow-list file {str(path)!r} cannot be read ({exc.strerror}); give a text file with one word per line") from exc
        allowed.update(line.split("#", 1)[0].strip().lower() for line in lines if line.split("#", 1)[0].strip())
    return frozenset(allowed)


@dataclass(frozen=True)
class Scrubber:
    """Replaces identifying strings by placeholders (PLACEHOLDERS); ``allow`` holds lower-cased words that look like
    names but are medical terms. A name match is kept only when every word in it is allowed."""

    allow: frozenset[str] = field(default_factory=lambda: frozenset(DEFAULT_ALLOW))

    def scrub(self, text: str) -> tuple[str, Counter[str]]:
        """``text`` with identifying strings replaced, and how many of each kind were replaced."""
        counts: Counter[str] = Counter()
        for kind, pattern, group in _PATTERNS:
            text = pattern.sub(self._replacer(kind, group, counts), text)
        return text, counts

    def _replacer(self, kind: str, group: int, counts: Counter[str]) -> Callable[[re.Match[str]], str]:
        def replace(match: re.Match[str]) -> str:
            value = match.group(group)
            if kind == "name" and self._allowed(value):
                return match.group(0)
            counts[kind] += 1
            start, end = match.start(group) - match.start(0), match.end(group) - match.start(0)
            whole = match.group(0)
            return whole[:start] + PLACEHOLDERS[kind] + whole[end:]
        return replace

    def _allowed(self, name: str) -> bool:
        words = [w.lower().rstrip(".,'") for w in re.split(r"[ \t,]+", name) if w]
        words = [w.removesuffix("'s") for w in words]
        return bool(words) and all(w in self.allow for w in words)
