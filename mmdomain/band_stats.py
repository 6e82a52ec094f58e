"""Per-band statistics of a remote-sensing recipe's training shards: computed by `mmdomain data stats`, or on a run's
first use when the recipe's ``stats:`` file is missing; recorded with what they were computed from, so a stale file
is refused instead of standardising new data with old numbers."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

from .data import expand_shards
from .domains import build_domain
from .errors import MmdomainError
from .shard_index import ShardReader

log = logging.getLogger(__name__)

# The domain options that decide the numbers (which bands, in which units): stats made under others are for other bands.
STATS_OPTIONS = ("bands", "band_names", "nodata", "band_kinds", "speckle_filter", "sar_floor_db")


class BandStatsError(MmdomainError, ValueError):
    """A ``stats:`` file that no longer describes the training shards (or the band options); the message says how to renew it."""


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


def shard_fingerprint(shards: list[str]) -> list[list[Any]]:
    """Each shard's file name and size (as the feature cache and resume record shards): shards copied or moved
    elsewhere (a local disk on a cluster) still match, without folders or file times."""
    return [[Path(p).name, Path(p).stat().st_size] for p in shards]


def _band_options(options: dict[str, Any]) -> dict[str, Any]:
    return {k: options[k] for k in STATS_OPTIONS if options.get(k) is not None}


def compute_band_stats(options: dict[str, Any], train: str | list[str], max_samples: int = 2000) -> dict[str, Any]:
    """Statistics of the bands ``options`` select over the first ``max_samples`` samples of the ``train`` shards, with
    the shard fingerprint and band options they were computed under."""
    from .domains.remote_sensing import band_statistics

    domain = build_domain("remote_sensing", options, raw=True)  # raw bands (dB for SAR), not standardised
    shards = expand_shards(train)
    stats = band_statistics(domain, _members(shards, max_samples))
    return {**stats, "max_samples": max_samples, "options": _band_options(options), "shards": shard_fingerprint(shards)}


def write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    """Write under a temporary name beside ``path`` and rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def write_band_stats(recipe_path: str, out: str, *, overrides: list[str] = (), max_samples: int = 2000) -> dict[str, Any]:
    """Statistics of the bands the recipe selects, over its ``data.train`` shards; write them to ``out``."""
    from .recipe import RecipeError, load_recipe

    recipe = load_recipe(recipe_path, list(overrides))
    if recipe.model.domain.name != "remote_sensing":
        raise RecipeError(f"{recipe_path}: data stats is for model.domain remote_sensing, not {recipe.model.domain.name!r}")
    stats = compute_band_stats(recipe.model.domain.options, recipe.data.train, max_samples)
    write_json_atomically(Path(out), stats)
    return stats


def ensure_band_stats(recipe: Any) -> None:
    """Before a run builds its domains: every remote-sensing ``stats:`` file the recipe names exists and still describes
    ``data.train``. A missing file is computed from the training shards and written (one log line says so).

    A file made for other band options is refused: its numbers belong to other bands. One made from other shards than
    ``data.train`` names now (a later stage on its own data, shards rebuilt) is used as it is, with a warning: the
    checkpoints of runs already trained with it depend on these numbers, so it is never rewritten under them."""
    for index, kind in enumerate(recipe.model.kinds()):
        options = kind.domain.options
        if kind.domain.name != "remote_sensing" or not isinstance(options.get("stats"), str):
            continue
        where = "model.domain.options.stats" if index == 0 else f"model.extra_kinds[{index - 1}].domain.options.stats"
        path = Path(options["stats"]).expanduser()
        if not path.is_file():
            stats = compute_band_stats(options, recipe.data.train)
            write_json_atomically(path, stats)
            log.info("%s: %s did not exist; computed from %d files of the training shards %s and written there", where, path,
                     stats["files"], recipe.data.train)
            continue
        check_band_stats(path, options, expand_shards(recipe.data.train), where)


def check_band_stats(path: Path, options: dict[str, Any], shards: list[str], where: str) -> None:
    """Refuse statistics recorded for other band options; warn when they came from other shards (files without a
    record, written by hand or by an older mmdomain, are taken as they are)."""
    recorded = json.loads(path.read_text())
    renew = (f"renew them with `mmdomain data stats RECIPE --out {path}` (or delete the file: the next run computes it); to keep "
             f"the old numbers for the runs trained with them, write the new ones elsewhere and point {where} there")
    if "options" in recorded and recorded["options"] != _band_options(options):
        raise BandStatsError(f"{where}: {path} was computed for the band options {recorded['options']}, but the recipe now has "
                             f"{_band_options(options)}; {renew}")
    if "shards" in recorded:
        before = {s[0]: s[1:] for s in recorded["shards"]}
        now = {s[0]: s[1:] for s in shard_fingerprint(shards)}
        differing = sorted(n for n in set(before) | set(now) if before.get(n) != now.get(n))
        if differing:
            log.warning("%s: %s was computed from %d training shards, and data.train now names %d (differing: %s); using it as it "
                        "is. If the data changed, %s", where, path, len(before), len(now),
                        ", ".join(differing[:5]) + (" ..." if len(differing) > 5 else ""), renew)