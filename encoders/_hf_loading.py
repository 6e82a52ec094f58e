"""Load a transformers model from a local directory into a config that deliberately has fewer layers."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def load_pruned(model_class: Any, path: Path, config: Any) -> Any:
    """``model_class.from_pretrained`` with local files only; the checkpoint's pruned layers would each be reported
    as "unexpected" at warning level, so transformers is quiet for this one call."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        return model_class.from_pretrained(str(path), config=config, local_files_only=True)
    finally:
        transformers.logging.set_verbosity(verbosity)
