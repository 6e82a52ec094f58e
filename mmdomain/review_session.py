"""One review: the queue of items still to judge (the next one prepared in the background while the expert judges the
current one), what the page is told about the current item, and the judgement lines written for it."""
from __future__ import annotations

import logging
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from .data import SAMPLE_FAILURES
from .model import MultimodalLM
from .processor import MultimodalProcessor
from .review_answers import Answers, Sampling, answers_for
from .review_items import ReviewData, ReviewItem, Unreadable
from .review_render import View, render_member
from .review_store import JudgementStore, MediaCopy, ReviewError

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """An item ready to show: its answers, its media views and the media copies a judgement writes."""

    item: ReviewItem
    answers: Answers
    views: list[View]
    copies: list[MediaCopy]

    @property
    def id(self) -> str:
        return str(self.item.position)


class _Done:
    """Keys the queue leaves out: judged (in the file) or skipped in this session."""

    def __init__(self, judged: set[str], skipped: set[str]) -> None:
        self.judged, self.skipped = judged, skipped

    def __contains__(self, key: object) -> bool:
        return key in self.judged or key in self.skipped


def kind_label(token: str) -> str:
    """``<image>`` -> ``image``: how the page names a media kind."""
    return token.strip("<>[]{} ") or "media"


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class ReviewSession:
    """Items of ``data`` not yet in ``store``, judged one at a time by ``judge``. ``raw_domains`` (marker -> the
    domain as make-shards builds it) decide what a judged item's media copies hold: the same identity-free bytes
    make-shards would store, whatever tool wrote the shards."""

    def __init__(self, model: MultimodalLM, processor: MultimodalProcessor, data: ReviewData, store: JudgementStore,
                 settings: Sampling, *, judge: str, run: str, raw_domains: dict[str, Any],
                 composite: tuple[int, int, int] | None = None, max_side: int = 2048) -> None:
        self.model, self.processor, self.data, self.store, self.settings = model, processor, data, store, settings
        self.judge, self.run, self.raw_domains, self.composite, self.max_side = judge, run, raw_domains, composite, max_side
        self.keys = set(data.all_keys())
        elsewhere = len(store.judged - self.keys)
        if elsewhere:
            log.info("%s holds %d judgements of items that are not in --data (kept, not counted here)", store.path, elsewhere)
        self.skipped: set[str] = set()
        self.unreadable: dict[str, str] = {}
        self._pending = data.items(_Done(store.judged, self.skipped))
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="review-prepare")  # one model call at a time
        self._next: Future | None = None
        self._current: Prepared | None = None
        self._recent: dict[str, Prepared] = {}  # the current item and the one before it (its images may still be loading)
        self._finished = False
        self._lock = threading.Lock()

    # -- the queue --------------------------------------------------------------------------------------------------

    def _prepare_next(self) -> Prepared | None:
        for item in self._pending:
            if isinstance(item, Unreadable):
                self._unreadable(item.key, item.reason)
                continue
            try:
                return self.prepare(item)
            except ReviewError:
                # A setting of the review that fits no item (--composite past the run's bands): one line naming the flag,
                # not every item counted unreadable (ReviewError is a ValueError, so the line below would take it).
                raise
            except SAMPLE_FAILURES as exc:
                self._unreadable(item.key, str(exc))
        return None

    def _unreadable(self, key: str, reason: str) -> None:
        reason = reason.removeprefix(f"sample {key}: ")
        self.unreadable[key] = reason
        log.warning("item %s cannot be reviewed and is left out (%d so far): %s", key, len(self.unreadable), reason)

    def prepare(self, item: ReviewItem) -> Prepared:
        views, copies, counts = [], [], {}
        for member in item.members:
            counts[member.token] = counts.get(member.token, 0) + 1
            label = f"{kind_label(member.token)} {counts[member.token]}"
            views += render_member(member.name, member.data, self.processor.domains[member.token], label=label,
                                   composite_bands=self.composite, max_side=self.max_side)
            copies.append(MediaCopy(member.suffix, self.raw_domains[member.token].prepare_for_shard(member.name, member.data)))
        return Prepared(item, answers_for(self.model, self.processor, item, self.settings), views, copies)

    def current(self) -> Prepared | None:
        """The item on the page (prepared now if the background has not done it yet); None once all are judged."""
        with self._lock:
            return self._current_locked()

    def _current_locked(self) -> Prepared | None:
        if self._current is None and not self._finished:
            future, self._next = self._next or self._executor.submit(self._prepare_next), None
            self._current = future.result()  # an unexpected failure (out of memory) reaches the page; the next call tries on
            if self._current is None:
                self._finished = True
            else:
                self._recent = {p.id: p for p in (*list(self._recent.values())[-1:], self._current)}
                self._next = self._executor.submit(self._prepare_next)  # the next item while this one is judged
        return self._current

    def media(self, item_id: str, index: int, kind: str) -> bytes | None:
        prepared = self._recent.get(item_id)
        if prepared is None or not 0 <= index < len(prepared.views):
            return None
        view = prepared.views[index]
        return view.wav if kind == "wav" else view.png

    # -- judging ----------------------------------------------------------------------------------------------------

    def _checked_current(self, item_id: str) -> Prepared:
        current = self._current_locked()
        if current is None or current.id != item_id:
            raise ReviewError(f"item {item_id} is no longer the one to judge (judged or skipped in another tab?); the page shows "
                              "the current one now")
        return current

    def judge_item(self, item_id: str, decision: str, *, edited: str | None = None, note: str | None = None) -> dict[str, Any]:
        """Record a judgement of the current item: ``decision`` ``1`` or ``2`` (that answer is better; ``edited`` is
        that answer rewritten into the preferred one) or ``flag``. Returns the line written."""
        with self._lock:
            current = self._checked_current(item_id)
            line = judgement_line(current, decision, edited=edited, note=note, judge=self.judge, run=self.run, mode=self.settings.mode)
            written = self.store.append(line, current.copies)
            self._current = None
            return written

    def skip(self, item_id: str) -> None:
        """Leave the current item for later: not written, shown again when the review is started again."""
        with self._lock:
            self.skipped.add(self._checked_current(item_id).item.key)
            self._current = None

    # -- what the page is told --------------------------------------------------------------------------------------

    def progress(self) -> dict[str, Any]:
        return {"judged": len(self.store.judged & self.keys), "total": len(self.keys), "skipped": len(self.skipped),
                "unreadable": len(self.unreadable), "last_unreadable": next(reversed(self.unreadable.values()), None)}

    def state(self) -> dict[str, Any]:
        current = self.current()
        return {"judge": self.judge, "mode": self.settings.mode, "out": self.store.path.name, "progress": self.progress(),
                "item": None if current is None else self.describe(current), "done": current is None}

    def describe(self, prepared: Prepared) -> dict[str, Any]:
        """The current item as the page shows it: texts with media markers as labels, answers, media URLs. Nothing
        from media files but their pixels and samples (no header, no file or sample name)."""
        item, counts = prepared.item, {}
        pattern = self.data.token_pattern

        def label(match: re.Match) -> str:
            token = match.group(0)
            counts[token] = counts.get(token, 0) + 1
            return f"[{kind_label(token)} {counts[token]}]"

        turns = [{"role": t["role"], "text": pattern.sub(label, t["content"]).strip()} for t in item.prompt_turns]
        views = [{"kind": v.kind, "label": v.label, "png": f"media/{prepared.id}/{i}.png",
                  "wav": f"media/{prepared.id}/{i}.wav" if v.wav is not None else None} for i, v in enumerate(prepared.views)]
        return {"id": prepared.id, "number": item.position + 1, "turns": turns, "choices": item.record.choices,
                "answers": list(prepared.answers.texts), "same": prepared.answers.same, "views": views}

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.store.close()


