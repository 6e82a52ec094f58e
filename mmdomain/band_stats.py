"""`mmdomain data stats`: per-band mean/std over a remote-sensing recipe's training shards, saved as JSON."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from .data import expand_shards
from .domains import build_domain
from .shard_index import ShardReader


def _members(shards: list[str], max_samples: int) -> Iterator[tuple[str, bytes]]:
    """Media members of the first ``max_samples`` samples, in shard order."""
    reader = ShardReader(shards, cache=2)
    seen = 0
    for shard in range(len(shards)):
        for sample in range(len(reader.index(shard))):
            if seen >= max_samples:
                return
            seen += 1
            for name, data in reader.read(shard, sample).items():
                if name != "json":
                    yield name, data


def write_band_stats(recipe_path: str, out: str, *, overrides: list[str] = (), max_samples: int = 2000) -> dict[str, Any]:
    """Statistics of the bands the recipe selects, over its ``data.train`` shards; write them to ``out``."""
    from .domains.remote_sensing import band_statistics
    from .recipe import RecipeError, load_recipe

    recipe = load_recipe(recipe_path, list(overrides))
    if recipe.model.domain.name != "remote_sensing":
        raise RecipeError(f"{recipe_path}: data stats is for model.domain remote_sensing, not {recipe.model.domain.name!r}")
    domain = build_domain("remote_sensing", recipe.model.domain.options, raw=True)  # raw bands, not standardised
    stats = band_statistics(domain, _members(expand_shards(recipe.data.train), max_samples))
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stats, indent=2) + "\n")
    return stats
