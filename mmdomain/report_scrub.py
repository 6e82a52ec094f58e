"""Pattern scrubbing of patient-identifying strings (names, dates, IDs, phones, emails) from report text, before
the text reaches a teacher LLM or any file.

This is NOT de-identification: patterns catch the common shapes ("Patient: Doe, Jane", "Dr. Smith", "seen by SMITH,
John", DOE^JANE, "MRN 12345678", "Patient ID: AB-12345", "Acc# 99881", "12 March 2024", 12-Mar-2024, 555-123-4567,
UUIDs) and miss names written free-form in prose, rare date and ID formats, and identifying facts that are not
strings (a rare condition plus an age and a town). Use it as a last guard on text that has already been through your
institution's de-identification, never instead of it.

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
# A capitalised word as names are written: O'Neil, Smith-Jones, McDonald, SMITH.
_NAME_WORD = r"(?:[A-Z]\.|[A-Z][a-zA-Z'\-]+)"  # an initial ("A.") or a capitalised word
# A name stops at a sentence end, so "Doe, Jane. MRN 123" keeps "MRN".
_NAME = rf"{_NAME_WORD}(?:,?[ \t]+{_NAME_WORD}){{0,3}}"
_TITLE = r"(?:Mr|Mrs|Ms|Miss|Dr|Prof)\.?[ \t]+"
# An ID after its label: letters, digits, "-" and "/", with at least one digit ("AB-12345", "A12345", "12-3456-7").
_ID_VALUE = r"(?=[\w\-/]*\d)[A-Za-z0-9](?:[\w\-/]*[A-Za-z0-9])?"

# Capitalised words that follow "patient" (or a person label) in headings and clinical prose and are never a name:
# "PATIENT HISTORY:", "Pt Status post", "Patient: Male, 67 years", "Patient ID". A name ends at the first of them
# ("Patient Jane Doe Presents with" keeps "Presents with"); a name that starts with one is no name.
STOP_WORDS = frozenset({
    # headings and record fields
    "history", "status", "name", "id", "identifier", "identification", "number", "no", "mrn", "dob", "information",
    "info", "demographics", "details", "data", "record", "records", "summary", "report", "type", "class", "category",
    "location", "room", "bed", "unit", "consent", "instructions", "preparation", "position", "positioning",
    "education", "safety", "comfort", "care", "allergies", "medications", "weight", "height", "bmi", "complaint",
    "chief", "indication", "indications", "clinical", "medical", "surgical", "family", "social", "past", "prior",
    "previous", "current", "follow", "follow-up", "post", "pre", "non", "s/p", "unknown", "anonymous", "identity",
    # sex and age
    "male", "female", "man", "woman", "boy", "girl", "sex", "gender", "age", "aged", "year", "years", "yo", "old",
    "adult", "child", "pediatric", "paediatric", "infant", "neonate", "elderly",
    # verbs and function words that start a clause
    "is", "was", "were", "has", "had", "have", "with", "without", "presents", "presented", "presenting", "reports",
    "reported", "denies", "denied", "complains", "states", "stated", "underwent", "received", "returns", "returned",
    "admitted", "arrived", "arrives", "tolerated", "declined", "refused", "unable", "able", "should", "not",
    "yes", "the", "and", "or", "for", "in", "on", "at", "of", "to", "by", "from", "here", "seen",
    # services and roles ("Referred by GP", "Reviewed by Radiology")
    "gp", "pcp", "radiology", "cardiology", "neurology", "oncology", "surgery", "orthopedics", "orthopaedics",
    "urology", "emergency", "ed", "er", "icu", "team", "department", "dept", "clinic", "service", "staff", "nurse",
    "nursing", "physician", "doctor", "resident", "surgeon", "radiologist", "technologist",
    # titles, whose name the title rule has already replaced ("Examined by Dr. [NAME]")
    "mr", "mrs", "ms", "miss", "dr", "prof",
})

# Order matters: contact details and IDs first, so their digits are not read as dates; dates before bare digit
# runs, so "20240312" inside an ISO timestamp is one date, not a date and an ID.
# (kind, pattern, group to replace: 0 = the whole match, 1 = the value after a kept label, how a name is checked)
# Name checks: "label" (after "Patient:" and the like) cuts the name at a stop word and keeps it when every word is
# allow-listed; "prose" (after "patient" or "seen by" in running text) cuts it at the first stop or allow-listed word,
# so "Patient Crohn's Disease" is no name; "title" (after Dr/Mr/...) cuts at a stop word but ignores the allow-list,
# so "Dr. Parkinson" is a person, and never drops the word right after the title; "" replaces the whole match as is.
_PATTERNS: list[tuple[str, re.Pattern[str], int, str]] = [
    ("email", re.compile(r"[\w.+\-]+@[\w\-]+(?:\.[\w\-]+)+"), 0, ""),
    ("id", re.compile(r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b"), 0, ""),
    ("id", re.compile(r"(?i:(?:\b(?:MRN|medical record(?: number)?|accession(?: number| no\.?)?|"
                      r"patient[ \t]+id|pt[ \t]+id|study[ \t]+id|ID)\b|\bacc(?:ession)?[ \t]*#)"
                      r"[ \t]*(?:no\.?|number|#)?[ \t]*[:#]?[ \t]*)" rf"({_ID_VALUE})"), 1, ""),
    ("phone", re.compile(r"(?<![\w\-])(?:\+\d{1,3}[ .\-]?)?(?:\(\d{2,4}\)[ .\-]?|\d{3}[ .\-])\d{3}[ .\-]\d{4}(?![\w\-])"), 0, ""),
    ("date", re.compile(r"\b\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+\-]\d{2}:?\d{2})?)?\b"), 0, ""),
    ("date", re.compile(r"\b\d{1,2}[/.\-]\d{1,2}[/.\-](?:\d{4}|\d{2})\b"), 0, ""),
    ("date", re.compile(rf"(?i:\b\d{{1,2}}(?:st|nd|rd|th)?[ \t]+(?:of[ \t]+)?{_MONTH},?[ \t]+\d{{4}}\b)"), 0, ""),
    # 12-Mar-2024, 12-MAR-2024, 12/Mar/24, 12 Mar 24 (a two-digit year only when no unit follows: "3 May 10 mm").
    ("date", re.compile(rf"(?i:\b\d{{1,2}}(?:[\-/.]{_MONTH}[\-/.](?:\d{{4}}|\d{{2}})|[ \t]+{_MONTH}[ \t]+\d{{2}})\b"
                        r"(?![ \t]*(?:mm|cm|ml|mg|%|x\b)))"), 0, ""),
    ("date", re.compile(rf"(?i:\b{_MONTH}[ \t]+\d{{1,2}}(?:st|nd|rd|th)?,?[ \t]+\d{{4}}\b)"), 0, ""),
    ("date", re.compile(rf"(?i:\b{_MONTH}[ \t]+\d{{4}}\b)"), 0, ""),
    ("date", re.compile(r"\b(?:19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\b"), 0, ""),
    ("id", re.compile(r"\b\d{6,}\b"), 0, ""),
    # DICOM person names: the whole "^"-joined token is one name (DOE^JANE, Doe^Jane^^Dr); before the other name
    # rules, which would take "DOE" alone. Not "cm^2": a component never holds a digit.
    ("name", re.compile(r"(?<![\w^])[A-Za-z][A-Za-z'\-]+(?:\^[A-Za-z'\-]*)+(?![\w^])"), 0, ""),
    # Names after a label that introduces a person ("Patient: Doe, Jane", "Referring physician: Dr. A. Lee").
    ("name", re.compile(r"(?i:\b(?:patient(?:[ \t]+name)?|name|pt|referring(?:[ \t]+physician)?|physician|radiologist|"
                        r"attending|signed(?:[ \t]+by)?|dictated(?:[ \t]+by)?|reported(?:[ \t]+by)?|read[ \t]+by|"
                        rf"technologist|cc)[ \t]*:[ \t]*)(?:{_TITLE})?" rf"({_NAME})"), 1, "label"),
    # Names after a title ("Dr. Smith", "Mrs Jane Doe", "Dr. Parkinson").
    ("name", re.compile(rf"\b{_TITLE}({_NAME_WORD}(?:[ \t]+{_NAME_WORD}){{0,2}})"), 1, "title"),
    # Names after a phrase that introduces a person ("seen by SMITH, John", "Seen by John Smith.").
    ("name", re.compile(r"(?i:\b(?:seen|examined|referred|ordered|reviewed|signed|dictated|reported|read|interpreted)"
                        r"[ \t]+by[ \t]*:?[ \t]*)" rf"(?:{_TITLE})?({_NAME})"), 1, "prose"),
    # Names after "patient" in prose ("Patient Jane Doe presents with ...").
    ("name", re.compile(rf"(?i:\b(?:patient|pt\.?)[ \t]+)(?:{_TITLE})?({_NAME_WORD}(?:[ \t]+{_NAME_WORD}){{0,2}})"), 1, "prose"),
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
        for kind, pattern, group, check in _PATTERNS:
            text = pattern.sub(self._replacer(kind, group, check, counts), text)
        return text, counts

    def _replacer(self, kind: str, group: int, check: str, counts: Counter[str]) -> Callable[[re.Match[str]], str]:
        def replace(match: re.Match[str]) -> str:
            start, end = match.start(group), match.end(group)
            if check:
                end = self._name_end(match.group(group), check)
                if end is None:
                    return match.group(0)
                end += start
            counts[kind] += 1
            whole, offset = match.group(0), match.start(0)
            return whole[:start - offset] + PLACEHOLDERS[kind] + whole[end - offset:]
        return replace

    def _name_end(self, value: str, check: str) -> int | None:
        """Where the name in ``value`` ends, or None when it is no name (see the checks above _PATTERNS)."""
        end, words = 0, []
        for word in re.finditer(r"[^ \t,]+", value):
            norm = _norm(word.group())
            stop = norm in STOP_WORDS or norm.split("-")[0] in STOP_WORDS
            if (stop and (words or check != "title")) or (check == "prose" and norm in self.allow):
                break
            end, words = word.end(), words + [norm]
        if not words or (check == "label" and all(w in self.allow for w in words)):
            return None
        return end

    def _allowed(self, name: str) -> bool:
        words = [_norm(w) for w in re.split(r"[ \t,]+", name) if w]
        return bool(words) and all(w in self.allow for w in words)


def _norm(word: str) -> str:
    """A word as the allow and stop lists hold it: lower case, no trailing punctuation, no possessive "'s"."""
    return word.lower().rstrip(".,:;").removesuffix("'s").rstrip("'")
