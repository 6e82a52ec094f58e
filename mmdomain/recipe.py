"""Recipes: the typed schema of one training stage, YAML loading with duplicate-key checks, dotted overrides.

A recipe names every component by registry name (never an importable Python path) and says what trains:

    stage: align                 # align | instruct | (any label; it only names the run)
    model: {encoder: ..., connector: ..., llm: ...}     # mmdomain.spec.ModelSpec
    init_from: runs/align        # previous stage's run directory or checkpoint (optional)
    trainable: {encoder: false | true | lora | {last_blocks: k, lora: true, norms: true}, connector: true,
                llm: false | lora | full, params: [globs]}
    lr: {connector: 1.0e-3, encoder: ..., llm: ...}      # per-module learning rates (default optim.lr)
    data: {train: "shards/train-*.tar", eval: ..., ...}
    optim: {lr, warmup_steps, max_steps | epochs, batch_size, grad_accum, clip_grad_norm, precision, ...}
    eval: {every_steps, max_samples, ...}
    seed: 0
    output_dir: runs/align

Override any field from the command line: ``mmdomain run RECIPE optim.max_steps=50 model.llm.path=/models/qwen``.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import MmdomainError
from .objective_spec import DPOSpec, GRPOSpec
from .spec import ModelSpec


class RecipeError(MmdomainError, ValueError):
    """A recipe that cannot be used; the message names the file, the field and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EncoderParts(_Strict):
    """The parts of the encoder that train, any combination; the rest stays frozen. Their LR is ``lr.encoder``."""

    last_blocks: int | None = Field(None, ge=1, description="the last k blocks the encoder runs (the units `layer` counts), "
                                    "plus the norm it applies after them, if any")
    lora: bool = Field(False, description="the LoRA adapters of model.encoder.lora (the adapters' shape lives there, as the "
                       "LLM's does in model.llm.lora: a checkpoint rebuilds the model from `model` alone)")
    norms: bool = Field(False, description="every LayerNorm / GroupNorm / RMSNorm of the encoder (BatchNorm stays frozen)")

    @model_validator(mode="before")
    @classmethod
    def _lora_is_a_switch(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("lora"), dict):
            raise ValueError(f"lora here is true or false; the adapters' shape goes in model.encoder.lora: {data['lora']} (a "
                             "checkpoint rebuilds the model from `model`), and trainable.encoder: {lora: true} trains them")
        return data

    @model_validator(mode="after")
    def _trains_something(self) -> "EncoderParts":
        if not (self.last_blocks or self.lora or self.norms):
            raise ValueError("trains no part of the encoder: give last_blocks: k, lora: true or norms: true, or write "
                             "trainable.encoder: false")
        return self


