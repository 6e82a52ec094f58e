"""Typed description of a multimodal model's parts; recipes embed it and checkpoints store it as JSON."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EncoderSpec(_Strict):
    """``name`` is a registry name (``tiny-vit``, ``timm:<arch>``, ``open_clip:<dir>``, ``hf:<dir>``); ``options``
    go to its builder (``weights``, ``layer``, ``keep_cls``, ``in_chans``, ...)."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)

    def model_post_init(self, __context: Any) -> None:
        from encoders import check_options

        check_options(self.name, self.options)  # an unknown option fails when the recipe is validated, not at build

    def is_referenced(self) -> bool:
        """True when the weights come from a local path, so a checkpoint may point at them instead of copying."""
        if self.options.get("weights"):
            return True
        _, sep, spec = self.name.partition(":")
        return bool(sep) and Path(spec).expanduser().exists()


class ConnectorSpec(_Strict):
    """``name`` is a connector registry name; ``in_dim``/``out_dim`` are inferred and must not be given."""

    name: str = "mlp"
    options: dict[str, Any] = Field(default_factory=dict)

    def model_post_init(self, __context: Any) -> None:
        given = {"in_dim", "out_dim"} & set(self.options)
        if given:
            raise ValueError(f"connector options {sorted(given)} are inferred (in_dim from the encoder, out_dim from the LLM); remove them")


class DomainSpec(_Strict):
    """How raw media files are decoded: ``generic``, ``medical``, ``remote_sensing`` or ``audio``, with that domain's
    typed options (e.g. ``window: lung`` for CT, ``bands``/``stats`` for multispectral tiles)."""

    name: str = "generic"
    options: dict[str, Any] = Field(default_factory=dict)

    def model_post_init(self, __context: Any) -> None:
        from .domains import validate_options

        validate_options(self.name, self.options)  # unknown domains or options fail when the recipe is validated


class LoraSpec(_Strict):
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    targets: list[str] | Literal["all-linear"] = "all-linear"


class LLMSpec(_Strict):
    """A causal LM in a local directory (never a hub id: mmdomain does not download)."""

    path: str
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    lora: LoraSpec | None = None


class MediaSpec(_Strict):
    """A further kind of media in the same conversations (e.g. heart sounds beside chest images): its own encoder,
    connector, decoding domain and placeholder token. In content parts it is ``{"type": name, name: data}``."""

    name: str
    token: str
    encoder: EncoderSpec
    connector: ConnectorSpec = Field(default_factory=ConnectorSpec)
    domain: DomainSpec = Field(default_factory=DomainSpec)


class ModelSpec(_Strict):
    encoder: EncoderSpec
    connector: ConnectorSpec = Field(default_factory=ConnectorSpec)
    llm: LLMSpec
    domain: DomainSpec = Field(default_factory=DomainSpec)
    media_token: str = "<image>"
    extra_media: list[MediaSpec] = Field(default_factory=list)
    max_length: int = 2048

    def model_post_init(self, __context: Any) -> None:
        tokens = [self.media_token] + [m.token for m in self.extra_media]
        names = [m.name for m in self.extra_media]
        if len(set(tokens)) != len(tokens) or len(set(names)) != len(names) or {"text", "media"} & set(names):
            raise ValueError(f"extra_media need distinct names (not text/media) and tokens distinct from media_token; got tokens {tokens}, names {names}")
