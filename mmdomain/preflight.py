"""What a recipe needs before anything loads or is written: local model files, init_from and training shards.

`mmdomain validate` runs these checks and `mmdomain run` runs them before it creates the run directory, so a wrong
path costs a second and leaves nothing behind, instead of failing after the encoder has loaded.
"""
from __future__ import annotations

from pathlib import Path

from connectors import check_connector
from encoders import check_encoder

from .llm import check_local_dir, load_tokenizer
from .recipe import Recipe
from .spec import ModelSpec


def check_models(spec: ModelSpec) -> None:
    """Every encoder's name, options and local files (as ``create_encoder`` would refuse them), every connector's name
    and option names, the LLM directory, and a tokenizer that reproduces text. Reads configs, headers and the
    tokenizer; loads no weights."""
    for kind in spec.kinds():
        check_encoder(kind.encoder.name, dict(kind.encoder.options))  # its errors name the encoder, e.g. hf:/models/x
        check_connector(kind.connector.name, dict(kind.connector.options))
    load_tokenizer(check_local_dir(spec.llm.path, "model.llm.path"))


def input_problems(recipe: Recipe) -> list[str]:
    """What a run of ``recipe`` would stop on before its first step, besides the models: an ``init_from`` without a
    complete checkpoint (when the run starts afresh), or training shards that do not exist. One line each. An
    ``init_from`` that exists but was made with other parts or base models raises (CheckpointError): that is no
    step yet to come but a wrong recipe."""
    from .builder import check_handoff
    from .checkpoint import latest_checkpoint, resolve_checkpoint
    from .data import expand_shards

    problems = []
    output_dir = Path(recipe.output_dir)
    resuming = recipe.resume is True or (recipe.resume == "auto" and output_dir.is_dir() and latest_checkpoint(output_dir) is not None)
    if recipe.init_from and not resuming:
        try:
            resolve_checkpoint(recipe.init_from)
        except Exception as exc:  # noqa: BLE001 - reported as a line, the run itself raises it
            problems.append(f"init_from: {exc} (run the previous stage first)")
        else:
            check_handoff(recipe.model, recipe.init_from)
    if not recipe.data.feature_cache:
        try:
            expand_shards(recipe.data.train)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"data.train: {exc}")
    elif not Path(recipe.data.feature_cache).is_dir():
        problems.append(f"data.feature_cache: {recipe.data.feature_cache!r} does not exist (make it with `mmdomain cache-features`)")
    return problems
