"""Pluggable encoders (timm, open_clip, transformers, tiny test models) behind one registry; never imports mmdomain.

    >>> from encoders import create_encoder, image_transform
    >>> enc = create_encoder("timm:vit_small_patch16_224", weights="/models/vit_s16.safetensors", layer=-2)
    >>> tokens = enc(image_transform(enc.info)(pil_image)[None])   # [1, enc.info.num_tokens(), enc.info.embed_dim]
"""
from __future__ import annotations

from typing import Any, Callable

from ._checkpoint import diagnose_weights
from ._registry import REGISTRY, lazy
from .base import Encoder, EncoderInfo, encode_slices
from .errors import EncoderError
from .transforms import AudioTransform, ImageTransform, VolumeTransform, audio_transform, image_transform, volume_transform

__all__ = ["AudioTransform", "Encoder", "EncoderError", "EncoderInfo", "ImageTransform", "VolumeTransform", "audio_transform", "check_encoder",
           "check_options", "create_encoder", "describe_encoders", "diagnose_weights", "encode_slices", "image_transform", "list_encoders",
           "register_encoder", "volume_transform"]


def create_encoder(name: str, **options: Any) -> Encoder:
    """Build an encoder by registry name: an exact name (``tiny-vit``) or ``family:spec`` (``timm:<arch>``,
    ``open_clip:<name or dir>``, ``hf:<dir or model type>``). Weights come only from local paths; a family encoder
    without weights is refused unless ``random_init=True`` asks for a deliberately random tower.
    Every failure caused by the arguments raises an ``EncoderError`` (see ``encoders.errors``)."""
    return REGISTRY.create(name, **options)


def check_options(name: str, options: dict[str, Any]) -> None:
    """Raise ``UnknownOptionError`` (an ``EncoderError``) naming any option ``name``'s builder does not take, with a
    did-you-mean; builds nothing and imports no model library, so a recipe can be checked before it runs."""
    REGISTRY.check_options(name, options)


def check_encoder(name: str, options: dict[str, Any]) -> None:
    """Raise the ``EncoderError`` that ``create_encoder(name, **options)`` would raise for a wrong name, an unknown
    option, a local directory or weights file that does not exist, or a family tower that would start from random
    weights without ``random_init=True``; loads no weights, so a recipe can be checked before it runs."""
    REGISTRY.check(name, options)


def list_encoders() -> list[str]:
    return REGISTRY.names()


def describe_encoders() -> dict[str, str]:
    """Registered names with their one-line descriptions."""
    return REGISTRY.describe()


def register_encoder(name: str, builder: Callable[..., Any], *, family: bool = False, description: str = "",
                     locate: Callable[..., Any] | None = None) -> None:
    """Add an encoder builder. ``family=True`` makes ``name:<spec>`` call ``builder(spec, **options)``. ``locate``
    (optional, same arguments) raises what the builder would for a missing file or spec, without building."""
    REGISTRY.register(name, builder, family=family, description=description, locate=locate)


register_encoder("timm", lazy("encoders.timm_encoder", "build_timm_encoder"), family=True, locate=lazy("encoders.timm_encoder", "locate_timm_weights"),
                 description="any timm architecture; weights= a local file (or random_init=True)")
register_encoder("open_clip", lazy("encoders.open_clip_encoder", "build_open_clip_encoder"), family=True,
                 locate=lazy("encoders.open_clip_encoder", "locate_open_clip"),
                 description="an open_clip visual tower from a local open_clip_config.json directory (or a model name with weights= or random_init=True)")
register_encoder("hf", lazy("encoders.hf_vision", "build_hf_vision_encoder"), family=True, locate=lazy("encoders.hf_vision", "locate_hf_vision"),
                 description="a transformers vision tower (CLIP, SigLIP, DINOv2, AutoModel) from a local dir (or a model type with random_init=True)")
register_encoder("hf_audio", lazy("encoders.hf_audio", "build_hf_audio_encoder"), family=True, locate=lazy("encoders.hf_audio", "locate_hf_audio"),
                 description="a transformers audio encoder (Whisper encoder, wav2vec2 / HuBERT, CLAP) from a local dir (or a model type with random_init=True)")
register_encoder("tiny-vit", lazy("encoders.testing", "build_tiny_vit"),
                 description="tiny random-init ViT with fixed sin-cos positions, for tests and the CPU demo")
register_encoder("tiny-audio", lazy("encoders.testing", "build_tiny_audio"),
                 description="tiny random-init audio encoder (log-mel, conv, transformer; unit-scale init), for tests and CPU tries")
register_encoder("fuse", lazy("encoders.fused", "build_fused"), locate=lazy("encoders.fused", "locate_fused"),
                 description="several encoders for one media kind: encoders: [{name, options}, ...], mode: channels (Eagle) or sequence")
register_encoder("local", lazy("encoders.local", "build_local_encoder"), family=True, locate=lazy("encoders.local", "locate_local"),
                 description="an encoder folder written by save_local / `mmdomain export --format encoder` (architecture, EncoderInfo, weights)")
