"""One media kind at run time: how its items are prepared for the model (MediaKind) and batched for it (MediaBatch).

A model takes one or more media kinds (a chest image, a heart sound): ``spec.MediaKindSpec`` is what a recipe
says about a kind, ``MediaKind`` what the processor needs to prepare its items, ``MediaBatch`` what reaches the
model, and ``model.MediaKindModule`` the encoder + connector that turn a batch into LLM tokens. Kinds are always
listed in the same order (the primary one first), so position ``k`` means the same kind everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class MediaKind:
    """What the processor knows about a media kind: content parts of type ``name`` (and ``aliases``) and ``token``
    markers become ``tokens_per_item`` placeholder ids ``token_id``; ``transform`` fits a decoded item to the
    encoder; ``domain`` decodes media files. ``encoded``: items are the encoder's output already (a feature cache),
    so the model skips the encoder for this kind."""

    name: str
    token: str
    token_id: int
    tokens_per_item: int
    transform: Callable[[Any], torch.Tensor] | None = None
    domain: Any = None
    aliases: tuple[str, ...] = ()
    encoded: bool = False

    def with_changes(self, **changes: Any) -> "MediaKind":
        return replace(self, **changes)


@dataclass
class MediaBatch:
    """Every item of one media kind in a batch, in the order their placeholder blocks appear (row by row).

    ``values`` is ``[items, ...]``: pixels ``[n, C, H, W]``, waveforms ``[n, samples]``, or, when ``encoded``, the
    encoder's output ``[n, tokens, dim]`` read from a feature cache."""

    values: torch.Tensor
    encoded: bool = False

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "MediaBatch":
        return MediaBatch(self.values.to(device, non_blocking=non_blocking), self.encoded)