def _part_error(err: Any) -> str:
    where = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        near = difflib.get_close_matches(where, list(EncoderParts.model_fields), n=1, cutoff=0.6)
        return f"{where}: unknown part" + (f"; did you mean {near[0]!r}?" if near else f" (parts: {', '.join(EncoderParts.model_fields)})")
    message = err["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


class Trainable(_Strict):
    """What trains. Switches per module, plus extra parameter-name globs (e.g. ``llm.*lm_head*``). The encoder trains
    whole (``true``), not at all (``false``), or in parts (``{last_blocks: 2, norms: true}``; ``lora`` is short for
    ``{lora: true}``); a switch covers the encoder of every media kind."""

    encoder: bool | EncoderParts = False
    connector: bool = True
    llm: Literal[False, "lora", "full"] = False
    params: list[str] = Field(default_factory=list)

    @field_validator("encoder", mode="before")
    @classmethod
    def _encoder_parts(cls, value: Any) -> Any:
        # Validated here, so a mistake gets one line naming the part (pydantic would report a failure per union branch).
        value = {"lora": True} if value == "lora" else value
        if isinstance(value, dict):
            try:
                return EncoderParts.model_validate(value)
            except ValidationError as exc:
                raise ValueError("; ".join(_part_error(err) for err in exc.errors())) from None
        if isinstance(value, str):
            raise ValueError(f"is true, false, lora or parts such as {{last_blocks: 2, norms: true}}; got {value!r}")
        return value

    @property
    def encoder_trains(self) -> bool:
        """Whether any encoder weight trains through the switch (``params`` globs aside)."""
        return self.encoder is not False


# AdamW moves every weight by about ``lr`` per step, so an LR above 1 is always a typo (1e9 once "trained" to
# weights of 5e9 with a zero gradient and no warning).
_LR = {"gt": 0, "le": 1.0}


class ModuleLR(_Strict):
    encoder: float | None = Field(None, **_LR)
    connector: float | None = Field(None, **_LR)
    llm: float | None = Field(None, **_LR)


class Data(_Strict):
    train: str | list[str]
    eval: str | list[str] | None = None
    shuffle_buffer: int = Field(1000, ge=0, description="samples shuffled together in windows of this size, after a seeded "
                                "shard shuffle; 0 keeps each shard's order")
    num_workers: int = Field(0, ge=0)
    max_train_samples: int | None = Field(None, ge=1)
    media_keys: list[str] | None = Field(
        None, description="member suffixes holding each sample's media in order, e.g. [jpg] for img2dataset shards; "
                          "default: the numbered members (0.png, 1.dcm, ...) that make-shards writes")
    caption_key: str | None = Field(None, description="for plain image-text shards: the member holding the caption, e.g. txt")
    caption_prompt: str = "Describe the image."
    pack_length: int | None = Field(None, ge=8, description="pack each batch's samples into rows of this many tokens "
                                    "(block-diagonal attention, positions restart per sample) instead of padding")
    feature_cache: str | None = Field(None, description="train (and evaluate) from `mmdomain cache-features` output instead of decoding media")
    decode_error_budget: int = Field(10, ge=0, description="samples allowed to fail (each counted once per run, whatever the "
                                     "epoch or worker: undecodable, duplicate, missing from a truncated shard) before the run stops")


class Optim(_Strict):
    optimizer: Literal["adamw"] = "adamw"
    lr: float = Field(1e-3, **_LR)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    epochs: float | None = Field(None, gt=0)
    clip_grad_norm: float | None = Field(1.0, gt=0)
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="compute precision under autocast; fp16 adds a "
                                                      "dynamic loss scale (torch.amp.GradScaler) that skips overflowing steps")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward (LLM, and the encoder when it "
                                         "trains): less memory, about a third more compute")
    compile: bool = Field(False, description="torch.compile the encoder, connector and LLM decoder for training steps; "
                          "the first step (and any that compiles a new graph) is logged as a compile event, not in samples/s")

    @model_validator(mode="after")
    def _length(self) -> "Optim":
        if (self.max_steps is None) == (self.epochs is None):
            given = "both" if self.max_steps is not None else "neither"
            raise ValueError(f"give exactly one of optim.max_steps and optim.epochs ({given} given); on the command line "
                             "optim.max_steps=N or optim.epochs=E replaces the other, or set one to null")
        return self


class Eval(_Strict):
    every_steps: int = Field(0, ge=0, description="0: evaluate only at the end")
    max_samples: int | None = Field(None, ge=1)
    batch_size: int = Field(16, ge=1)
    max_new_tokens: int = Field(32, ge=1)
    choice_score: Literal["mean", "sum"] = Field("mean", description="closed questions: score each choice by its mean token "
                                                 "log-likelihood (fair to choices of different lengths) or the sum")


class Card(_Strict):
    """What the model card of an export declares (``mmdomain export``); nothing here changes training."""

    data_license: str | None = Field(None, description="licence of the training data, e.g. CC-BY-4.0 or 'PhysioNet credentialed'")
    intended_use: str | None = Field(None, description="what the model is for, and who should use it")
    out_of_scope: str | None = Field(None, description="uses it is not for (a medical model is always marked not for clinical use)")
    eval_regime: Literal["zero-shot", "fine-tuned"] | None = Field(
        None, description="how the evaluation data relates to training: zero-shot (no sample of that benchmark trained on) or "
        "fine-tuned (trained on that benchmark's train split)")
    llm_license: str | None = Field(None, description="the base LLM's licence when its folder does not say")
    encoder_license: str | None = Field(None, description="the base encoder's licence when its folder does not say")
    notes: str | None = None


