"""make-shards and the shard reader: input forms, manifest, atomic writes, named errors, budgets, order, splitting."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmdomain.data import DataError, FailureBudget, SampleFormat, ShardCatalog, expand_shards, iter_records
from mmdomain.domains import build_domain
from mmdomain.builder import build_model
from mmdomain.shards import ShardError, make_shards, read_manifest
from mmdomain.spec import ModelSpec
from mmdomain.train_stream import BatchStream, Position, TrainBatches

from .conftest import write_tar


GENERIC = build_domain("generic")


def _media(tmp_path, n):
    media = tmp_path / "media"
    media.mkdir(exist_ok=True)
    for i in range(n):
        Image.fromarray((np.random.default_rng(i).random((32, 32)) * 255).astype(np.uint8)).save(media / f"{i}.png")
    return media


def _jsonl(tmp_path, rows, name="samples.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_make_shards_accepts_all_forms_and_writes_manifest(tmp_path):
    media = _media(tmp_path, 5)
    rows = [
        {"id": "a.1", "image": "0.png", "question": "where is the lesion ?", "answer": "left", "choices": ["left", "right"]},
        {"image": "1.png", "caption": "a scan"},
        {"media": ["2.png", "3.png"], "conversations": [{"role": "user", "content": "<image> <image> compare"}, {"role": "assistant", "content": "same"}]},
        {"image": "4.png", "conversations": [{"from": "human", "value": "where ?"}, {"from": "gpt", "value": "left"}]},
    ]
    manifest = make_shards(_jsonl(tmp_path, rows), media, tmp_path / "shards", samples_per_shard=3)
    assert manifest["total"] == 4 and [s["samples"] for s in manifest["shards"]] == [3, 1]
    assert read_manifest(tmp_path / "shards")["train"] == manifest
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["manifest.json", "train-000000.tar", "train-000001.tar"]
    records = list(iter_records(expand_shards(str(tmp_path / "shards" / "train-*.tar")), GENERIC, failures=FailureBudget(0)))
    assert [r.key for r in records] == ["train-000000.tar:a_1", "train-000000.tar:train-00000002", "train-000000.tar:train-00000003", "train-000001.tar:train-00000004"]
    assert records[0].choices == ["left", "right"] and records[0].conversations[0]["content"] == "<image> where is the lesion ?"
    assert records[1].conversations[0]["content"] == "<image> Describe the image."
    assert len(records[2].media) == 2 and records[2].media[0].shape == (32, 32)
    assert records[3].conversations[1] == {"role": "assistant", "content": "left"}


@pytest.mark.parametrize("row,message", [
    ({"image": "0.png", "question": "q"}, r"samples.jsonl:1: a sample needs 'conversations', or 'question' \+ 'answer'"),
    ({"image": "missing.png", "caption": "c"}, r"samples.jsonl:1: media file .*missing.png' does not exist"),
    ({"image": "0.pkl", "caption": "c"}, r"samples.jsonl:1: media '0.pkl' has type .pkl; the generic domain allows"),
    ({"image": "0.png", "question": "q", "answer": "up", "choices": ["left"]}, r"final assistant answer 'up' is not among choices"),
    ({"media": ["0.png"], "conversations": [{"role": "user", "content": "<image> <image>"}, {"role": "assistant", "content": "x"}]}, "2 '<image>' markers but 1 media"),
])
def test_make_shards_names_bad_input(tmp_path, row, message):
    media = _media(tmp_path, 1)
    with pytest.raises(ShardError, match=message):
        make_shards(_jsonl(tmp_path, [row]), media, tmp_path / "shards")
    assert not list((tmp_path / "shards").glob("*.tar")) and not list((tmp_path / "shards").glob(".*tmp"))


def test_make_shards_refuses_to_mix_with_existing_shards(tmp_path):
    media = _media(tmp_path, 1)
    src = _jsonl(tmp_path, [{"image": "0.png", "caption": "c"}])
    make_shards(src, media, tmp_path / "shards")
    with pytest.raises(ShardError, match="already holds 1 'train-\\*.tar' shards"):
        make_shards(src, media, tmp_path / "shards")
    make_shards(src, media, tmp_path / "shards", overwrite=True)


def _png():
    buf = io.BytesIO()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


GOOD = json.dumps({"conversations": [{"role": "user", "content": "<image> where ?"}, {"role": "assistant", "content": "left"}]}).encode()


def test_reader_counts_and_names_bad_samples_then_stops(tmp_path):
    shard = tmp_path / "s-000000.tar"
    write_tar(shard, [
        ("ok.json", GOOD), ("ok.0.png", _png()),
        ("evil.json", GOOD), ("evil.0.pickle", b"\x80\x04K\x01."),           # not an allowed decoder
        ("nofield.json", json.dumps({"caption": "x"}).encode()),               # missing field
        ("broken.json", GOOD), ("broken.0.png", b"not a png"),
    ])
    budget = FailureBudget(3)
    records = list(iter_records([str(shard)], GENERIC, failures=budget))
    assert [r.key for r in records] == ["s-000000.tar:ok"]
    assert budget.total == 3
    assert "no 'conversations' in a json member" in budget.failures["s-000000.tar:nofield"][0]
    assert "'<image>' markers" not in budget.failures["s-000000.tar:evil"][0]
    with pytest.raises(DataError, match=r"(?s)3 samples failed, over data.decode_error_budget=2.*s-000000.tar:broken"):
        list(iter_records([str(shard)], GENERIC, failures=FailureBudget(2)))


def test_expand_shards_errors_and_braces(tmp_path):
    for i in range(3):
        write_tar(tmp_path / f"t-{i:06d}.tar", [("k.json", GOOD)])
    assert len(expand_shards(str(tmp_path / "t-{000000..000002}.tar"))) == 3
    with pytest.raises(DataError, match="matches no file"):
        expand_shards(str(tmp_path / "nothing-*.tar"))


@pytest.fixture
def stream_parts(tmp_path, tiny_llm_dir):
    media = _media(tmp_path, 24)
    rows = [{"id": f"s{i}", "image": f"{i}.png", "question": "where ?", "answer": "left"} for i in range(24)]
    make_shards(_jsonl(tmp_path, rows), media, tmp_path / "shards", samples_per_shard=6)
    spec = ModelSpec.model_validate({"encoder": {"name": "tiny-vit", "options": {"image_size": 32, "channels": 1}}, "llm": {"path": tiny_llm_dir}})
    _, proc = build_model(spec)
    return expand_shards(str(tmp_path / "shards" / "*.tar")), proc


def _batches(shards, proc, *, seed=0, epoch=0, workers=0, shuffle=8, limit=None, batch_size=4, rank=0, world=1, start=0):
    """The keys of each batch one epoch yields (from batch ``start``), through the DataLoader as training reads it."""
    failures = FailureBudget(0)
    dataset = TrainBatches(ShardCatalog(shards, failures), proc, layout=SampleFormat(), seed=seed, shuffle_buffer=shuffle, limit=limit,
                           batch_size=batch_size, rank=rank, world=world)
    stream = BatchStream(dataset, num_workers=workers, failures=failures, position=Position(epoch, start))
    out = []
    while stream.position.epoch == epoch and stream.position.batch < dataset.batches_per_epoch():
        out.append(stream.next_batch()[1]["keys"])
    return out


def _keys(*args, **kwargs):
    return [k for batch in _batches(*args, **kwargs) for k in batch]


def test_order_is_seeded_and_reshuffled_per_epoch(stream_parts):
    shards, proc = stream_parts
    first = _keys(shards, proc)
    assert first == _keys(shards, proc) and sorted(first) == sorted(_keys(shards, proc, seed=1))
    assert first != _keys(shards, proc, seed=1) and first != _keys(shards, proc, epoch=1)
    assert len(first) == 24 == len(set(first))


def test_workers_give_the_same_batches_in_the_same_order(stream_parts):
    """Batches, not samples, are spread over workers and come back in order: 0 or 2 workers train on the same data."""
    shards, proc = stream_parts
    assert _batches(shards, proc, workers=2) == _batches(shards, proc, workers=0)
    assert _batches(shards, proc, workers=2, shuffle=0) == _batches(shards, proc, workers=0, shuffle=0)
    # Starting at batch 3 (a resume) reads exactly the rest, with any worker count.
    assert _batches(shards, proc, workers=2, start=3) == _batches(shards, proc)[3:]


def test_rank_splitting(stream_parts):
    shards, proc = stream_parts
    seen = [_keys(shards, proc, rank=rank, world=2) for rank in range(2)]
    assert len(seen[0]) == len(seen[1]) == 12 and not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(_keys(shards, proc))


def test_limit_is_global_and_keeps_the_same_subset_every_epoch(stream_parts):
    shards, proc = stream_parts
    a, b = _keys(shards, proc, limit=10), _keys(shards, proc, limit=10, epoch=1, workers=2)
    assert len(a) == 10 and sorted(a) == sorted(b) and a != b
    assert len(_keys(shards, proc, limit=10, workers=2)) == 10  # not 10 per worker
    failures = FailureBudget(0)
    batch = TrainBatches(ShardCatalog(shards, failures), proc, layout=SampleFormat(), seed=0, shuffle_buffer=4, limit=10, batch_size=4)
    assert torch.is_tensor(next(iter(batch))["batch"]["media"][0].values)


def test_plain_image_text_shards_with_named_members(tmp_path):
    """img2dataset-style shards (key.jpg + key.txt, no conversations) read through data.media_keys / caption_key."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="JPEG")
    shard = tmp_path / "laion-000000.tar"
    write_tar(shard, [("000001.jpg", buf.getvalue()), ("000001.txt", b"a chest x-ray\n"), ("000001.json", b'{"url": "x"}'),
                       ("000002.txt", b"no image here")])
    failures = FailureBudget(1)
    layout = SampleFormat(media_keys=("jpg",), caption_key="txt", caption_prompt="describe .")
    (record,) = list(iter_records([str(shard)], GENERIC, failures=failures, layout=layout))
    assert record.conversations == [{"role": "user", "content": "<image> describe ."}, {"role": "assistant", "content": "a chest x-ray"}]
    assert record.media[0].shape == (8, 8, 3)
    assert failures.total == 1 and "no member 'jpg'" in failures.failures["laion-000000.tar:000002"][0]


