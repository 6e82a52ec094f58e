"""Shard data as samples: shard patterns, the failure budget, decoding a sample's members into a Record, and
reading records in order (evaluation, feature caching, statistics). Training's resumable order is train_stream."""
from __future__ import annotations

import fnmatch
import glob
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from tqdm import tqdm

from .domains import DecodeError, Domain, decode_media
from .errors import MmdomainError
from .processor import SampleError
from .shard_index import ShardIndex, ShardReader
from .shards import normalise_record, read_manifest

log = logging.getLogger(__name__)

_MEDIA_MEMBER = re.compile(r"^(\d+)\.([A-Za-z0-9.]+)$")  # 0.png, 1.nii.gz

# What a bad sample raises while it is decoded and processed: counted against the budget, never a crash.
SAMPLE_FAILURES = (DecodeError, SampleError, ValueError, KeyError)


class DataError(MmdomainError, RuntimeError):
    """The data cannot feed the run (no shards, or more bad samples than the budget allows)."""


@dataclass
class Record:
    """One decoded sample: its conversation, media in order, and evaluation fields."""

    key: str
    conversations: list[dict[str, Any]]
    media: list[Any]
    choices: list[str] | None = None
    answer_type: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    rejected: str | None = None
    """A preference pair's rejected answer (the conversation ends in the chosen one)."""


@dataclass(frozen=True)
class SampleFormat:
    """How a shard sample is laid out: numbered media members (make-shards) or named ones (``media_keys``), and
    an optional caption member for plain image-text webdatasets such as img2dataset output."""

    media_keys: tuple[str, ...] | None = None
    caption_key: str | None = None
    caption_prompt: str = "Describe the image."

    @classmethod
    def from_recipe(cls, data: Any) -> "SampleFormat":
        return cls(tuple(data.media_keys) if data.media_keys else None, data.caption_key, data.caption_prompt)


def expand_shards(patterns: str | list[str]) -> list[str]:
    """Glob and brace patterns (``train-{000000..000009}.tar``) -> sorted, de-duplicated existing shard paths."""
    import braceexpand

    out: list[str] = []
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        matched = []
        for expanded in braceexpand.braceexpand(str(Path(pattern).expanduser())):
            matched += sorted(glob.glob(expanded)) if any(c in expanded for c in "*?[") else ([expanded] if Path(expanded).is_file() else [])
        if not matched:
            raise DataError(f"shard pattern {pattern!r} matches no file; check the path, or write shards with `mmdomain make-shards`")
        out += matched
    return list(dict.fromkeys(out))



