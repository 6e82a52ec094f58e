"""`mmdomain cache-features`: run a frozen encoder once over a recipe's shards and store its features.

Stage 1 trains only the connector, so the encoder recomputes identical features every epoch. The cache stores them
as fp16 ``.npy`` members (no pickle) in new shards, under a key hashed from everything that determines them: the
encoder's spec and actual weights, the decoding domain and the preprocessing. A recipe trains from the cache with
``data.feature_cache: DIR``; a cache whose key differs from the recipe's is refused.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from connectors import create_connector
from tqdm import tqdm

from encoders import encode_slices

from .data import FailureBudget, SampleFormat, expand_shards, iter_records
from .domains import build_domain
from .errors import MmdomainError
from .media import cached_sizing, frames_read, sized_by_length

log = logging.getLogger(__name__)

META = "feature_cache.json"


class FeatureCacheError(MmdomainError, ValueError):
    """A feature cache that cannot serve this recipe; the message says why and how to rebuild it."""


def feature_key(spec: Any, encoder: torch.nn.Module, transform: Any) -> str:
    """Hash of the encoder spec, its weights as loaded, the domain and the preprocessing."""
    h = hashlib.sha256()
    h.update(json.dumps({"encoder": spec.encoder.model_dump(mode="json"), "domain": spec.domain.model_dump(mode="json"),
                         "transform": repr(transform), **_clip_facts(spec, encoder)}, sort_keys=True).encode())
    for name, tensor in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


def _trims(spec: Any, encoder: torch.nn.Module) -> bool:
    """Whether clips cost tokens by length here, so the cache stores each clip's own frames only."""
    return sized_by_length(encoder.info, spec.connector, spec.audio_tokens)


def _clip_facts(spec: Any, encoder: torch.nn.Module) -> dict[str, Any]:
    """What else decides the stored frames when clips are trimmed (model.audio_tokens: by_length): they are other
    features than padded windows, and how far past a clip they reach follows the connector's spans (frames_read)."""
    return {"model.audio_tokens": "by_length", "model.connector": spec.connector.model_dump(mode="json")} if _trims(spec, encoder) else {}


def _encoder_for(recipe: Any) -> tuple[torch.nn.Module, Any, Any]:
    """The recipe's encoder exactly as training would build it (same seed; init_from weights if it stores any)."""
    from encoders import create_encoder

    from .builder import WEIGHTS, media_transform
    from .checkpoint import read_tensors, resolve_checkpoint

    torch.manual_seed(recipe.seed)
    encoder = create_encoder(recipe.model.encoder.name, **recipe.model.encoder.options)
    if recipe.init_from:
        stored = read_tensors(resolve_checkpoint(recipe.init_from) / WEIGHTS)
        mine = {k.removeprefix("encoder."): v for k, v in stored.items() if k.startswith("encoder.")}
        if mine:
            encoder.load_state_dict(mine, strict=False)
    domain = build_domain(recipe.model.domain.name, recipe.model.domain.options, encoder.info)
    return encoder.eval(), domain, media_transform(encoder.info, domain)


def check_cacheable(recipe: Any) -> None:
    # Any trained part (the last blocks, LoRA adapters, norms) changes the features as much as training it whole.
    encoder = recipe.trainable.encoder
    if recipe.trainable.encoder_trains or any(p.startswith("encoder.") or p.startswith("*") for p in recipe.trainable.params):
        what = "the encoder" if encoder is True or not recipe.trainable.encoder_trains else \
            f"part of the encoder ({encoder.model_dump(exclude_defaults=True)})"
        raise FeatureCacheError(f"the recipe trains {what}, so its features change every step: a feature cache cannot serve it; "
                                "drop data.feature_cache (or freeze the encoder: trainable.encoder: false)")
    if recipe.model.extra_kinds:
        raise FeatureCacheError("feature caching covers models with one media kind; this recipe has model.extra_kinds")


