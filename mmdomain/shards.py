"""Write webdataset shards from a media folder and a JSONL of samples, with a manifest of per-shard counts.

Accepted JSONL lines (one sample each):
- ``{"media": ["a.png", ...], "conversations": [{"role": "user", "content": "<image> ..."}, ...]}``
  (LLaVA's ``{"from": "human"|"gpt", "value": ...}`` turns and ``"image"`` in place of ``"media"`` work too);
- ``{"image": "a.png", "question": "...", "answer": "...", "choices": [...]?}``;
- ``{"image": "a.png", "caption": "..."}`` (the user turn is ``<image> {caption_prompt}``);
- ``{"media": ["a.png"], "prompt": "...", "chosen": "...", "rejected": "..."}``: a preference pair (``mmdomain review``
  output; lines with ``"flagged": true`` are skipped and counted), stored as the conversation ending in ``chosen``
  with ``rejected`` beside it, for ``objective: dpo``.
Optional fields kept for evaluation: ``id`` (the sample key), ``choices``, ``answer_type`` (closed/open).
``dates`` (one ISO date per media item: acquisitions of one place) puts the media in date order and writes each
marker as ``<image> (2021-05-01)``.

A media entry may also be a list of files or a folder: one item made of several files (a DICOM series, a band set),
stored as one bundle member ``{key}.{i}.{ext}.tar`` where the domain takes that type (``domains/bundle.py``).

A sample becomes ``{key}.json`` plus ``{key}.{i}.{ext}`` per media item, stored as the original file bytes once the
domain has checked them (``prepare_for_shard``: the format matches the extension, the size fits ``max_pixels``, a
DICOM is stripped of identifying attributes). Media paths must be relative to the media folder and stay inside it.
Each shard is written under a temporary name and renamed when complete; ``manifest.json`` is written last.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
from pathlib import Path, PurePath
from typing import Any, Iterable

from .acquisition_dates import mark_with_dates, order_by_dates
from .domains import MARKER_LIKE, DecodeError, Domain, build_domain, media_type
from .domains.bundle import bundle_type, is_bundle, pack_bundle
from .errors import MmdomainError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class ShardError(MmdomainError, ValueError):
    """Bad input for make-shards; the message names the JSONL line, field or file and the fix."""


def normalise_record(record: dict[str, Any], where: str, media_token: str = "<image>", caption_prompt: str = "Describe the image.",
                     other_tokens: tuple[str, ...] = ()) -> dict[str, Any]:
    """One JSONL record -> ``{"conversations", "media", "choices"?, "answer_type"?}`` with markers matching media.

    Markers of any kind (``media_token`` and ``other_tokens``) count; a record with none gets ``media_token``
    markers prepended to its first user turn (with several media kinds, write the markers yourself)."""
    media = record.get("media", record.get("image", []))
    media = [media] if isinstance(media, str) else list(media)
    if "conversations" in record:
        turns = []
        for i, turn in enumerate(record["conversations"]):
            role = _ROLES.get(turn.get("role", turn.get("from")))
            content = turn.get("content", turn.get("value"))
            if role is None or not isinstance(content, str):
                raise ShardError(f"{where}: conversations[{i}] needs role (user/assistant/system) and string content")
            turns.append({"role": role, "content": content})
    elif "question" in record and "answer" in record:
        turns = [{"role": "user", "content": str(record["question"])}, {"role": "assistant", "content": str(record["answer"])}]
    elif "chosen" in record or "rejected" in record:
        # A preference pair: stored as the conversation that ends in the chosen answer (an SFT run on these shards learns
        # the preferred answers), with the rejected answer beside it for objective: dpo.
        missing = [k for k in ("prompt", "chosen", "rejected") if not isinstance(record.get(k), str) or not record[k].strip()]
        if missing:
            raise ShardError(f"{where}: a preference pair needs non-empty text in prompt, chosen and rejected; {', '.join(missing)} "
                             "missing or empty (a review line without a judgement carries \"flagged\": true and is skipped)")
        if record["chosen"].strip() == record["rejected"].strip():
            raise ShardError(f"{where}: chosen and rejected are the same answer, which states no preference; drop the line")
        turns = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["chosen"]}]
    elif "caption" in record:
        turns = [{"role": "user", "content": caption_prompt}, {"role": "assistant", "content": str(record["caption"])}]
    else:
        raise ShardError(f"{where}: a sample needs 'conversations', or 'question' + 'answer', or 'caption', or 'prompt' + 'chosen' + "
                         f"'rejected' (keys: {sorted(record)})")
    if not any(t["role"] == "assistant" for t in turns):
        raise ShardError(f"{where}: no assistant turn to learn from")
    known = (media_token, *other_tokens)
    markers = sum(t["content"].count(token) for t in turns for token in known)
    dates = None
    if "dates" in record:  # acquisitions of one place: media in date order, each marker followed by its date
        try:
            media, dates = order_by_dates(media, record["dates"])
        except ValueError as exc:
            raise ShardError(f"{where}: {exc}") from None
    # Media without a marker of ours, while a user turn holds one of another kind (``<audio>`` while sharding for
    # ``<image>``): prepending ours would give "<image> <audio> ...", trained on without a word. Elsewhere such words
    # are plain text (an answer about the HTML <video> element, a caption), and a sample whose markers fit is fine.
    foreign = sorted({m for t in turns if t["role"] == "user" for m in MARKER_LIKE.findall(t["content"]) if m not in known})
    if media and markers == 0 and foreign:
        raise ShardError(f"{where}: the question holds the marker {foreign[0]!r}, but the media markers here are "
                         f"{' / '.join(repr(t) for t in known)}; pass --media-token {foreign[0]!r} (or --recipe RECIPE whose "
                         f"model.media_token or model.extra_kinds name it), or write {media_token!r} where the media go")
    if markers == 0 and media:
        first_user = next((t for t in turns if t["role"] == "user"), None)
        if first_user is None:
            raise ShardError(f"{where}: media given but no user turn to attach them to")
        first_user["content"] = " ".join([media_token] * len(media) + [first_user["content"]])
    elif markers != len(media):
        raise ShardError(f"{where}: {markers} {' / '.join(repr(t) for t in (media_token, *other_tokens))} markers but {len(media)} media files; they must match one to one")
    out: dict[str, Any] = {"conversations": turns, "media": media}
    if dates is not None:
        mark_with_dates(turns, re.compile("|".join(re.escape(t) for t in sorted(known, key=len, reverse=True))), dates)
        # Kept for provenance under another name: the stored sample is normalised again when it is read, and its
        # markers already carry their dates (a "dates" field would date them twice).
        out["acquisition_dates"] = dates
    if "choices" in record:
        choices = [str(c) for c in record["choices"]]
        answer = turns[-1]["content"]
        if turns[-1]["role"] != "assistant" or answer not in choices:
            raise ShardError(f"{where}: the final assistant answer {answer!r} is not among choices {choices}")
        out["choices"] = choices
    if "rejected" in record:
        if any(t in str(record["rejected"]) for t in known):
            raise ShardError(f"{where}: the rejected answer holds a media marker; media belong in the prompt")
        out["rejected"] = str(record["rejected"])
    if "answer_type" in record:
        if record["answer_type"] not in ("closed", "open"):
            raise ShardError(f"{where}: answer_type must be 'closed' or 'open', got {record['answer_type']!r}")
        out["answer_type"] = record["answer_type"]
    return out


def _sample_key(record: dict[str, Any], prefix: str, line: int) -> str:
    raw = str(record.get("id", f"{prefix}-{line:08d}"))
    return re.sub(r"[^A-Za-z0-9_-]", "_", raw)  # webdataset splits keys at the first dot


class ShardWriter:
    """Writes samples into ``{prefix}-NNNNNN.tar`` shards of at most ``per_shard`` samples. Each shard is written
    under a temporary name and renamed only when complete; if the ``with`` block fails, the partial shard is removed.
    ``shards`` lists the finished shards with their sample counts (the manifest entries)."""

    def __init__(self, out_dir: Path, prefix: str, per_shard: int) -> None:
        self.out_dir, self.prefix, self.per_shard = Path(out_dir), prefix, per_shard
        self.shards: list[dict[str, Any]] = []
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None

    def write(self, key: str, members: list[tuple[str, bytes]]) -> None:
        """One sample: ``members`` are (suffix, bytes), stored as ``{key}.{suffix}``."""
        if self._tar is None or self.shards[-1]["samples"] >= self.per_shard:
            self._finish()
            self.shards.append({"name": f"{self.prefix}-{len(self.shards):06d}.tar", "samples": 0})
            self._tmp = self.out_dir / f".{self.shards[-1]['name']}.tmp"
            self._tar = tarfile.open(self._tmp, "w")
        for suffix, data in members:
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size = len(data)
            info.mode = 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self.shards[-1]["samples"] += 1

    def _finish(self) -> None:
        if self._tar is not None:
            self._tar.close()
            os.replace(self._tmp, self.out_dir / self.shards[-1]["name"])
            self._tar = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        if kind is None:
            self._finish()
        elif self._tar is not None:
            self._tar.close()
            self._tmp.unlink(missing_ok=True)


def write_manifest(out_dir: Path, entries: dict[str, Any]) -> None:
    """Merge ``{prefix: entry}`` into ``out_dir/manifest.json`` (one entry per prefix), replacing it in one rename."""
    merged = {**(read_manifest(out_dir) or {}), **entries}
    tmp = Path(out_dir) / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(merged, indent=2) + "\n")
    os.replace(tmp, Path(out_dir) / MANIFEST)


def make_shards(jsonl: str | Path, media_root: str | Path, out_dir: str | Path, *, prefix: str = "train",
                samples_per_shard: int = 1000, caption_prompt: str = "Describe the image.", overwrite: bool = False,
                domain: Domain | dict[str, Domain] | None = None, media_token: str = "<image>") -> dict[str, Any]:
    """Write ``{out_dir}/{prefix}-NNNNNN.tar`` and ``{out_dir}/manifest.json``; return the manifest.

    ``domain`` (default generic) decides which media types are allowed and what is stored for each: a medical
    domain stores DICOMs rebuilt without identifying attributes, so no PHI reaches the shards. With several media
    kinds, ``domain`` maps each marker token to its domain and each file is checked by its marker's domain.
    """
    domains = domain if isinstance(domain, dict) else {media_token: domain or build_domain("generic")}
    others = tuple(t for t in domains if t != media_token)
    marker = re.compile("|".join(re.escape(t) for t in sorted(domains, key=len, reverse=True)))
    jsonl, media_root, out_dir = Path(jsonl), Path(media_root), Path(out_dir)
    if not jsonl.is_file():
        raise ShardError(f"samples file {str(jsonl)!r} does not exist")
    if not media_root.is_dir():
        raise ShardError(f"media folder {str(media_root)!r} does not exist")
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = sorted(out_dir.glob(f"{prefix}-*.tar"))
    if stale and not overwrite:
        raise ShardError(f"{out_dir} already holds {len(stale)} '{prefix}-*.tar' shards; choose another --out or --prefix, or pass --overwrite")

    keys: set[str] = set()
    flagged = 0
    with ShardWriter(out_dir, prefix, samples_per_shard) as writer:
        for line_no, line in enumerate(_lines(jsonl), start=1):
            where = f"{jsonl}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ShardError(f"{where}: not valid JSON ({exc.msg})") from None
            if isinstance(record, dict) and record.get("flagged") is True:  # a review item the expert flagged, not judged
                flagged += 1
                continue
            sample = normalise_record(record, where, media_token=media_token, caption_prompt=caption_prompt, other_tokens=others)
            kinds = [m for t in sample["conversations"] for m in marker.findall(t["content"])]
            key = _sample_key(record, prefix, line_no)
            if key in keys:
                raise ShardError(f"{where}: sample id {key!r} appears twice; ids must be unique")
            keys.add(key)
            blobs, facts = [], []
            for i, (entry, kind) in enumerate(zip(sample.pop("media"), kinds)):
                blobs.append(_media_member(i, entry, domains[kind], where, media_root))
                # What a domain knows of a stored item beyond its pixels (a volume's stored orientation), for provenance.
                describe = getattr(domains[kind], "describe_for_shard", None)
                facts.append(describe(*blobs[-1]) if describe else None)
            if any(facts):
                sample["meta"] = {"media": [f or {} for f in facts]}
            writer.write(key, [("json", json.dumps(sample).encode()), *blobs])
    shards = writer.shards
    if flagged:
        log.warning("%s: skipped %d flagged lines (review items marked flagged: true carry no judgement)", jsonl, flagged)
    if not shards:
        raise ShardError(f"{jsonl} holds no samples" + (f" (only {flagged} flagged lines)" if flagged else ""))
    for old in stale:  # older shards beyond the new set would be picked up by a glob
        if old.name not in {s["name"] for s in shards}:
            old.unlink()
    manifest = {"prefix": prefix, "source": str(jsonl), "total": sum(s["samples"] for s in shards), "shards": shards,
                **({"flagged_skipped": flagged} if flagged else {})}
    write_manifest(out_dir, {prefix: manifest})
    log.info("wrote %d samples in %d shards to %s", manifest["total"], len(shards), out_dir)
    return manifest


def _media_member(i: int, entry: Any, domain: Domain, where: str, media_root: Path) -> tuple[str, bytes]:
    """``(suffix, bytes)`` for media entry ``i``: a file as its domain stores it, or a list of files / a folder as one
    bundle (bundle.py) when the domain takes bundles of that file type."""
    files = _bundle_files(entry, where, media_root)
    label = repr(entry) if isinstance(entry, str) else f"[{entry[0]!r}, ... ({len(entry)} files)]"
    if files is None:
        rel = entry
        path = media_root / rel
        ext = _file_type(path)
        if ext not in domain.media_types():
            raise ShardError(f"{where}: media {rel!r} has type .{ext}; the {domain.name} domain allows "
                             f"{', '.join(domain.media_types())} (choose the domain with --domain or --recipe)")
        if not path.is_file():
            raise ShardError(f"{where}: media file {str(path)!r} does not exist; paths in the JSONL are relative to --media "
                             f"({media_root}): check both")
        name, data = path.name if ext == media_type(path.name) else f"{path.name}.{ext}", path.read_bytes()
    else:
        types = sorted({_file_type(media_root / f) for f in files})
        if len(types) != 1:
            raise ShardError(f"{where}: media {label} mixes file types ({', '.join('.' + t for t in types)}); one item's files "
                             "must share one type")
        ext = bundle_type(types[0])
        if ext not in domain.media_types():
            takes = [t for t in domain.media_types() if is_bundle(t)]
            raise ShardError(f"{where}: media {label} is several .{types[0]} files as one item, which the {domain.name} domain "
                             + (f"takes only for {', '.join('.' + t.removesuffix('.tar') for t in takes)}" if takes else "does not take")
                             + "; list the files as separate media items (one marker each) or choose the domain with --domain or --recipe")
        name, data = f"{i}.{ext}", pack_bundle([(f, (media_root / f).read_bytes()) for f in files])
    try:
        return f"{i}.{ext}", domain.prepare_for_shard(name, data)
    except DecodeError as exc:
        # The domain names the member by its file name; here the JSONL path says it better, once.
        reason = str(exc).removeprefix(f"member {name!r}: ")
        raise ShardError(f"{where}: media {label}: {reason}") from None


def _file_type(path: Path) -> str:
    """A file's media type from its extension; a file without one (scanners write ``IM000001``) that holds the DICOM
    preamble's ``DICM`` marker is a DICOM."""
    if "." not in path.name and path.is_file():
        with path.open("rb") as f:
            if f.read(132)[128:132] == b"DICM":
                return "dcm"
    return media_type(path.name)