class FailureBudget:
    """Counts samples that cannot be used, each once however often it is met (every epoch, every worker), and stops
    the run with their names once more than ``budget`` have failed. Lives in the main process; workers report."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.failures: dict[str, tuple[str, int]] = {}  # key -> (first reason, samples it stands for)

    @property
    def total(self) -> int:
        return sum(count for _, count in self.failures.values())

    def record(self, key: str, reason: str, count: int = 1) -> None:
        if key in self.failures:
            return
        reason = reason.removeprefix(f"sample {key}: ")  # the processor names the sample too
        self.failures[key] = (reason, count)
        log.warning("skipped %s (%d failed so far, budget %d): %s", key if count == 1 else f"{count} samples of {key}",
                    self.total, self.budget, reason)
        self.enforce()

    def enforce(self) -> None:
        """Stop the run once more than ``budget`` samples failed (after ``merge`` of other ranks' failures too)."""
        if self.total > self.budget:
            first = "; ".join(f"{k}: {r}" for k, (r, _) in list(self.failures.items())[:3])
            raise DataError(
                f"{self.total} samples failed, over data.decode_error_budget={self.budget} (each is in the log; first: {first}); "
                "fix or drop those samples, or raise the budget if losing them is acceptable"
            )

    def state(self) -> dict[str, list[Any]]:
        return {key: [reason, count] for key, (reason, count) in self.failures.items()}

    def merge(self, state: dict[str, list[Any]]) -> None:
        """Add the failures a checkpoint recorded (a resumed run counts each of them once, as before the stop)."""
        for key, (reason, count) in state.items():
            self.failures.setdefault(key, (reason, int(count)))


class ShardFaults:
    """Records each shard's faults in the failure budget as the shard is indexed: its duplicate or ambiguous samples,
    and samples missing against ``manifest.json`` (make-shards lists each shard's count there)."""

    def __init__(self, failures: FailureBudget) -> None:
        self.failures = failures
        self._manifests: dict[Path, dict[str, int]] = {}

    def check(self, index: ShardIndex, name: str) -> None:
        for key, reason in index.problems:
            self.failures.record(f"{name}:{key}", reason)
        path = Path(index.path)
        if path.parent not in self._manifests:
            manifest = read_manifest(path.parent) or {}
            self._manifests[path.parent] = {s["name"]: s["samples"] for entry in manifest.values() for s in entry.get("shards", [])}
        expected = self._manifests[path.parent].get(path.name)
        found = len(index) + len(index.problems)
        if expected is not None and found < expected:
            cause = index.truncated or "the file holds fewer samples than were written"
            self.failures.record(f"{name}:<missing>", f"holds {found} of the {expected} samples manifest.json lists ({cause}); re-copy "
                                 "or re-write the shard", count=expected - found)
        elif expected is not None and found > expected:
            log.warning("shard %s holds %d samples but manifest.json lists %d: it was replaced after make-shards", path, found, expected)
        elif index.truncated:
            log.warning("shard %s: %s; a sample at its end may be incomplete", path, index.truncated)
        if expected is None and self._manifests[path.parent]:
            log.warning("shard %s is not listed in the manifest.json beside it: make-shards did not write it there (copied or "
                        "added by hand?); its samples are used", path)

    def listed_but_missing(self, patterns: str | list[str], found: list[str]) -> list[tuple[str, int]]:
        """(path, samples) of shards a manifest lists that ``patterns`` would match but that are not on disk."""
        import braceexpand

        present = {str(Path(p).resolve()) for p in found}
        missing = []
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            for expanded in braceexpand.braceexpand(str(Path(pattern).expanduser())):
                directory = Path(expanded).parent
                manifest = read_manifest(directory) if directory.is_dir() else None
                for entry in (manifest or {}).values():
                    for shard in entry.get("shards", []):
                        path = directory / shard["name"]
                        if fnmatch.fnmatch(str(path), expanded) and str(path.resolve()) not in present:
                            missing.append((str(path), int(shard["samples"])))
        return list(dict.fromkeys(missing))


class ShardCatalog:
    """Every training shard indexed before the first sample is read: usable samples per shard, and each fault
    counted once in ``failures``, so a damaged dataset stops the run at step 0, with names, not half-way through.
    With the ``patterns`` the shards were found by, shards a manifest lists under them but that are missing on disk
    count too, and a shard that is a byte-size and key-for-key copy of another is left out (its samples would train
    twice). The indexes stay in memory, so DataLoader workers forked from this process never read a header again."""

    def __init__(self, paths: list[str], failures: FailureBudget, patterns: str | list[str] | None = None) -> None:
        self.reader = ShardReader(paths)
        self.paths, self.names = self.reader.paths, self.reader.names
        faults = ShardFaults(failures)
        self.counts: list[int] = []
        seen: dict[tuple[int, int], int] = {}  # (size, hash of the key sequence) -> first shard with it
        for shard in tqdm(range(len(self.paths)), desc="index shards", leave=False, disable=len(self.paths) < 50):
            index = self.reader.index(shard)
            faults.check(index, self.names[shard])
            identity = (Path(self.paths[shard]).stat().st_size, hash(tuple(index.keys)))
            if len(index) and identity in seen:
                failures.record(f"{self.names[shard]}:<copy>", f"is a copy of {self.names[seen[identity]]} (same size and sample keys), "
                                "so its samples would train twice; it is left out: remove it", count=len(index))
                self.counts.append(0)
                continue
            seen.setdefault(identity, shard)
            if not len(index) and not index.problems:
                log.warning("shard %s holds no sample", self.paths[shard])
            self.counts.append(len(index))
        if patterns is not None:
            for path, listed in faults.listed_but_missing(patterns, self.paths):
                failures.record(f"{Path(path).name}:<missing shard>", f"manifest.json lists this shard with {listed} samples, but the "
                                "file is not there; copy it back or write the shards again", count=listed)

    @property
    def total(self) -> int:
        return sum(self.counts)

    def fingerprint(self) -> list[list[Any]]:
        """What the data is, for resume: each shard's path, size and usable sample count."""
        return [[path, Path(path).stat().st_size, count] for path, count in zip(self.paths, self.counts)]


def decode_sample(raw: dict[str, bytes], key: str, layout: SampleFormat, domains: Domain | dict[str, Domain], media_token: str) -> Record:
    """A sample's members (``{suffix: bytes}``) -> a Record with decoded media, conversation markers checked."""
    members = sorted(raw)
    if layout.media_keys is not None:
        missing = [k for k in layout.media_keys if k not in raw]
        if missing:
            raise DecodeError(f"no member {missing[0]!r} (data.media_keys); members: {members}")
        names = list(layout.media_keys)
    else:
        numbered = [(int(m.group(1)), name) for name, m in ((n, _MEDIA_MEMBER.match(n)) for n in raw) if m]
        names = [name for _, name in sorted(numbered)]
    sample: dict[str, Any] = {}
    if "json" in raw:
        try:
            sample = json.loads(raw["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DecodeError(f"json member is not valid JSON ({exc})") from None
        if not isinstance(sample, dict):
            raise DecodeError(f"json member holds a {type(sample).__name__}, not an object")
    if "conversations" not in sample:
        if layout.caption_key is None:
            raise DecodeError(f"no 'conversations' in a json member (members: {members}); write shards with `mmdomain make-shards`, "
                              "or set data.caption_key for image-text shards")
        if layout.caption_key not in raw:
            raise DecodeError(f"no caption member {layout.caption_key!r} (data.caption_key); members: {members}")
        sample = {"caption": raw[layout.caption_key].decode("utf-8", errors="replace").strip()}
    # The same normalisation as make-shards: markers checked (or added) against the media, choices checked.
    others = tuple(t for t in domains if t != media_token) if isinstance(domains, dict) else ()
    record = normalise_record({**sample, "media": names}, key, media_token=media_token, caption_prompt=layout.caption_prompt,
                              other_tokens=others)
    conversations, decoded = decode_media(domains, record["conversations"], [(name, raw[name]) for name in names], media_token)
    return Record(key, conversations, decoded, record.get("choices"), record.get("answer_type"), sample.get("meta", {}),
                  record.get("rejected"))


def iter_records(shards: list[str], domains: Domain | dict[str, Domain], *, failures: FailureBudget,
                 layout: SampleFormat = SampleFormat(), media_token: str = "<image>") -> Iterator[Record]:
    """Decoded records in shard order (evaluation, feature caching). Each shard is indexed when reached, so reading
    only the first samples (``eval.max_samples``) indexes only the shards they come from; faults and bad samples are
    counted in ``failures`` and skipped."""
    reader = ShardReader(shards, cache=2)
    faults = ShardFaults(failures)
    for shard in range(len(shards)):
        index = reader.index(shard)
        faults.check(index, reader.names[shard])
        for sample in range(len(index)):
            key = reader.key(shard, sample)
            try:
                yield decode_sample(reader.read(shard, sample), key, layout, domains, media_token)
            except SAMPLE_FAILURES as exc:
                failures.record(key, str(exc))
