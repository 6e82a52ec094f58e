"""Typed description of a multimodal model's parts; recipes embed it and checkpoints store it as JSON."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer, model_validator

PRIMARY = "media"  # name of the first media kind in content parts (``image`` and the encoder's modality work too)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoraSpec(_Strict):
    """LoRA adapters (peft). On the LLM ``all-linear`` is peft's (every linear layer but the output head); on an
    encoder it is every linear and attention layer inside the blocks it runs; a list names layers by their ending
    (``qkv``, ``mlp.fc1``)."""

    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    targets: list[str] | Literal["all-linear"] = "all-linear"


class EncoderSpec(_Strict):
    """``name`` is a registry name (``tiny-vit``, ``timm:<arch>``, ``open_clip:<dir>``, ``hf:<dir>``); ``options``
    go to its builder (``weights``, ``layer``, ``keep_cls``, ``in_chans``, ...); ``lora`` puts LoRA adapters on its
    blocks (they train with ``trainable.encoder: lora``)."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)
    lora: LoraSpec | None = None

    @model_serializer(mode="wrap")
    def _without_absent_lora(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Without adapters the encoder is written as before, so the feature-cache keys, saved recipes and checkpoint
        # specs of runs made before encoder LoRA existed still compare equal.
        data = handler(self)
        if self.lora is None:
            data.pop("lora", None)
        return data

    def model_post_init(self, __context: Any) -> None:
        from encoders import check_options

        check_options(self.name, self.options)  # an unknown option fails when the recipe is validated, not at build

    def fused_parts(self) -> list["EncoderSpec"]:
        """The encoders a ``fuse`` encoder joins (empty for any other encoder)."""
        if self.name != "fuse":
            return []
        return [EncoderSpec.model_validate(part) for part in self.options.get("encoders") or []]

    def is_referenced(self) -> bool:
        """True when the weights come from a local path, so a checkpoint may point at them instead of copying."""
        if self.name == "fuse":  # every part must be findable again, or the whole fused tower travels in the checkpoint
            parts = self.fused_parts()
            return bool(parts) and all(part.is_referenced() for part in parts)
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


class LLMSpec(_Strict):
    """A causal LM in a local directory (never a hub id: mmdomain does not download)."""

    path: str
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    lora: LoraSpec | None = None


class MediaKindSpec(_Strict):
    """A kind of media the model takes (chest images, heart sounds, ...): its encoder, connector, decoding domain and
    placeholder token. The first kind is written at the top of ``model`` (``encoder``, ``connector``, ``domain``,
    ``media_token``); further kinds go in ``model.extra_kinds``. In content parts a kind is ``{"type": name, name: data}``."""

    name: str
    token: str
    encoder: EncoderSpec
    connector: ConnectorSpec = Field(default_factory=ConnectorSpec)
    domain: DomainSpec = Field(default_factory=DomainSpec)


# Fields added after checkpoints were first written, with the value that reproduces how those older runs behaved
# (applied to a stored spec that lacks them, so loading or resuming an older run changes nothing).
LEGACY_DEFAULTS: dict[str, Any] = {"audio_tokens": "padded"}


def with_legacy_defaults(stored: dict[str, Any]) -> dict[str, Any]:
    """A spec dict read from a checkpoint or run, completed with ``LEGACY_DEFAULTS`` where it predates a field."""
    return {**LEGACY_DEFAULTS, **stored}


class ModelSpec(_Strict):
    encoder: EncoderSpec
    connector: ConnectorSpec = Field(default_factory=ConnectorSpec)
    llm: LLMSpec
    domain: DomainSpec = Field(default_factory=DomainSpec)
    # <image> for every domain, as before: shards and runs made without naming a marker keep working. An audio recipe
    # may name its own (the shipped one says <audio>).
    media_token: str = Field("<image>", description="the primary kind's marker in text")
    extra_kinds: list[MediaKindSpec] = Field(default_factory=list)
    max_length: int = 2048
    audio_tokens: Literal["by_length", "padded"] = Field(
        "by_length", description="by_length: a clip costs LLM tokens in proportion to its duration (for encoders whose tokens are "
        "frames in time order and connectors that keep a prefix: linear, mlp, frame_stack); padded: every clip costs the "
        "full window's tokens, as runs made before this option")

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "extra_media" in data:
            raise ValueError("model.extra_media is now model.extra_kinds (same fields: name, token, encoder, connector, domain)")
        return data

    def model_post_init(self, __context: Any) -> None:
        tokens = [k.token for k in self.kinds()]
        names = [k.name for k in self.extra_kinds]
        if len(set(tokens)) != len(tokens) or len(set(names)) != len(names) or {"text", PRIMARY} & set(names):
            raise ValueError(f"extra_kinds need distinct names (not text/{PRIMARY}) and tokens distinct from media_token; got tokens {tokens}, names {names}")

    def kinds(self) -> list[MediaKindSpec]:
        """Every media kind in splice order: the primary one (named ``media``) first, then ``extra_kinds``."""
        primary = MediaKindSpec(name=PRIMARY, token=self.media_token, encoder=self.encoder, connector=self.connector, domain=self.domain)
        return [primary, *self.extra_kinds]
