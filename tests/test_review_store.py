"""The judgements file: appended and fsynced per judgement, media beside it, resumable, one writer at a time, and a
crash's cut-short last line handled without losing a confirmed judgement."""
from __future__ import annotations

import json

import pytest

from mmdomain.review_store import JudgementStore, MediaCopy, ReviewError, media_file_stem, media_folder


def _line(key: str, **extra) -> dict:
    return {"prompt": "<image> where ?", "chosen": "left", "rejected": "right", "judge": "t", "judged_at": "2026-01-01T00:00:00Z",
            "key": key, **extra}


def test_judgements_are_appended_with_their_media_and_read_back_as_judged(tmp_path):
    out = tmp_path / "judgements.jsonl"
    with JudgementStore(out) as store:
        assert store.judged == set() and store.media_dir == tmp_path / "judgements.media"
        written = store.append(_line("train-000000.tar:a"), [MediaCopy("dcm", b"DICM-bytes"), MediaCopy("nii.gz", b"nifti")])
        store.append({**_line("train-000000.tar:b"), "flagged": True}, [])
    stem = media_file_stem("train-000000.tar:a")
    assert written["media"] == [f"{stem}.0.dcm", f"{stem}.1.nii.gz"]
    assert (tmp_path / "judgements.media" / f"{stem}.0.dcm").read_bytes() == b"DICM-bytes"
    lines = [json.loads(raw) for raw in out.read_text().splitlines()]
    assert [line["key"] for line in lines] == ["train-000000.tar:a", "train-000000.tar:b"]
    assert list(lines[0])[:4] == ["media", "prompt", "chosen", "rejected"] and lines[1]["media"] == []
    assert not list((tmp_path / "judgements.media").glob(".*"))  # no temporary file left behind
    with JudgementStore(out) as again:  # a restart: both items are judged, nothing is rewritten
        assert again.judged == {"train-000000.tar:a", "train-000000.tar:b"}
        with pytest.raises(ReviewError, match="judged already"):
            again.append(_line("train-000000.tar:a"), [])
    assert len(out.read_text().splitlines()) == 2


def test_a_line_cut_short_by_a_crash_is_dropped_and_the_next_judgement_starts_a_clean_line(tmp_path, caplog):
    out = tmp_path / "j.jsonl"
    good = "".join(json.dumps(_line(k)) + "\n" for k in ("a", "b"))
    out.write_text(good + json.dumps(_line("c"))[:25])  # killed while line c was being written
    with JudgementStore(out) as store:
        assert store.judged == {"a", "b"}
        assert out.read_text() == good
        store.append(_line("c"), [])
    assert "incomplete last line" in caplog.text
    assert [json.loads(raw)["key"] for raw in out.read_text().splitlines()] == ["a", "b", "c"]


def test_a_complete_last_line_without_its_newline_is_kept(tmp_path):
    out = tmp_path / "j.jsonl"
    out.write_text(json.dumps(_line("a")) + "\n" + json.dumps(_line("b")))
    with JudgementStore(out) as store:
        assert store.judged == {"a", "b"}
        store.append(_line("c"), [])
    assert [json.loads(raw)["key"] for raw in out.read_text().splitlines()] == ["a", "b", "c"]


@pytest.mark.parametrize("bad, problem", [("{not json\n", "line 2 is not JSON"), ('{"prompt": "x"}\n', "line 2 has no item 'key'")])
def test_a_damaged_line_inside_the_file_stops_with_its_number(tmp_path, bad, problem):
    out = tmp_path / "j.jsonl"
    out.write_text(json.dumps(_line("a")) + "\n" + bad + json.dumps(_line("b")) + "\n")
    before = out.read_bytes()
    with pytest.raises(ReviewError, match=problem):
        JudgementStore(out)
    assert out.read_bytes() == before  # nothing repaired or appended on a guess


def test_one_review_writes_a_file_at_a_time(tmp_path):
    out = tmp_path / "j.jsonl"
    first = JudgementStore(out)
    with pytest.raises(ReviewError, match="another `mmdomain review` is writing to"):
        JudgementStore(out)
    first.close()
    JudgementStore(out).close()  # free again once the first one stops


def test_out_must_be_a_file_in_an_existing_folder(tmp_path):
    with pytest.raises(ReviewError, match="is a folder"):
        JudgementStore(tmp_path)
    with pytest.raises(ReviewError, match="does not exist"):
        JudgementStore(tmp_path / "missing" / "j.jsonl")


def test_media_names_are_dotless_and_distinct_for_keys_that_differ_only_in_replaced_characters(tmp_path):
    a, b = media_file_stem("x.tar:a/b"), media_file_stem("x_tar_a_b")
    assert a != b and "." not in a and "/" not in a and a.startswith("x_tar_a_b-")
    assert media_folder(tmp_path / "judgements.jsonl") == tmp_path / "judgements.media"
    assert media_folder(tmp_path / "judgements") == tmp_path / "judgements.media"


def test_a_review_that_never_started_leaves_no_empty_file_but_keeps_one_with_judgements(tmp_path):
    out = tmp_path / "j.jsonl"
    JudgementStore(out).abandon()
    assert not out.exists()
    with JudgementStore(out) as store:
        store.append(_line("a"), [])
    JudgementStore(out).abandon()
    assert len(out.read_text().splitlines()) == 1