def _bundle_files(entry: Any, where: str, media_root: Path) -> list[str] | None:
    """The files of a bundle entry (a list of paths, or a folder's visible files sorted by name), relative to
    ``media_root``; None for a single file."""
    if isinstance(entry, list):
        if not entry:
            raise ShardError(f"{where}: an empty list of media files; give at least one path")
        files = [_inside_media(f, where, media_root) for f in entry]
    else:
        folder = media_root / _inside_media(entry, where, media_root)
        if not folder.is_dir():
            return None
        # Hidden files (.DS_Store) and a DICOMDIR (the archive's index, not an image) are not part of the item.
        files = [str(PurePath(entry) / p.name) for p in sorted(folder.iterdir())
                 if p.is_file() and not p.name.startswith(".") and p.name.upper() != "DICOMDIR"]
        if not files:
            raise ShardError(f"{where}: media folder {str(folder)!r} holds no files")
        return files
    for f in files:
        if not (media_root / f).is_file():
            raise ShardError(f"{where}: media file {str(media_root / f)!r} does not exist; paths in the JSONL are relative to "
                             f"--media ({media_root}): check both")
    if len(set(files)) != len(files):
        raise ShardError(f"{where}: the media list names a file twice")
    return files


def _inside_media(rel: Any, where: str, media_root: Path) -> str:
    """``rel`` if it names a file inside the media folder; otherwise a ShardError naming the line, the path and the fix.

    Decided lexically (no absolute path, no ``..`` component) rather than by resolving the path: a symlink a team
    placed inside --media (a shared archive, another disk) is inside by intent and keeps working, while a JSONL line
    can no longer pull an arbitrary readable file (``/etc/...``, ``../secrets``) into shards that get shared."""
    if not isinstance(rel, str) or not rel:
        raise ShardError(f"{where}: media entry {rel!r} is not a file path; write paths relative to --media ({media_root})")
    if PurePath(rel).is_absolute():
        raise ShardError(f"{where}: media path {rel!r} is absolute; write it relative to --media ({media_root}), "
                         "or choose a --media folder that contains it")
    if ".." in PurePath(rel).parts:
        raise ShardError(f"{where}: media path {rel!r} climbs out of --media with '..'; write it relative to --media "
                         f"({media_root}) without '..', or choose a --media folder that contains it")
    return rel


def _lines(path: Path) -> Iterable[str]:
    with path.open() as f:
        for line in f:
            if line.strip():
                yield line


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def count_samples(shard_paths: list[str]) -> int | None:
    """Samples in these shards according to their manifests, or None if any shard is not listed."""
    total = 0
    by_dir: dict[Path, dict[str, int]] = {}
    for shard in shard_paths:
        directory = Path(shard).parent
        if directory not in by_dir:
            manifest = read_manifest(directory) or {}
            by_dir[directory] = {s["name"]: s["samples"] for m in manifest.values() for s in m["shards"]}
        count = by_dir[directory].get(Path(shard).name)
        if count is None:
            return None
        total += count
    return total

