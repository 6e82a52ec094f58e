"""Load a transformers model from a local directory into a config that deliberately has fewer layers, and refuse
weights that would leave part of it random."""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from ._checkpoint import describe_key_mismatch, diagnose_weights
from .errors import UnknownEncoderError, WeightsFileError, WeightsMismatchError


def known_model_type(model_type: str, source: str, directory_form: str) -> str:
    """``model_type`` if transformers knows it; otherwise the error, with near names (the spec may also be a
    mistyped local directory)."""
    from transformers import CONFIG_MAPPING

    if model_type in CONFIG_MAPPING:
        return model_type
    near = difflib.get_close_matches(model_type, list(CONFIG_MAPPING.keys()), n=3)
    hint = f" (did you mean {', '.join(repr(n) for n in near)}?)" if near else ""
    raise UnknownEncoderError(f"{source}: {model_type!r} is neither a local directory nor a transformers model type{hint}. "
                              f"For a local model give its directory ({directory_form})")


def load_pruned(model_class: Any, path: Path, config: Any, needed_prefix: str = "") -> Any:
    """``model_class.from_pretrained`` with local files only, checked: every weight the model needs must come from
    the directory. ``needed_prefix`` narrows "needs" to the part that is kept (``encoder.`` of a Whisper model whose
    decoder is dropped, ``audio_model.`` of a CLAP model whose text tower is dropped).

    Weights in the directory that the model has no place for are fine: the pruned later layers, a text tower, a
    decoder. transformers reports each of them at warning level, so it is quiet for this one call, and the missing
    and reshaped weights it would report next to them are checked here instead.
    """
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        # ignore_mismatched_sizes: a weight of another shape is then reported (below, by name) instead of raising an
        # error that points at the load report this call has silenced.
        model, info = model_class.from_pretrained(str(path), config=config, local_files_only=True,
                                                  output_loading_info=True, ignore_mismatched_sizes=True)
    except Exception as exc:  # a broken weights file surfaces as any of half a dozen types; name the file if it is one
        problem = diagnose_weights(path)
        if problem is None:
            raise
        raise WeightsFileError(f"model directory {str(path)!r}: {problem}") from exc
    finally:
        transformers.logging.set_verbosity(verbosity)

    missing = [k for k in info.get("missing_keys", ()) if k.startswith(needed_prefix)]
    # transformers 5 reports (name, shape in the file, shape in the model); 4.x the names alone.
    entries = [(m, "?", "?") if isinstance(m, str) else tuple(m) for m in info.get("mismatched_keys", ())]
    reshaped = [m for m in entries if m[0].startswith(needed_prefix)]
    if missing or reshaped:
        model_type = getattr(config, "model_type", "?")
        raise WeightsMismatchError(
            f"the weights in {str(path)!r} do not fit its config ({model_class.__name__}, model type {model_type!r}): "
            f"{describe_key_mismatch(missing, reshaped)}; those would be random. The directory likely holds a checkpoint "
            "of another architecture, or a config.json that does not match its weights: take config.json and the "
            "weights from the same download"
        )
    return model