def judgement_line(prepared: Prepared, decision: str, *, edited: str | None, note: str | None, judge: str, run: str,
                   mode: str) -> dict[str, Any]:
    """The preference-pair line for a judgement (team format: media, prompt, chosen, rejected, plus what the review
    knows: judge, when, key, both answers as shown and where each came from)."""
    item, answers = prepared.item, prepared.answers
    line: dict[str, Any] = {"prompt": item.prompt}
    if decision == "flag":
        line["flagged"] = True
    elif decision in ("1", "2"):
        pick = int(decision) - 1
        chosen = answers.texts[pick] if edited is None else edited.strip()
        rejected = answers.texts[1 - pick]
        if not chosen:
            raise ReviewError("the preferred answer is empty; write the answer you prefer, or flag the item")
        if chosen == rejected.strip():
            raise ReviewError("the preferred answer and the other one are the same text, which teaches nothing; edit it into a better "
                              "answer, flag the item, or skip it")
        line.update(chosen=chosen, rejected=rejected,
                    chosen_source="edited" if edited is not None and chosen != answers.texts[pick] else answers.sources[pick],
                    rejected_source=answers.sources[1 - pick])
        if line["chosen_source"] == "edited":
            line["edited_from"] = answers.texts[pick]
    else:
        raise ReviewError(f"decision {decision!r} is not 1, 2 or flag")
    line.update(judge=judge, judged_at=utc_now(), key=item.key, mode=mode, decision=decision, answers=list(answers.texts),
                sources=list(answers.sources), reference=item.reference, run=run)
    if item.context:
        line["context"] = item.context
    if item.record.choices:
        line["choices"] = item.record.choices
    if note and note.strip():
        line["note"] = note.strip()
    return line