class Distributed(_Strict):
    """How a run started by torchrun (or accelerate launch) spreads over its processes; one process ignores it."""

    strategy: Literal["auto", "ddp", "fsdp"] = Field("auto", description="ddp: every GPU holds the whole model, gradients "
                                                     "are averaged (small trained parts: connector, LoRA); fsdp: weights, "
                                                     "gradients and optimizer state sharded (FSDP2); auto: fsdp when "
                                                     "trainable.llm is full, else ddp")


class Recipe(_Strict):
    stage: str = "align"
    model: ModelSpec
    init_from: str | None = None
    trainable: Trainable = Field(default_factory=Trainable)
    lr: ModuleLR = Field(default_factory=ModuleLR)
    data: Data
    optim: Optim
    eval: Eval = Field(default_factory=Eval)
    distributed: Distributed = Field(default_factory=Distributed)
    seed: int = 0
    output_dir: str
    overwrite: bool = False
    threads: int | None = Field(None, ge=1, description="torch CPU threads; None keeps torch's default")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = Field(10, ge=1)
    save_every: int = Field(0, ge=0, description="also save a checkpoint every this many steps (0: only at the end)")
    keep_last: int = Field(2, ge=1, description="complete checkpoints kept in output_dir/checkpoints (the newest is never deleted)")
    resume: bool | Literal["auto"] = Field(False, description="true: continue from the newest complete checkpoint in output_dir "
                                           "(`mmdomain run --resume`); auto: continue if there is one, else start")
    log_sample_keys: bool = Field(False, description="write samples.jsonl: the sample keys each step trained on")
    card: Card | None = Field(None, description="declarations for the model card of `mmdomain export` (licences, intended use, eval regime)")
    objective: Literal["sft", "dpo", "grpo"] = Field("sft", description="sft: next-token loss on the answers; dpo: preference "
                                                     "pairs against the frozen start model; grpo: sampled answers scored by a verifier")
    dpo: DPOSpec | None = Field(None, description="objective: dpo settings (defaults when left out)")
    grpo: GRPOSpec | None = Field(None, description="objective: grpo settings (defaults when left out)")

    @model_validator(mode="after")
    def _objective_blocks(self) -> "Recipe":
        for name in ("dpo", "grpo"):
            if getattr(self, name) is not None and self.objective != name:
                raise ValueError(f"a {name}: block is given but objective is {self.objective!r}; set objective: {name}, or remove the block")
        if self.objective in ("dpo", "grpo"):
            if getattr(self, self.objective) is None:
                setattr(self, self.objective, DPOSpec() if self.objective == "dpo" else GRPOSpec())
            if self.data.pack_length is not None:
                raise ValueError(f"data.pack_length packs SFT samples; objective {self.objective} compares whole answers per row: "
                                 "remove data.pack_length")
        return self

    @model_validator(mode="after")
    def _lora_consistent(self) -> "Recipe":
        if self.trainable.llm == "lora" and self.model.llm.lora is None:
            raise ValueError("trainable.llm is 'lora' but model.llm.lora is not set; add model.llm.lora: {r: 16, alpha: 32}")
        if self.trainable.llm == "full" and self.model.llm.dtype != "float32":
            raise ValueError(f"trainable.llm is 'full' but model.llm.dtype is {self.model.llm.dtype}: training bf16/fp16 weights "
                             "directly loses updates; keep dtype float32 and set optim.precision: bf16 for bf16 compute")
        if self.model.llm.lora is not None and self.trainable.llm != "lora":
            raise ValueError(f"model.llm.lora is set but trainable.llm is {self.trainable.llm!r}; set trainable.llm: lora")
        encoder = self.trainable.encoder
        wants_lora = isinstance(encoder, EncoderParts) and encoder.lora
        with_lora = [where for where, kind in zip(["model.encoder", *(f"model.extra_kinds[{i}].encoder" for i in range(len(self.model.extra_kinds)))],
                                                  self.model.kinds()) if kind.encoder.lora is not None]
        if wants_lora and not with_lora:
            raise ValueError("trainable.encoder trains LoRA adapters but model.encoder.lora is not set; add model.encoder.lora: {r: 8, alpha: 16}")
        if with_lora and not wants_lora:
            now = "true (the whole encoder)" if encoder is True else repr(encoder if encoder is False else encoder.model_dump(exclude_defaults=True))
            raise ValueError(f"{with_lora[0]}.lora is set but trainable.encoder is {now}; set trainable.encoder: lora (or "
                             "{lora: true, ...} with other parts), or remove the adapters")
        return self


