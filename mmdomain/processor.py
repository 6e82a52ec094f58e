"""Conversation -> input_ids, labels and media tensors: chat template, media expansion, assistant-only labels.

Template: the tokenizer's own chat template when it has one. Otherwise the plain template, rendered as

    {bos}{system}\n
    User: {user text}\n
    Assistant: {assistant text}{eos}\n
    ...

A media item is written in text as ``media_token`` (``<image>`` by default, LLaVA's marker) and, after
tokenisation, expanded to exactly ``tokens_per_item`` copies of its id, the number the connector produces (for a
kind with ``sizing``, e.g. audio clips shorter than the encoder's window, the item's own count).
Further media kinds (``ModelSpec.extra_kinds``, e.g. ``<audio>``) have their own token, count and transform;
media passed as a list are matched to markers of any kind in order of appearance.
Only assistant replies (through their end-of-turn token or EOS) are supervised; every other label is -100.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .errors import MmdomainError
from .media import ItemSize, MediaBatch, MediaKind

IGNORE = -100


class SampleError(MmdomainError, ValueError):
    """A sample that cannot be turned into a training example; the message names the sample and the fix."""


@dataclass
class ProcessedSample:
    input_ids: torch.Tensor
    labels: torch.Tensor
    media: tuple[torch.Tensor | None, ...]
    """Per media kind (in the processor's kind order), this sample's items stacked ``[n, ...]``, or None."""
    key: str
    truncated_tokens: int = 0
    sizes: tuple[torch.Tensor | None, ...] = ()
    """Per media kind with ``sizing``, ``[n, 2]`` (valid length, LLM tokens) of this sample's items; else None."""


class MultimodalProcessor:
    """Turns conversations into model inputs for the media ``kinds`` of a model (the primary kind first)."""

    def __init__(self, tokenizer: Any, kinds: Sequence[MediaKind], *, max_length: int = 2048,
                 use_chat_template: bool | None = None) -> None:
        if not kinds:
            raise ValueError("a processor needs at least one media kind")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.kinds = list(kinds)
        self._kind_of_part: dict[str, int] = {}
        for index, kind in enumerate(self.kinds):
            for name in (kind.name, *kind.aliases):
                self._kind_of_part.setdefault(name, index)
        self._kind_of_token = {k.token: i for i, k in enumerate(self.kinds)}
        self._count_of_id = {k.token_id: k.tokens_per_item for k in self.kinds}
        self._marker = re.compile("|".join(re.escape(k.token) for k in sorted(self.kinds, key=lambda k: -len(k.token))))
        has_template = bool(getattr(tokenizer, "chat_template", None))
        self.use_chat_template = has_template if use_chat_template is None else use_chat_template
        if self.use_chat_template and not has_template:
            raise ValueError("use_chat_template=True but the tokenizer has no chat_template")

    # The primary media kind's facts, which most callers (one media kind) want directly.

    @property
    def media_token(self) -> str:
        return self.kinds[0].token

    @property
    def media_token_id(self) -> int:
        return self.kinds[0].token_id

    @property
    def tokens_per_item(self) -> int:
        return self.kinds[0].tokens_per_item

    @property
    def transform(self) -> Callable[[Any], torch.Tensor] | None:
        return self.kinds[0].transform

    @property
    def domain(self) -> Any:
        return self.kinds[0].domain

    # -- public -------------------------------------------------------------------------------------------------

    def __call__(self, conversation: Sequence[dict[str, Any]], media: Sequence[Any] = (), *, key: str = "<unnamed>",
                 add_generation_prompt: bool = False) -> ProcessedSample:
        """``conversation``: ``[{"role": "user"|"assistant"|"system", "content": str | [parts]}]``; a part is
        ``{"type": "text", "text": ...}`` or ``{"type": "image", "image": <PIL/array/tensor>}``. Media may instead be
        marked with ``media_token`` in string content and passed in order as ``media``."""
        messages, items = self._normalise(conversation, list(media), key)
        text, spans = self._render(messages, add_generation_prompt, key)
        if not add_generation_prompt and not spans:
            raise SampleError(f"sample {key}: no assistant turn to supervise; a training sample needs at least one")
        ids, labels = self._tokenize(text, spans, key)
        sizes = [[self._size(item, kind, key) for kind_index, item in items if kind_index == k] if kind.sizing else None
                 for k, kind in enumerate(self.kinds)]
        ids, labels = self._expand(ids, labels, sizes)
        ids, labels, cut = self._truncate(ids, labels, key, add_generation_prompt)
        stacks = []
        for k, kind in enumerate(self.kinds):
            mine = [self._transform(item, kind) for kind_index, item in items if kind_index == k]
            stacks.append(torch.stack(mine) if mine else None)
        measured = tuple(torch.tensor(s, dtype=torch.long).reshape(-1, 2) if s else None for s in sizes)
        return ProcessedSample(torch.tensor(ids), torch.tensor(labels), tuple(stacks), key, cut, measured)

    def collate(self, samples: Sequence[ProcessedSample], padding_side: str = "right") -> dict[str, Any]:
        """Pad to the longest sample; media are concatenated in sample order (the order the model splices them)."""
        length = max(len(s.input_ids) for s in samples)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(samples), length), pad, dtype=torch.long)
        labels = torch.full((len(samples), length), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(samples), length), dtype=torch.long)
        for i, s in enumerate(samples):
            n = len(s.input_ids)
            sl = slice(0, n) if padding_side == "right" else slice(length - n, length)
            ids[i, sl], labels[i, sl], mask[i, sl] = s.input_ids, s.labels, 1
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": labels,
            "media": self._media(samples),
            "keys": [s.key for s in samples],
            "num_tokens": int(mask.sum()),
        }

    def collate_packed(self, samples: Sequence[ProcessedSample], pack_length: int) -> dict[str, Any]:
        """Pack samples into rows of at most ``pack_length`` tokens (first-fit, longest first) instead of padding each
        to the longest. ``position_ids`` restart at 0 for every sample and ``attention_mask`` is None, so the LLM
        builds a block-diagonal causal mask (transformers' packed-sequence path): no sample attends to another, and
        the loss equals the padded batch's. Media follow the order of the samples in the rows."""
        rows: list[list[int]] = []
        room: list[int] = []
        for i in sorted(range(len(samples)), key=lambda i: -len(samples[i].input_ids)):
            n = len(samples[i].input_ids)
            if n > pack_length:
                raise SampleError(f"sample {samples[i].key}: {n} tokens do not fit data.pack_length={pack_length}; raise it")
            slot = next((r for r, free in enumerate(room) if n <= free), None)
            if slot is None:
                rows.append([])
                room.append(pack_length)
                slot = len(rows) - 1
            rows[slot].append(i)
            room[slot] -= n
        width = max(pack_length - free for free in room)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        order = []
        for r, members in enumerate(rows):
            at = 0
            for i in sorted(members):
                n = len(samples[i].input_ids)
                ids[r, at : at + n], labels[r, at : at + n] = samples[i].input_ids, samples[i].labels
                labels[r, at] = IGNORE  # never predict a sample's first token from the previous sample
                positions[r, at : at + n] = torch.arange(n)
                at += n
                order.append(i)
            positions[r, at:] = torch.arange(width - at)  # padding is a block of its own
        packed = [samples[i] for i in order]
        return {"input_ids": ids, "attention_mask": None, "position_ids": positions, "labels": labels, "media": self._media(packed),
                "keys": [s.key for s in packed], "num_tokens": sum(len(s.input_ids) for s in packed)}

    def _media(self, samples: Sequence[ProcessedSample]) -> list[MediaBatch | None]:
        """Per media kind, the items of all samples concatenated in sample order (the order the model splices them)."""
        batches: list[MediaBatch | None] = []
        for k, kind in enumerate(self.kinds):
            present = [s.media[k] for s in samples if s.media[k] is not None]
            if not present:
                batches.append(None)
                continue
            sizes = [s.sizes[k] for s in samples if s.media[k] is not None] if kind.sizing else None
            sizes = torch.cat(sizes) if sizes and all(x is not None for x in sizes) else None
            batches.append(MediaBatch(torch.cat(present), encoded=kind.encoded, lengths=None if sizes is None else sizes[:, 0],
                                      tokens=None if sizes is None else sizes[:, 1]))
        return batches

    # -- steps --------------------------------------------------------------------------------------------------

    def _normalise(self, conversation: Sequence[dict[str, Any]], media: list[Any], key: str) -> tuple[list[dict[str, str]], list[tuple[int, Any]]]:
        """Messages with markers in the text, and ``(kind index, item)`` for each media item in marker order."""
        messages, items = [], []
        for turn, message in enumerate(conversation):
            role, content = message.get("role"), message.get("content")
            if role not in ("system", "user", "assistant"):
                raise SampleError(f"sample {key}, turn {turn}: role {role!r} must be system, user or assistant")
            if isinstance(content, str):
                text = content
            elif isinstance(content, list):
                pieces = []
                for part in content:
                    kind = part.get("type")
                    if kind == "text":
                        pieces.append(part["text"])
                    elif kind in self._kind_of_part:
                        index = self._kind_of_part[kind]
                        pieces.append(self.kinds[index].token)
                        items.append((index, part.get(kind, part.get("data"))))
                    else:
                        raise SampleError(f"sample {key}, turn {turn}: content part type {kind!r} is not text or one of {sorted(self._kind_of_part)}")
                text = " ".join(p for p in pieces if p)
            else:
                raise SampleError(f"sample {key}, turn {turn}: content must be a string or a list of parts")
            if role == "assistant" and self._marker.search(text):
                raise SampleError(f"sample {key}, turn {turn}: media in an assistant turn cannot be supervised; move it to a user turn")
            messages.append({"role": role, "content": text})
        if items and media:
            raise SampleError(f"sample {key}: media given both inside the conversation and as a separate list; use one")
        markers = [self._kind_of_token[m] for msg in messages for m in self._marker.findall(msg["content"])]
        if not items:
            if len(markers) != len(media):
                tokens = " / ".join(repr(k.token) for k in self.kinds)
                raise SampleError(f"sample {key}: {len(markers)} {tokens} markers in the text but {len(media)} media items; they must match one to one")
            items = list(zip(markers, media))
        return messages, items

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool, key: str) -> tuple[str, list[tuple[int, int]]]:
        """Full prompt text and the character spans of the supervised assistant replies."""
        if not self.use_chat_template:
            return self._render_plain(messages, add_generation_prompt)
        render = lambda msgs, gen: self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)  # noqa: E731
        spans, through = [], ""
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before, through = render(messages[:i], True), render(messages[: i + 1], False)
            if not through.startswith(before):
                raise SampleError(
                    f"sample {key}: the chat template rewrites earlier turns when turn {i} is added, so assistant "
                    "spans cannot be located; set use_chat_template=False to use the plain template"
                )
            reply = through[len(before) :].rstrip()
            spans.append((len(before), len(before) + len(reply)))
        text = render(messages, add_generation_prompt)
        if not text.startswith(through):
            raise SampleError(f"sample {key}: the chat template renders a prefix of the conversation differently from the whole")
        return text, spans

    def _render_plain(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> tuple[str, list[tuple[int, int]]]:
        tok = self.tokenizer
        text, spans = tok.bos_token or "", []
        for message in messages:
            if message["role"] == "system":
                text += message["content"] + "\n"
            elif message["role"] == "user":
                text += "User: " + message["content"] + "\n"
            else:
                text += "Assistant: "
                start = len(text)
                text += message["content"] + (tok.eos_token or "")
                spans.append((start, len(text)))
                text += "\n"
        if add_generation_prompt:
            text += "Assistant:"
        return text, spans

    def _tokenize(self, text: str, spans: list[tuple[int, int]], key: str) -> tuple[list[int], list[int]]:
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        labels = [IGNORE] * len(ids)
        for j, (a, b) in enumerate(offsets):
            if b > a and any(a < e and b > s for s, e in spans):
                labels[j] = ids[j]
        if spans and all(l == IGNORE for l in labels):
            raise SampleError(f"sample {key}: the assistant replies map to no tokens; check the tokenizer and template")
        return ids, labels

    def _expand(self, ids: list[int], labels: list[int], sizes: list[list[ItemSize] | None]) -> tuple[list[int], list[int]]:
        """Each media marker id becomes its item's block of placeholder ids (sized items in marker order)."""
        sized = {kind.token_id: iter(s) for kind, s in zip(self.kinds, sizes) if s is not None}
        out_ids, out_labels = [], []
        for tok_id, label in zip(ids, labels):
            count = self._count_of_id.get(tok_id)
            if tok_id in sized:
                count = next(sized[tok_id]).tokens
            if count is not None:
                out_ids += [tok_id] * count
                out_labels += [IGNORE] * count
            else:
                out_ids.append(tok_id)
                out_labels.append(label)
        return out_ids, out_labels

    def _truncate(self, ids: list[int], labels: list[int], key: str, generating: bool) -> tuple[list[int], list[int], int]:
        if len(ids) <= self.max_length:
            return ids, labels, 0
        media_end = max((i + 1 for i, t in enumerate(ids) if t in self._count_of_id), default=0)
        if media_end > self.max_length or generating:
            raise SampleError(
                f"sample {key}: {len(ids)} tokens exceed max_length={self.max_length}"
                + (f" and cutting would split a media block ending at token {media_end}" if media_end > self.max_length else "")
                + "; raise max_length, use a connector with fewer tokens per item, or shorten the sample"
            )
        cut = len(ids) - self.max_length
        ids, labels = ids[: self.max_length], labels[: self.max_length]
        if all(l == IGNORE for l in labels):
            raise SampleError(f"sample {key}: truncation to max_length={self.max_length} removes every supervised token; raise max_length")
        return ids, labels, cut

    @staticmethod
    def _size(item: Any, kind: MediaKind, key: str) -> ItemSize:
        try:
            return kind.sizing(item)
        except (TypeError, ValueError) as exc:
            raise SampleError(f"sample {key}: a {kind.name} item cannot be measured ({exc})") from None

    @staticmethod
    def _transform(item: Any, kind: MediaKind) -> torch.Tensor:
        if kind.transform is None:
            if not isinstance(item, torch.Tensor):
                raise SampleError(f"{kind.name} items must be tensors when the processor has no transform for them")
            return item
        return kind.transform(item)

    def decode_media(self, conversation: list[dict[str, Any]], named: list[tuple[str, bytes]]) -> tuple[list[dict[str, Any]], list[Any]]:
        """Decode raw media files with this processor's domain (see ``mmdomain.domains.decode_media``)."""
        if self.domain is None:
            raise ValueError("this processor has no domain to decode raw media with")
        from .domains import decode_media

        return decode_media(self.domains, conversation, named, self.media_token)

    def use_cached_features(self, encoder_tokens: int, sizing: Callable[[Any], ItemSize] | None = None) -> None:
        """Primary media now arrive as encoder features (``.npy`` members of a feature cache): decoded by the generic
        domain, turned into float tensors, and batched as ``encoded`` so the model skips its encoder. With ``sizing``
        the cache holds each clip's own frames only: they are padded back to ``encoder_tokens`` and sized by it."""
        from .domains import build_domain

        def to_tensor(array: Any) -> torch.Tensor:
            features = torch.as_tensor(np.asarray(array, dtype=np.float32))
            if features.shape[-2] < encoder_tokens:  # the token axis: [tokens, dim], or [slices, tokens, dim] for a volume
                features = torch.nn.functional.pad(features, (0, 0, 0, encoder_tokens - features.shape[-2]))
            return features

        self.kinds[0] = self.kinds[0].with_changes(transform=to_tensor, domain=build_domain("generic"), encoded=True, sizing=sizing)

    @property
    def domains(self) -> dict[str, Any]:
        """Marker token -> the domain that decodes files of that kind."""
        return {k.token: k.domain for k in self.kinds}