def cache_features(recipe: Any, out_dir: str | Path, *, batch_size: int = 32, device: str = "cpu") -> dict[str, Any]:
    """Write ``{out_dir}/train-*.tar`` (and ``eval-*.tar`` when the recipe has eval shards) plus feature_cache.json."""
    from .band_stats import ensure_band_stats
    from .shards import ShardWriter, write_manifest

    check_cacheable(recipe)
    ensure_band_stats(recipe)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / META).unlink(missing_ok=True)  # shards are about to change: an interrupted rebuild must not look complete
    encoder, domain, transform = _encoder_for(recipe)
    encoder.to(device)
    key = feature_key(recipe.model, encoder, transform)
    trims = _trims(recipe.model, encoder)
    # Only its token counts are used (which frames each output reads); out_dim does not change them.
    connector = create_connector(recipe.model.connector.name, in_dim=encoder.info.embed_dim, out_dim=1, **recipe.model.connector.options) if trims else None
    manifest: dict[str, Any] = {}
    splits = {"train": recipe.data.train, **({"eval": recipe.data.eval} if recipe.data.eval else {})}
    for split, pattern in splits.items():
        failures = FailureBudget(recipe.data.decode_error_budget)
        records = iter_records(expand_shards(pattern), domain, failures=failures, media_token=recipe.model.media_token,
                               layout=SampleFormat.from_recipe(recipe.data))
        pending: list[Any] = []

        def flush(writer: ShardWriter) -> None:
            """Encode the pending records' media in batches and write each record with its features."""
            raw = [m for r in pending for m in r.media]
            items = [transform(m) for m in raw]
            # As the model encodes them: clips that cost tokens by length pass their lengths to encoders that mask
            # padding, and only each clip's own frames are kept.
            window = encoder.info.input_size[0]
            lengths = torch.tensor([min(int(m.shape[-1]), window) for m in raw]) if trims else None
            with torch.no_grad():
                feats = []
                for i in range(0, len(items), batch_size):
                    values = torch.stack(items[i : i + batch_size]).to(device)
                    part = lengths[i : i + batch_size].to(device) if lengths is not None else None
                    feats.append(encode_slices(encoder, values, part).float().cpu())
            feats = list(torch.cat(feats)) if feats else []
            if lengths is not None:
                full = encoder.info.num_tokens()
                feats = [f[: frames_read(connector, encoder.info.num_tokens_for_samples(int(n)), full)] for f, n in zip(feats, lengths)]
            feats = iter(feats)
            for r in pending:
                sample = {"conversations": r.conversations, **({"choices": r.choices} if r.choices else {}),
                          **({"answer_type": r.answer_type} if r.answer_type else {})}
                members = [("json", json.dumps(sample).encode())]
                for i in range(len(r.media)):
                    buf = io.BytesIO()
                    np.save(buf, next(feats).numpy().astype(np.float16), allow_pickle=False)
                    members.append((f"{i}.npy", buf.getvalue()))
                writer.write(r.key.replace(":", "__").replace(".", "_"), members)
            pending.clear()

        with ShardWriter(out_dir, split, 1000) as writer:
            for record in tqdm(records, desc=f"cache {split}", leave=False):
                pending.append(record)
                if len(pending) >= batch_size:
                    flush(writer)
            flush(writer)
        total = sum(s["samples"] for s in writer.shards)
        manifest[split] = {"prefix": split, "source": str(pattern), "total": total, "shards": writer.shards}
        log.info("cached %d %s samples (%d skipped) in %s", total, split, failures.total, out_dir)
    write_manifest(out_dir, manifest)
    meta = {"key": key, "encoder": recipe.model.encoder.model_dump(mode="json"), "domain": recipe.model.domain.model_dump(mode="json"),
            "clips": _clip_facts(recipe.model, encoder),
            "embed_dim": encoder.info.embed_dim, "tokens_per_item": encoder.info.num_tokens(), "dtype": "float16",
            "splits": {s: m["total"] for s, m in manifest.items()},
            "sources": {split: {"patterns": pattern, "shards": shard_facts(expand_shards(pattern))} for split, pattern in splits.items()}}
    (out_dir / META).write_text(json.dumps(meta, indent=2) + "\n")  # written last: a cache without it is incomplete
    return meta