# -- YAML ---------------------------------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe loader that refuses duplicate mapping keys (plain YAML silently keeps the last one)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise RecipeError(f"{key_node.start_mark.name}: duplicate key {key!r} at line {line} (first at line {seen[key]}); keep one")
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise RecipeError(f"{str(path)!r} is a folder without recipe.yaml: give a recipe file, or a run directory (one that holds "
                          "recipe.yaml)")
    if not path.is_file():
        raise RecipeError(f"recipe {str(path)!r} does not exist (see `mmdomain ls recipes`)")
    with path.open() as f:
        try:
            data = yaml.load(f, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError as exc:
            raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping, got {type(data).__name__}")
    return data


# Fields of which a recipe gives exactly one: an override that sets one clears the others the recipe set, so
# `optim.max_steps=200` works on a recipe written with `optim.epochs` (unless the same command sets both).
EXCLUSIVE_FIELDS = (("optim", ("max_steps", "epochs")),)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides; the value is parsed as a YAML scalar/flow value (``1e-3``, ``[a, b]``, ``null``)."""
    overridden = {item.partition("=")[0] for item in overrides}
    given = {key for key, _, raw in (item.partition("=") for item in overrides) if raw.strip() not in ("", "null", "~", "Null", "NULL")}
    for parent, names in EXCLUSIVE_FIELDS:
        for name in names:
            key = f"{parent}.{name}"
            if key in given and isinstance(data.get(parent), dict):
                for other in names:
                    if other != name and f"{parent}.{other}" not in overridden:
                        data[parent].pop(other, None)
    for item in overrides:
        dotted, sep, raw = item.partition("=")
        if not sep or not dotted:
            raise RecipeError(f"override {item!r} is not key=value (e.g. optim.max_steps=100)")
        try:
            value = yaml.load(raw, Loader=_UniqueKeyLoader) if raw else ""  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError as exc:
            reason = str(exc).splitlines()[0]
            raise RecipeError(f"override {item!r}: the value is not plain YAML ({reason}); quote it if it is text") from None
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            # A switch that is off opens into its parts: trainable.encoder.last_blocks=2 on `encoder: false`.
            if child is None or child is False:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise RecipeError(f"override {item!r}: {part!r} is not a mapping")
            node = child
        node[parts[-1]] = value
    return data


def _field_names(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names valid at ``loc`` (the parent of an unknown key), for did-you-mean hints."""
    current: Any = model
    for part in loc:
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        annotation = fields[part].annotation
        candidates = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not candidates:
            return []
        current = candidates[0]
    return list(getattr(current, "model_fields", {}))


def _explain(exc: ValidationError, source: str) -> RecipeError:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        where = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            near = difflib.get_close_matches(str(loc[-1]), _field_names(Recipe, loc[:-1]), n=1, cutoff=0.6)
            hint = f"; did you mean {'.'.join(map(str, loc[:-1] + (near[0],)))!r}?" if near else ""
            lines.append(f"  {where}: unknown key{hint}")
        elif err["type"] == "missing":
            lines.append(f"  {where}: required field is missing")
        else:
            lines.append(f"  {where}: {err['msg']} (got {err.get('input')!r})")
    return RecipeError(f"{source}: invalid recipe\n" + "\n".join(lines))


def validate_recipe(data: dict[str, Any], source: str = "<recipe>") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise _explain(exc, source) from None


def with_new_fields(saved: dict[str, Any]) -> dict[str, Any]:
    """A recipe dict written by an earlier mmdomain, with the fields added since at their defaults (which keep the
    old behaviour), so resuming its run does not read a newly added field as a change. Returned as given if it no
    longer validates (the resume check then names what differs)."""
    try:
        return Recipe.model_validate(saved).model_dump(mode="json")
    except ValidationError:
        return saved


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe. Nothing is downloaded or built."""
    data = apply_overrides(read_yaml(path), list(overrides))
    return validate_recipe(data, str(path))


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
