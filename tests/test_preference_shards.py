"""make-shards on preference pairs (the review page's output): stored so training reads (prompt, chosen, rejected)
with the media; flagged lines skipped and counted; a pair that states no preference is refused by line."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mmdomain.cli import main
from mmdomain.data import FailureBudget, expand_shards, iter_records
from mmdomain.domains import build_domain
from mmdomain.shards import ShardError, make_shards


def _media(root):
    (root / "media").mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 16), 40 * i, dtype=np.uint8)).save(root / "media" / f"{i}.png")


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_pairs_are_stored_and_read_back_with_their_media(tmp_path, caplog):
    _media(tmp_path)
    _write(tmp_path / "judged.jsonl", [
        {"media": ["0.png"], "prompt": "where is the lesion ?", "chosen": "left", "rejected": "right", "judge": "dr a", "time": "t"},
        {"media": ["1.png"], "prompt": "<image> is it bright ?", "chosen": "yes", "rejected": "no"},
        {"media": ["2.png"], "prompt": "where ?", "flagged": True, "judge": "dr a"},
    ])
    assert main(["make-shards", "--jsonl", str(tmp_path / "judged.jsonl"), "--media", str(tmp_path / "media"), "--out", str(tmp_path / "s"),
                 "--prefix", "pairs"]) == 0
    assert "skipped 1 flagged lines" in caplog.text
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())["pairs"]
    assert manifest["total"] == 2 and manifest["flagged_skipped"] == 1
    records = list(iter_records(expand_shards(str(tmp_path / "s" / "pairs-*.tar")), build_domain("generic"), failures=FailureBudget(0)))
    assert [(r.conversations[-1]["content"], r.rejected) for r in records] == [("left", "right"), ("yes", "no")]
    assert records[0].conversations[0]["content"] == "<image> where is the lesion ?" and len(records[0].media) == 1


@pytest.mark.parametrize("row, message", [
    ({"media": ["0.png"], "prompt": "where ?", "chosen": "left"}, "rejected missing or empty"),
    ({"media": ["0.png"], "prompt": "where ?", "chosen": "left", "rejected": " left "}, "chosen and rejected are the same answer"),
    ({"media": ["0.png"], "prompt": "where ?", "chosen": "left", "rejected": "<image> right"}, "rejected answer holds a media marker"),
])
def test_bad_pairs_are_refused_by_line(tmp_path, row, message):
    _media(tmp_path)
    _write(tmp_path / "p.jsonl", [row])
    with pytest.raises(ShardError, match=f"p.jsonl:1: .*{message}"):
        make_shards(tmp_path / "p.jsonl", tmp_path / "media", tmp_path / "s")


def test_only_flagged_lines_is_an_error_that_says_so(tmp_path):
    _media(tmp_path)
    _write(tmp_path / "p.jsonl", [{"media": ["0.png"], "prompt": "where ?", "flagged": True}])
    with pytest.raises(ShardError, match=r"holds no samples \(only 1 flagged lines\)"):
        make_shards(tmp_path / "p.jsonl", tmp_path / "media", tmp_path / "s")