def test_a_marker_of_another_kind_is_refused_not_left_in_the_text(tmp_path, capsys):
    """make-shards for <image> used to turn "<audio> is there a murmur?" into "<image> <audio> is there a murmur?"."""
    from mmdomain.cli import main

    (tmp_path / "media").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "media" / "a.png")
    (tmp_path / "s.jsonl").write_text(json.dumps({"image": "a.png", "question": "<audio> murmur?", "answer": "yes"}) + "\n")
    args = ["make-shards", "--jsonl", str(tmp_path / "s.jsonl"), "--media", str(tmp_path / "media"), "--out", str(tmp_path / "out")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "s.jsonl:1: the question holds the marker '<audio>'" in err and "--media-token '<audio>'" in err
    assert main([*args, "--media-token", "<audio>"]) == 0  # the marker named: the PNG is that kind's media
    # Such words elsewhere are text: an answer about the HTML element, a question whose own marker is there.
    rows = [{"image": "a.png", "question": "<image> which tag plays sound?", "answer": "the <audio> element"},
            {"question": "what does <video> do?", "answer": "it shows a film"},
            {"image": "a.png", "caption": "a screenshot of a <video> player"}]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main([*args, "--overwrite"]) == 0
    assert main([*args, "--overwrite", "--recipe", str(tmp_path / "r.yaml"), "--media-token", "<audio>"]) == 2
    assert "--media-token and --recipe both name the media marker" in capsys.readouterr().err


def test_data_workers_are_capped_at_the_usable_cpus(monkeypatch):
    """Shipped recipes asked for 4 workers where torch warns that 2 is the most the machine runs; the batches do not
    depend on the worker count, so the cap only saves contention."""
    import os

    from mmdomain.train_stream import usable_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert usable_workers(4) == 2 and usable_workers(2) == 2 and usable_workers(0) == 0
