"""Stream webdataset shards: allow-listed decoding, counted failures, seeded order, rank/worker splitting, batching."""
from __future__ import annotations

import functools
import glob
import json
import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset

from .domains import DecodeError, Domain, decode_media
from .processor import MultimodalProcessor, SampleError
from .shards import normalise_record
from .errors import MmdomainError

log = logging.getLogger(__name__)

_MEDIA_MEMBER = re.compile(r"^(\d+)\.([A-Za-z0-9.]+)$")  # 0.png, 1.nii.gz


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
    """Counts samples that failed to decode or process; past ``budget`` the run stops with the names."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.failures: list[str] = []

    def record(self, key: str, reason: str) -> None:
        self.failures.append(f"{key}: {reason}")
        log.warning("skipped sample %s (failure %d, budget %d): %s", key, len(self.failures), self.budget, reason)
        if len(self.failures) > self.budget:
            shown = "\n  ".join(self.failures[:5])
            raise DataError(
                f"{len(self.failures)} samples failed, over data.decode_error_budget={self.budget}:\n  {shown}\n"
                "fix or drop those samples (or raise the budget if losing them is acceptable)"
            )


def open_local_shards(shards: list[str]) -> Iterator[dict[str, Any]]:
    for shard in shards:
        with open(shard, "rb") as stream:  # local files only: webdataset's URL opener would also run pipes
            yield {"url": shard, "stream": stream}


def iter_records(shards: list[str], domains: Domain | dict[str, Domain], *, failures: FailureBudget, shuffle_shards: bool = False,
                 seed: int = 0, epoch: int = 0, split: bool = True, layout: SampleFormat = SampleFormat(),
                 media_token: str = "<image>") -> Iterator[Record]:
    """Decoded records in shard order (shards shuffled by ``seed + epoch`` when asked), split across ranks and
    DataLoader workers by whole shards. Media are decoded by ``domains`` (the recipe's allow-list; a mapping
    from marker token to domain when the model takes several media kinds)."""
    from webdataset.shardlists import split_by_node, split_by_worker
    from webdataset.tariterators import group_by_keys, tar_file_expander

    order = list(shards)
    if shuffle_shards:
        random.Random(seed * 100003 + epoch).shuffle(order)
    if split:
        order = list(split_by_worker(split_by_node(order)))
    for raw in group_by_keys(tar_file_expander(open_local_shards(order))):
        key = f"{Path(raw['__url__']).name}:{raw['__key__']}"
        try:
            yield _decode(raw, key, layout, domains, media_token)
        except (DecodeError, SampleError, ValueError, KeyError) as exc:
            failures.record(key, str(exc))


def _decode(raw: dict[str, Any], key: str, layout: SampleFormat, domains: Domain | dict[str, Domain], media_token: str) -> Record:
    members = sorted(k for k in raw if not k.startswith("__"))
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
        except json.JSONDecodeError as exc:
            raise DecodeError(f"json member is not valid JSON ({exc.msg})") from None
    if "conversations" not in sample:
        if layout.caption_key is None:
            raise DecodeError(f"no 'conversations' in a json member (members: {members}); write shards with `mmdomain make-shards`, "
                              "or set data.caption_key for image-text shards")
        if layout.caption_key not in raw:
            raise DecodeError(f"no caption member {layout.caption_key!r} (data.caption_key); members: {members}")
        sample = {"caption": raw[layout.caption_key].decode("utf-8").strip()}
    # The same normalisation as make-shards: markers checked (or added) against the media, choices checked.
    others = tuple(t for t in domains if t != media_token) if isinstance(domains, dict) else ()
    record = normalise_record({**sample, "media": names}, key, media_token=media_token, caption_prompt=layout.caption_prompt,
                              other_tokens=others)
    conversations, decoded = decode_media(domains, record["conversations"], [(name, raw[name]) for name in names], media_token)
    return Record(key, conversations, decoded, record.get("choices"), record.get("answer_type"), sample.get("meta", {}))


class TrainStream(IterableDataset):
    """Processed training samples: seeded shard shuffle, then a seeded shuffle buffer; ``set_epoch`` reshuffles."""

    def __init__(self, shards: list[str], processor: MultimodalProcessor, *, seed: int, shuffle_buffer: int,
                 error_budget: int, limit: int | None = None, layout: SampleFormat = SampleFormat()) -> None:
        super().__init__()
        self.shards, self.processor, self.layout = shards, processor, layout
        self.seed, self.shuffle_buffer, self.limit = seed, shuffle_buffer, limit
        self.failures = FailureBudget(error_budget)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        rng = random.Random((self.seed * 1000003 + self.epoch) * 101 + (info.id if info else 0))
        # With a sample limit the subset must not change between epochs, so shard order stays fixed then.
        records = iter_records(self.shards, self.processor.domains, media_token=self.processor.media_token, failures=self.failures,
                               shuffle_shards=self.limit is None, seed=self.seed, epoch=self.epoch, layout=self.layout)
        buffer: list[Any] = []
        for n, record in enumerate(records):
            if self.limit is not None and n >= self.limit:
                break
            try:
                sample = self.processor(record.conversations, record.media, key=record.key)
            except (SampleError, ValueError) as exc:
                self.failures.record(record.key, str(exc))
                continue
            if self.shuffle_buffer <= 1:
                yield sample
                continue
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            i = rng.randrange(len(buffer))
            yield buffer[i]
            buffer[i] = sample
        rng.shuffle(buffer)
        yield from buffer


def train_loader(stream: TrainStream, batch_size: int, num_workers: int, pack_length: int | None = None) -> DataLoader:
    collate = stream.processor.collate if pack_length is None else functools.partial(stream.processor.collate_packed, pack_length=pack_length)
    return DataLoader(stream, batch_size=batch_size, num_workers=num_workers, collate_fn=collate, persistent_workers=False)


def epochs_of_batches(loader: DataLoader, stream: TrainStream) -> Iterator[tuple[int, dict[str, Any]]]:
    """(epoch, batch) forever, reshuffling every epoch; an epoch that yields nothing is an error, not a hang."""
    epoch = 0
    while True:
        stream.set_epoch(epoch)
        empty = True
        for batch in loader:
            empty = False
            yield epoch, batch
        if empty:
            raise DataError(f"the training shards yielded no usable sample ({len(stream.failures.failures)} failed)")
        epoch += 1
