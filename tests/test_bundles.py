"""Bundles: a list of files or a folder becomes one media item in shards, for domains that take that bundle type."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from mmdomain.data import FailureBudget, iter_records
from mmdomain.domains import DecodeError, build_domain, media_type
from mmdomain.domains.bundle import pack_bundle, unpack_bundle
from mmdomain.shards import ShardError, make_shards


class StackDomain:
    """A test domain that takes single PNGs and PNG bundles; a bundle decodes to one [H, W, N] stack in stored order."""

    name = "stack"
    output = "unit"

    def __init__(self) -> None:
        self.generic = build_domain("generic")

    def media_types(self) -> list[str]:
        return ["png", "png.tar"]

    def prepare_for_shard(self, name: str, data: bytes) -> bytes:
        if media_type(name) != "png.tar":
            return self.generic.prepare_for_shard(name, data)
        parts = unpack_bundle(name, data)
        # Source names may identify people; the stored bundle keeps the order under anonymous names.
        return pack_bundle([(f"{i:06d}.png", self.generic.prepare_for_shard(n, d)) for i, (n, d) in enumerate(parts)])

    def decode(self, name: str, data: bytes) -> list[np.ndarray]:
        if media_type(name) != "png.tar":
            return self.generic.decode(name, data)
        return [np.stack([self.generic.decode(n, d)[0][..., 0] for n, d in unpack_bundle(name, data)], axis=-1)]


def _png(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(path)


def _shards(tmp_path, rows, domain=None):
    jsonl = tmp_path / "s.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return make_shards(jsonl, tmp_path / "media", tmp_path / "shards", domain=domain or StackDomain())


def test_media_type_of_a_bundle():
    assert media_type("0.dcm.tar") == "dcm.tar" and media_type("3.nii.gz.tar") == "nii.gz.tar"
    assert media_type("plain.tar") == "tar" and media_type("dir.v2/x.tar") == "tar" and media_type("0.PNG") == "png"


def test_list_and_folder_become_one_item_in_order(tmp_path):
    for i, value in enumerate([10, 20, 30]):
        _png(tmp_path / "media" / "series" / f"Smith_John_{i}.png", value)
    (tmp_path / "media" / "series" / ".DS_Store").write_bytes(b"junk")
    _png(tmp_path / "media" / "single.png", 99)
    rows = [
        {"id": "listed", "media": [["series/Smith_John_2.png", "series/Smith_John_0.png"]], "question": "<image> q", "answer": "a"},
        {"id": "folder", "media": ["series"], "question": "<image> q", "answer": "a"},
        {"id": "mixed", "media": ["single.png", ["series/Smith_John_1.png"]], "question": "<image> <image> q", "answer": "a"},
    ]
    _shards(tmp_path, rows)
    raw = (tmp_path / "shards" / "train-000000.tar").read_bytes()
    assert b"Smith_John" not in raw  # the domain re-packed the bundle under anonymous names
    records = {r.key.split(":")[-1]: r for r in iter_records([str(tmp_path / "shards" / "train-000000.tar")], StackDomain(),
                                               failures=FailureBudget(0))}
    values = lambda m: [int(v) for v in m[0, 0]]  # noqa: E731
    assert len(records["listed"].media) == 1 and values(records["listed"].media[0]) == [30, 10]
    assert values(records["folder"].media[0]) == [10, 20, 30]  # a folder is read sorted by name, hidden files skipped
    assert len(records["mixed"].media) == 2 and values(records["mixed"].media[1]) == [20]


@pytest.mark.parametrize("media,message", [
    ([["a.png", "b.jpg"]], "mixes file types (.jpg, .png)"),
    ([[]], "empty list of media files"),
    ([["a.png", "a.png"]], "names a file twice"),
    ([["a.png", "missing.png"]], "missing.png' does not exist"),
    ([["a.png", "../a.png"]], "climbs out of --media"),
    (["empty"], "holds no files"),
])
def test_bad_bundles_are_named(tmp_path, media, message):
    _png(tmp_path / "media" / "a.png", 1)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "media" / "b.jpg")
    (tmp_path / "media" / "empty").mkdir()
    with pytest.raises(ShardError, match="s.jsonl:1: ") as info:
        _shards(tmp_path, [{"media": media, "question": "<image> q", "answer": "a"}])
    assert message in str(info.value)


def test_a_domain_without_bundles_refuses_a_list_and_says_what_to_do(tmp_path):
    _png(tmp_path / "media" / "a.png", 1)
    _png(tmp_path / "media" / "b.png", 2)
    with pytest.raises(ShardError, match=r"several \.png files as one item, which the generic domain does not take; list the files"):
        _shards(tmp_path, [{"media": [["a.png", "b.png"]], "question": "<image> q", "answer": "a"}], domain=build_domain("generic"))


def test_unpack_refuses_what_is_not_a_bundle_of_plain_files():
    with pytest.raises(DecodeError, match="'x.dcm.tar': not a readable bundle"):
        unpack_bundle("x.dcm.tar", b"not a tar at all" * 64)
    with pytest.raises(DecodeError, match="more than 2 files"):
        unpack_bundle("x.dcm.tar", pack_bundle([("a", b"1"), ("b", b"2"), ("c", b"3")]), max_members=2)
    import tarfile

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        info = tarfile.TarInfo("link")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(DecodeError, match="'link' is not a plain file"):
        unpack_bundle("x.dcm.tar", out.getvalue())
    assert pack_bundle([("a", b"1")]) == pack_bundle([("a", b"1")])  # deterministic: same shards from the same input
