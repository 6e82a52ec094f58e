"""What every encoder is: a module mapping media to tokens [B, N, D], and the metadata that travels with it."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from .errors import EncoderOptionError, RandomInitError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class EncoderInfo:
    """Facts about an encoder from which preprocessing and token counts are derived.

    ``input_size`` is (H, W) for images and (num_samples,) for audio; ``patch_size`` is how much input one output
    token covers along each of those axes (the patch for a ViT, the total stride for a CNN stage).
    ``num_prefix_tokens`` counts the CLS/register tokens present in the *output* (0 when they are dropped).
    """

    modality: str
    embed_dim: int
    input_size: tuple[int, ...]
    patch_size: tuple[int, ...]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str
    license: str
    layer: int
    num_prefix_tokens: int = 0
    sample_rate: int | None = None
    exact_tokens: int | None = None
    """Token count at ``input_size`` when it is not ``grid + prefix`` (audio conv stacks lose edge frames)."""
    extra: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    """The local file or directory the weights were loaded from; None for a random-init encoder."""
    time_ordered: bool = False
    """Audio: the output tokens are evenly spaced frames in time order (Whisper, wav2vec2), so the first
    ``num_tokens_for_samples(n)`` of them cover the first ``n`` input samples; False where tokens mix time with
    frequency (CLAP's patch grid)."""
    layers: tuple[int, ...] | None = None
    """With multi-layer fusion (the ``layers`` option): the hidden-state indices whose features are concatenated on
    the channel axis, in that order (``embed_dim`` is then their sum); ``layer`` is the deepest of them."""

    def grid(self, input_size: tuple[int, ...] | None = None) -> tuple[int, ...]:
        size = tuple(input_size) if input_size is not None else self.input_size
        if len(size) != len(self.patch_size):
            raise ValueError(f"input size {size} has {len(size)} axes; this {self.modality} encoder expects {len(self.patch_size)}")
        return tuple(s // p for s, p in zip(size, self.patch_size))

    def num_tokens(self, input_size: tuple[int, ...] | None = None) -> int:
        """Tokens the encoder outputs for an input of ``input_size`` (its own input size by default)."""
        if self.exact_tokens is not None:
            if input_size is not None and tuple(input_size) != tuple(self.input_size):
                raise ValueError(f"{self.source} takes fixed-length input {self.input_size}; inputs are padded or cropped to it")
            return self.exact_tokens
        return math.prod(self.grid(input_size)) + self.num_prefix_tokens

    def num_tokens_for_samples(self, samples: int) -> int:
        """Output tokens that cover the first ``samples`` input samples (at least one, at most the full count): what
        a clip shorter than ``input_size`` really needs. Only for ``time_ordered`` encoders."""
        if not self.time_ordered:
            raise ValueError(f"{self.source} does not output tokens in time order; its clips always cost {self.num_tokens()} tokens")
        full = self.num_tokens()
        return max(1, min(full, math.ceil(full * samples / self.input_size[0])))

    @property
    def tokens_per_second(self) -> float | None:
        """For audio encoders: output tokens per second of input."""
        if self.sample_rate is None:
            return None
        return self.num_tokens() / (self.input_size[0] / self.sample_rate)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@runtime_checkable
class Encoder(Protocol):
    """An ``nn.Module`` with ``info`` whose ``forward(x)`` returns ``[B, info.num_tokens(), info.embed_dim]``.

    Optional, for training part of the encoder (the last k blocks, LoRA on its blocks): ``layer_blocks()``, the
    blocks ``forward`` runs, input to output (the units ``layer`` counts), and ``output_norm()``, the norm applied
    after the last of them, or None when ``forward`` applies none (a ``layer`` before the last, or a tower whose
    final norm only pools). Every encoder in this package has both.
    """

    info: EncoderInfo

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


def encode_slices(encoder: Any, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Run an encoder on a batch: ``[B, ...]`` -> ``[B, N, D]``; a batch of volumes ``[B, S, C, H, W]`` (one more
    axis than an image batch) goes through the 2-D encoder as ``B * S`` slices and comes back ``[B, S, N, D]``.
    ``lengths`` (each clip's valid samples) reach an encoder that says ``takes_lengths``; others never see them."""
    if lengths is not None and getattr(encoder, "takes_lengths", False):
        return encoder(x, lengths=lengths)
    if x.ndim == 5:
        return encoder(x.flatten(0, 1)).unflatten(0, tuple(x.shape[:2]))
    return encoder(x)


def resolve_layer(layer: int, num_layers: int, source: str) -> tuple[int, bool]:
    """Turn a hidden-state index into a 0-based block index, and say whether it is the last block.

    ``layer`` follows the HF ``hidden_states`` convention that LLaVA's ``-2`` refers to: ``1..L`` is the output of
    block 1..L, ``-1`` the last block, ``-2`` the one before it. Index 0 (the raw patch embedding) is refused: no
    encoder's features are useful there, and timm cannot return it.
    """
    index = layer if layer >= 0 else num_layers + 1 + layer
    if not 1 <= index <= num_layers:
        raise EncoderOptionError(
            f"layer={layer} is out of range for {source}, which has {num_layers} layers: "
            f"use 1..{num_layers} or -1..-{num_layers} (-1 is the last, -2 the one before, as in LLaVA)"
        )
    return index - 1, index == num_layers


def resolve_layers(layer: int, layers: list[int] | None, num_layers: int, source: str) -> tuple[list[int], int]:
    """The 0-based blocks whose outputs an encoder returns, concatenated on the channel axis in this order, and the
    hidden-state index of the deepest (``EncoderInfo.layer``; the tower is built up to it).

    ``layers`` (multi-layer feature fusion, as LLaVA-OneVision and Eagle) lists hidden-state indices in the ``layer``
    convention; None means the one ``layer``. The final norm applies when the deepest block is the tower's last."""
    if layers is None:
        return [resolve_layer(layer, num_layers, source)[0]], layer
    if layer != -1:
        raise EncoderOptionError(f"{source}: give layer (one hidden state) or layers (several, concatenated), not both; got layer={layer}, layers={layers!r}")
    whole = isinstance(layers, (list, tuple)) and all(isinstance(one, int) and not isinstance(one, bool) for one in layers)
    if not whole or not layers:  # int() would read 1.5 as 1 and fail on "x" as a traceback
        raise EncoderOptionError(f"{source}: layers must be a list of hidden-state indices (whole numbers), e.g. [-1, -5]; got {layers!r}")
    blocks = [resolve_layer(one, num_layers, source)[0] for one in layers]
    if len(set(blocks)) != len(blocks):
        raise EncoderOptionError(f"{source}: layers {list(layers)} name the same layer twice (the tower has {num_layers}); list each once")
    return blocks, int(layers[blocks.index(max(blocks))])


def layers_refused(source: str, layers: Any) -> None:
    """For encoder families that offer one layer only: refuse ``layers`` naming what does offer it."""
    if layers is not None:
        raise EncoderOptionError(
            f"{source}: layers={layers!r} (multi-layer feature fusion) is offered by hf: vision towers and the tiny test encoders, "
            "not by this encoder family yet; use one layer (layer=-2), or an hf: tower for fused layers"
        )


def random_init_refused(source: str, reason: str, how_to_give_weights: str) -> RandomInitError:
    """The error for a family encoder that would silently start from random weights (a frozen random tower trains
    nothing useful, and nothing else would tell the user)."""
    return RandomInitError(
        f"{source} would start from random weights: {reason}. Give it weights: {how_to_give_weights}. "
        "For a deliberately random tower set the option random_init=True (in a recipe: `random_init: true`)"
    )


UNKNOWN_LICENSE = "unknown"


def declared_license(license: str | None, has_weights: bool) -> str:
    """The licence an EncoderInfo records: the user's word (the ``license`` option) or ``unknown``. Weights come from
    a user's file, and a library's default metadata describes its own release, not the file actually loaded."""
    if license:
        return license
    return UNKNOWN_LICENSE if has_weights else "n/a (random init)"


def check_random_init(source: str, random_init: bool, weights_given: bool) -> None:
    if random_init and weights_given:
        raise EncoderOptionError(f"{source}: random_init=True and weights were both given; drop one "
                                 "(random_init is only for a tower that has no weights)")


def fit_channels(values: tuple[float, ...], channels: int) -> tuple[float, ...]:
    """Stretch RGB normalisation statistics to ``channels`` entries (their mean fills any extra channel).

    Multispectral data should bring per-band statistics of its own; this keeps a widened RGB encoder usable.
    """
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if channels < len(values):
        return values[:channels] if channels > 1 else (sum(values) / len(values),)
    return values + (sum(values) / len(values),) * (channels - len(values))


def as_pair(value: int | tuple[int, ...] | list[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    value = tuple(int(v) for v in value)
    return value if len(value) == 2 else (value[-2], value[-1])
