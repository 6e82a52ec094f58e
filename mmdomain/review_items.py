"""What the review page judges: shard samples in order, each with its question turns, its reference answer, the
decoded record the model answers from, and its raw media members (with the marker that says which domain decodes
each), for showing them and for copying them beside the judgements."""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any, Iterator

from .data import _MEDIA_MEMBER, SAMPLE_FAILURES, Record, SampleFormat, decode_sample, expand_shards
from .processor import MultimodalProcessor
from .review_store import ReviewError
from .shard_index import ShardReader
from .shards import normalise_record

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MediaMember:
    """One media member of a sample as stored in its shard: ``name`` (``0.dcm``), its type part ``suffix``
    (``dcm``, ``nii.gz``, ``dcm.tar``), the stored bytes and the marker of its media kind."""

    name: str
    suffix: str
    data: bytes
    token: str


@dataclass
class ReviewItem:
    """One sample to judge. ``position`` is its place in the data (the page's item id); ``key`` its shard key
    (``train-000000.tar:x12``), unique across the shards given."""

    position: int
    key: str
    record: Record
    prompt_turns: list[dict[str, Any]]
    """The stored turns before the final answer, markers as stored (one per media member)."""
    reference: str
    members: list[MediaMember]

    @property
    def prompt(self) -> str:
        """The question the pair answers: the last user turn (the preference-pair line's ``prompt``)."""
        return next((t["content"] for t in reversed(self.prompt_turns) if t["role"] == "user"), "")

    @property
    def context(self) -> list[dict[str, Any]]:
        """Turns before the last user turn (a multi-turn sample); empty for a single question."""
        last = max((i for i, t in enumerate(self.prompt_turns) if t["role"] == "user"), default=len(self.prompt_turns))
        return self.prompt_turns[:last]


@dataclass(frozen=True)
class Unreadable:
    """A sample that cannot be shown or answered (undecodable media, a bad json member): counted, named in the log."""

    position: int
    key: str
    reason: str


class ReviewData:
    """The samples of ``patterns`` in shard order (at most ``limit``), read one at a time. Indexing reads tar headers
    only, so the total (the page's "12 / 50") is known before any sample is decoded."""

    def __init__(self, patterns: str | list[str], processor: MultimodalProcessor, *, limit: int | None = None,
                 layout: SampleFormat = SampleFormat()) -> None:
        self.processor, self.layout = processor, layout
        self.reader = ShardReader(expand_shards(patterns))
        self.keys: list[tuple[int, int, str]] = []  # (shard, sample, key) in order
        for shard in range(len(self.reader.paths)):
            if limit is not None and len(self.keys) >= limit:
                break  # shards past the limit are never indexed
            index = self.reader.index(shard)
            if index.problems or index.truncated:
                log.warning("shard %s: %s", self.reader.paths[shard],
                            index.truncated or f"{len(index.problems)} samples with duplicate keys are left out")
            self.keys += [(shard, sample, self.reader.key(shard, sample)) for sample in range(len(index))]
        if limit is not None:
            self.keys = self.keys[:limit]
        if not self.keys:
            raise ReviewError(f"--data {patterns} holds no samples to review; point it at shards written by `mmdomain make-shards`")
        self.token_pattern = re.compile("|".join(re.escape(t) for t in sorted(processor.domains, key=len, reverse=True)))

    def __len__(self) -> int:
        return len(self.keys)

    def all_keys(self) -> list[str]:
        return [key for _, _, key in self.keys]

    def items(self, skip: set[str]) -> Iterator[ReviewItem | Unreadable]:
        """Items in order, leaving out keys in ``skip`` (read when reached, so a key judged meanwhile is left out too)."""
        for position, (shard, sample, key) in enumerate(self.keys):
            if key in skip:
                continue
            try:
                yield self.read(position, shard, sample, key)
            except (*SAMPLE_FAILURES, OSError) as exc:
                yield Unreadable(position, key, str(exc))

    def read(self, position: int, shard: int, sample: int, key: str) -> ReviewItem:
        raw = self.reader.read(shard, sample)
        record = decode_sample(raw, key, self.layout, self.processor.domains, self.processor.media_token)
        turns = record_turns(raw, key, self.layout, self.processor)
        if not turns or turns[-1]["role"] != "assistant":
            raise ValueError(f"sample {key}: the last turn is not an answer, so there is nothing to compare the model's answers with")
        names = list(self.layout.media_keys) if self.layout.media_keys is not None else \
            [name for _, name in sorted((int(m.group(1)), n) for n, m in ((n, _MEDIA_MEMBER.match(n)) for n in raw) if m)]
        markers = [m for t in turns for m in self.token_pattern.findall(t["content"])]
        members = [MediaMember(name, name.split(".", 1)[-1], raw[name], marker) for name, marker in zip(names, markers)]
        return ReviewItem(position, key, record, turns[:-1], turns[-1]["content"], members)


def record_turns(raw: dict[str, bytes], key: str, layout: SampleFormat, processor: MultimodalProcessor) -> list[dict[str, Any]]:
    """The sample's turns as stored (one marker per media member, none repeated for tiles or slices), normalised as
    decoding does; ``decode_sample`` has checked the json member already."""
    sample = json.loads(raw["json"]) if "json" in raw else {"caption": raw[layout.caption_key].decode("utf-8", errors="replace").strip()}
    names = [n for n in raw if _MEDIA_MEMBER.match(n)] if layout.media_keys is None else list(layout.media_keys)
    others = tuple(t for t in processor.domains if t != processor.media_token)
    return normalise_record({**sample, "media": names}, key, media_token=processor.media_token,
                            caption_prompt=layout.caption_prompt, other_tokens=others)["conversations"]