def shard_facts(paths: list[str]) -> list[list[Any]]:
    """Each shard's file name and size: what a cache was made from, comparable across machines and folders."""
    return [[Path(p).name, Path(p).stat().st_size] for p in paths]


def _check_source(directory: Path, meta: dict[str, Any], split: str, patterns: str | list[str]) -> None:
    """Refuse a cache made from other shards than the recipe's ``data.<split>`` names. Shards deleted since the cache
    was made (to save space) are fine when the recipe still names them by the same pattern."""
    from .data import DataError

    source = meta.get("sources", {}).get(split)
    if source is None:
        raise FeatureCacheError(f"feature cache {directory} does not record which shards its {split} split came from (made by an older "
                                f"mmdomain); rebuild it with `mmdomain cache-features RECIPE --out {directory}`")
    try:
        now = shard_facts(expand_shards(patterns))
    except DataError:
        if patterns == source["patterns"]:
            log.info("the shards of data.%s no longer exist; using the feature cache made from them", split)
            return
        raise FeatureCacheError(f"feature cache {directory} was made from data.{split}={source['patterns']!r}, but this recipe names "
                                f"{patterns!r}, which matches no file") from None
    if now != source["shards"]:
        raise FeatureCacheError(
            f"feature cache {directory} was made from data.{split}={source['patterns']!r} ({len(source['shards'])} shards), but this "
            f"recipe's data.{split} is {patterns!r} ({len(now)} shards, not the same files): training from the cache would use other "
            f"data; rebuild it with `mmdomain cache-features RECIPE --out {directory}`, or point data.{split} at the shards it was made from"
        )


def _differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted name, old, new) for every leaf that differs between two JSON-like values."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new)) for d in _differences(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else k)]
    return [] if old == new else [(prefix, old, new)]


def open_cache(directory: str | Path, model: Any, processor: Any, recipe: Any) -> tuple[str, str | None]:
    """Check a cache against the built model and the recipe's data, switch the processor to cached features, and
    return the cache's (train, eval) shard patterns (eval None when the recipe evaluates on nothing)."""
    directory = Path(directory)
    meta_file = directory / META
    if not meta_file.is_file():
        raise FeatureCacheError(f"{directory} is not a complete feature cache (no {META}); build it with `mmdomain cache-features RECIPE --out {directory}`")
    meta = json.loads(meta_file.read_text())
    key = feature_key(model.spec, model.encoder, processor.transform)
    if meta["key"] != key:
        mine = {"model.encoder": model.spec.encoder.model_dump(mode="json"), "model.domain": model.spec.domain.model_dump(mode="json")}
        theirs = {"model.encoder": meta["encoder"], "model.domain": meta["domain"]}
        # Clip trimming is named too (a cache without it holds every clip's full window, as model.audio_tokens: padded).
        padded = {"model.audio_tokens": "padded"}
        mine |= _clip_facts(model.spec, model.encoder) or padded
        theirs |= meta.get("clips") or padded
        changed = [f"{name}: {old!r} in the cache, {new!r} here" for name, old, new in _differences(theirs, mine)]
        what = "; ".join(changed[:3]) if changed else "the same settings, but other encoder weights or preprocessing"
        raise FeatureCacheError(
            f"feature cache {directory} was made for another encoder input ({what}); make it with the same recipe and overrides as "
            f"the run (`mmdomain cache-features RECIPE [overrides] --out {directory}` prints the matching run command)"
        )
    _check_source(directory, meta, "train", recipe.data.train)
    eval_patterns = None
    if recipe.data.eval is not None:
        if "eval" not in meta["splits"]:
            raise FeatureCacheError(f"the recipe evaluates on data.eval={recipe.data.eval!r} but feature cache {directory} has no eval "
                                    "split; rebuild the cache with data.eval set, or set data.eval=null to train without evaluation")
        _check_source(directory, meta, "eval", recipe.data.eval)
        eval_patterns = str(directory / "eval-*.tar")
    processor.use_cached_features(meta["tokens_per_item"], cached_sizing(model.connector) if _trims(model.spec, model.encoder) else None)
    return str(directory / "train-*.tar"), eval_patterns
