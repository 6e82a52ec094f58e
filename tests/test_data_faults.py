"""Shards that are not what they claim: cut short, duplicated keys, bad samples met every epoch or by several
workers. Each is named, counted once against data.decode_error_budget, and never a raw traceback."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from mmdomain.builder import build_model
from mmdomain.data import DataError, FailureBudget, SampleFormat, ShardCatalog, iter_records
from mmdomain.domains import build_domain
from mmdomain.shard_index import ShardFormatError, scan_shard
from mmdomain.shards import make_shards
from mmdomain.spec import ModelSpec
from mmdomain.train_stream import BatchStream, TrainBatches

from .conftest import write_tar

GENERIC = build_domain("generic")


def _png(value: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _json(answer: str = "left") -> bytes:
    return json.dumps({"conversations": [{"role": "user", "content": "<image> where ?"}, {"role": "assistant", "content": answer}]}).encode()


def _sample(key: str, value: int = 0):
    return [(f"{key}.json", _json()), (f"{key}.0.png", _png(value))]


@pytest.fixture
def made(tmp_path):
    """Shards written by make-shards (with a manifest): 2 shards of 10."""
    (tmp_path / "media").mkdir()
    for i in range(20):
        (tmp_path / "media" / f"{i}.png").write_bytes(_png(i))
    rows = [{"id": f"s{i}", "image": f"{i}.png", "question": "where ?", "answer": "left"} for i in range(20)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    make_shards(tmp_path / "rows.jsonl", tmp_path / "media", tmp_path / "shards", samples_per_shard=10)
    return tmp_path / "shards"


def test_truncated_shard_is_named_counted_and_the_rest_is_used(made):
    shard = made / "train-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2 + 700])  # ends inside a member
    failures = FailureBudget(10)
    records = list(iter_records([str(made / "train-000000.tar"), str(shard)], GENERIC, failures=failures))
    assert 10 < len(records) < 20
    (key, (reason, count)), = failures.failures.items()
    assert key == "train-000001.tar:<missing>" and count == 20 - len(records)
    assert f"holds {len(records) - 10} of the 10 samples manifest.json lists" in reason and "the file ends" in reason
    with pytest.raises(DataError, match=r"(?s)over data.decode_error_budget=1.*train-000001.tar:<missing>.*re-copy or re-write"):
        ShardCatalog([str(shard)], FailureBudget(1))


def test_shard_cut_at_a_member_boundary_is_caught_by_the_manifest(made):
    """A copy cut exactly between members reads as a valid but shorter tar: only the manifest tells."""
    shard = made / "train-000000.tar"
    _, offset, size = scan_shard(shard).members(5)[-1]
    shard.write_bytes(shard.read_bytes()[: offset + ((size + 511) // 512) * 512])
    failures = FailureBudget(10)
    catalog = ShardCatalog([str(shard)], failures)
    assert catalog.counts == [6] and failures.total == 4
    assert "without tar's end-of-archive blocks" in failures.failures["train-000000.tar:<missing>"][0]


def test_duplicate_keys_adjacent_and_apart_are_named_and_skipped(tmp_path):
    shard = write_tar(tmp_path / "d-000000.tar", [
        *_sample("a"),
        ("b.json", _json()), ("b.json", _json("right")), ("b.0.png", _png()),  # adjacent: which json is meant?
        *_sample("c"),
        *_sample("a", 9),                                                     # apart: "a" again
    ])
    failures = FailureBudget(5)
    records = list(iter_records([shard], GENERIC, failures=failures))
    assert [r.key for r in records] == ["d-000000.tar:a", "d-000000.tar:c"]
    assert "member b.json appears twice in a row" in failures.failures["d-000000.tar:b"][0]
    assert "appears again after other samples" in failures.failures["d-000000.tar:a#2"][0]
    assert failures.total == 2


def test_not_a_tar_and_compressed_shards_are_refused_by_name(tmp_path):
    (tmp_path / "x-000000.tar").write_bytes(b"this is not a tar file" * 100)
    with pytest.raises(ShardFormatError, match=r"x-000000.tar is not a tar file"):
        ShardCatalog([str(tmp_path / "x-000000.tar")], FailureBudget(0))
    (tmp_path / "y.tar.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(ShardFormatError, match=r"y.tar.gz is compressed.*decompress"):
        ShardCatalog([str(tmp_path / "y.tar.gz")], FailureBudget(0))


@pytest.fixture
def processor(tiny_llm_dir):
    spec = ModelSpec.model_validate({"encoder": {"name": "tiny-vit", "options": {"image_size": 32, "channels": 1}}, "llm": {"path": tiny_llm_dir}})
    return build_model(spec)[1]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_bad_sample_counts_once_over_epochs_and_workers(tmp_path, processor, workers):
    good = [m for i in range(11) for m in _sample(f"g{i}")]
    shard = write_tar(tmp_path / "b-000000.tar", [*good, ("bad.json", _json()), ("bad.0.png", b"not a png")])
    failures = FailureBudget(1)
    dataset = TrainBatches(ShardCatalog([shard], failures), processor, layout=SampleFormat(), seed=0, shuffle_buffer=4, limit=None, batch_size=4)
    stream = BatchStream(dataset, num_workers=workers, failures=failures)
    keys = [k for _ in range(3 * dataset.batches_per_epoch()) for k in stream.next_batch()[1]["keys"]]  # three epochs
    stream.close()
    assert len(keys) == 33 and "b-000000.tar:bad" not in keys
    assert failures.total == 1 and "member '0.png'" in failures.failures["b-000000.tar:bad"][0]


@pytest.mark.parametrize("workers", [0, 2])
def test_the_budget_is_global_across_workers(tmp_path, processor, workers):
    members = [m for i in range(8) for m in _sample(f"g{i}")]
    members += [m for i in range(3) for m in [(f"bad{i}.json", _json()), (f"bad{i}.0.png", b"nope")]]
    shard = write_tar(tmp_path / "b-000000.tar", members)
    failures = FailureBudget(2)
    dataset = TrainBatches(ShardCatalog([shard], failures), processor, layout=SampleFormat(), seed=0, shuffle_buffer=0, limit=None, batch_size=2)
    stream = BatchStream(dataset, num_workers=workers, failures=failures)
    with pytest.raises(DataError, match=r"3 samples failed, over data.decode_error_budget=2"):
        for _ in range(dataset.batches_per_epoch()):
            stream.next_batch()
    stream.close()


@pytest.mark.parametrize("workers", [0, 2])
def test_a_shard_that_changes_under_a_worker_is_one_clear_error(tmp_path, processor, workers):
    shard = write_tar(tmp_path / "c-000000.tar", [m for i in range(8) for m in _sample(f"g{i}")])
    failures = FailureBudget(0)
    dataset = TrainBatches(ShardCatalog([shard], failures), processor, layout=SampleFormat(), seed=0, shuffle_buffer=0, limit=None, batch_size=4)
    with open(shard, "r+b") as f:
        f.truncate(2048)  # replaced by a shorter file after it was indexed
    stream = BatchStream(dataset, num_workers=workers, failures=failures)
    with pytest.raises(OSError) as caught:
        stream.next_batch()
    stream.close()
    assert "c-000000.tar changed while training read it" in str(caught.value) and "DataLoader worker" not in str(caught.value)


def test_a_sample_longer_than_pack_length_is_counted_not_fatal(tmp_path, processor):
    long_answer = json.dumps({"conversations": [{"role": "user", "content": "<image> where ?"},
                                                {"role": "assistant", "content": " ".join(["left"] * 40)}]}).encode()
    shard = write_tar(tmp_path / "p-000000.tar", [*_sample("a"), *_sample("b"), ("long.json", long_answer), ("long.0.png", _png())])
    failures = FailureBudget(1)
    dataset = TrainBatches(ShardCatalog([shard], failures), processor, layout=SampleFormat(), seed=0, shuffle_buffer=0, limit=None,
                           batch_size=3, pack_length=40)
    stream = BatchStream(dataset, num_workers=0, failures=failures)
    assert sorted(stream.next_batch()[1]["keys"]) == ["p-000000.tar:a", "p-000000.tar:b"]
    assert "do not fit data.pack_length=40" in failures.failures["p-000000.tar:long"][0]


def test_a_shard_missing_from_disk_or_copied_twice_is_counted(made, caplog):
    import shutil

    shutil.copy(made / "train-000000.tar", made / "train-000009.tar")  # a copy under another name
    (made / "train-000001.tar").unlink()  # listed in manifest.json, gone from disk
    failures = FailureBudget(100)
    pattern = str(made / "train-*.tar")
    catalog = ShardCatalog(sorted(str(p) for p in made.glob("train-*.tar")), failures, patterns=pattern)
    assert catalog.counts == [10, 0]
    assert failures.failures["train-000001.tar:<missing shard>"] == (
        "manifest.json lists this shard with 10 samples, but the file is not there; copy it back or write the shards again", 10)
    assert "is a copy of train-000000.tar" in failures.failures["train-000009.tar:<copy>"][0]
    assert "train-000009.tar is not listed in the manifest.json beside it" in caplog.text
