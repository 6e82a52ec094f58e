"""One media kind at run time: how its items are prepared for the model (MediaKind) and batched for it (MediaBatch).

A model takes one or more media kinds (a chest image, a heart sound): ``spec.MediaKindSpec`` is what a recipe
says about a kind, ``MediaKind`` what the processor needs to prepare its items, ``MediaBatch`` what reaches the
model, and ``model.MediaKindModule`` the encoder + connector that turn a batch into LLM tokens. Kinds are always
listed in the same order (the primary one first), so position ``k`` means the same kind everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, NamedTuple

import torch


class ItemSize(NamedTuple):
    """One item's valid input length (audio samples before padding, or cached encoder tokens) and LLM token count."""

    length: int
    tokens: int


@dataclass(frozen=True)
class MediaKind:
    """What the processor knows about a media kind: content parts of type ``name`` (and ``aliases``) and ``token``
    markers become ``tokens_per_item`` placeholder ids ``token_id``; ``transform`` fits a decoded item to the
    encoder; ``domain`` decodes media files. ``encoded``: items are the encoder's output already (a feature cache),
    so the model skips the encoder for this kind. ``sizing``: for kinds whose items differ in cost (short audio
    clips), the ``ItemSize`` of one raw item; None when every item costs ``tokens_per_item``."""

    name: str
    token: str
    token_id: int
    tokens_per_item: int
    transform: Callable[[Any], torch.Tensor] | None = None
    domain: Any = None
    aliases: tuple[str, ...] = ()
    encoded: bool = False
    sizing: Callable[[Any], ItemSize] | None = None

    def with_changes(self, **changes: Any) -> "MediaKind":
        return replace(self, **changes)


@dataclass
class MediaBatch:
    """Every item of one media kind in a batch, in the order their placeholder blocks appear (row by row).

    ``values`` is ``[items, ...]``: pixels ``[n, C, H, W]``, waveforms ``[n, samples]``, or, when ``encoded``, the
    encoder's output ``[n, tokens, dim]`` read from a feature cache. ``lengths`` and ``tokens`` (one entry per item)
    are set for kinds whose items differ in cost: the valid input length inside the padded values (the encoder may
    mask the rest), and how many of the connector's outputs the item's placeholder block holds (the first ones)."""

    values: torch.Tensor
    encoded: bool = False
    lengths: torch.Tensor | None = None
    tokens: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "MediaBatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return MediaBatch(move(self.values), self.encoded, move(self.lengths), move(self.tokens))

    def pin_memory(self) -> "MediaBatch":
        """Page-locked copies (the DataLoader calls this with ``pin_memory=True``), so ``to(cuda, non_blocking=True)``
        overlaps the copy with compute."""
        pin = lambda t: None if t is None else t.pin_memory()  # noqa: E731
        return MediaBatch(pin(self.values), self.encoded, pin(self.lengths), pin(self.tokens))


def sized_by_length(info: Any, connector: Any, audio_tokens: str) -> bool:
    """Whether clips of this kind cost tokens in proportion to their length (``model.audio_tokens: by_length``):
    only when the encoder's tokens are frames in time order and the connector (a ``ConnectorSpec``) keeps a prefix
    a prefix."""
    from connectors import keeps_prefix

    return audio_tokens == "by_length" and bool(getattr(info, "time_ordered", False)) and keeps_prefix(connector.name, connector.options)


def audio_sizing(info: Any, connector: Any) -> Callable[[Any], ItemSize]:
    """``ItemSize`` of a decoded clip (a 1-D waveform at the encoder's rate): its samples, up to the encoder's window,
    and the connector tokens that cover them."""
    window = int(info.input_size[0])

    def size(clip: Any) -> ItemSize:
        samples = min(int(clip.shape[-1]), window)
        return ItemSize(samples, int(connector.num_output_tokens(info.num_tokens_for_samples(samples))))

    return size


def frames_read(connector: Any, frames: int, full: int) -> int:
    """The encoder frames that the connector's first ``num_output_tokens(frames)`` outputs read: ``frames`` carried to
    the end of the last output's span (frame_stack's k frames, a Q-Former window), at most ``full``. Past a clip's end
    those are the encoder's output for the padding, which a feature cache must store for the last token to match."""
    tokens = connector.num_output_tokens(frames)
    while frames < full and connector.num_output_tokens(frames + 1) == tokens:
        frames += 1
    return frames


def cached_sizing(connector: Any) -> Callable[[Any], ItemSize]:
    """``ItemSize`` of cached encoder features ``[tokens, dim]`` stored trimmed to the clip's own frames."""
    return lambda features: ItemSize(int(features.shape[0]), int(connector.num_output_tokens(int(features.shape[0]))))
