"""A review setting that fits no item (a --composite naming a band the run does not select) stops the review with
its one line, instead of marking every item unreadable one by one and ending with nothing to judge."""
from __future__ import annotations

import numpy as np
import pytest

from mmdomain.builder import build_model, save_pretrained
from mmdomain.domains import build_domain
from mmdomain.spec import ModelSpec

from .domain_tasks import multiband_tile, write_geotiff


def test_a_composite_band_the_run_does_not_select_stops_the_review_naming_the_flag(tmp_path, tiny_llm_dir):
    import json

    from mmdomain.builder import load_pretrained
    from mmdomain.review_answers import Sampling
    from mmdomain.review_items import ReviewData
    from mmdomain.review_session import ReviewSession
    from mmdomain.review_store import JudgementStore, ReviewError
    from mmdomain.shards import make_shards

    media = tmp_path / "media"
    media.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(3):
        write_geotiff(media / f"t{i}.tif", multiband_tile(rng, i % 4))
        rows.append({"id": f"t{i}", "image": f"t{i}.tif", "question": "what land cover is this ?", "answer": "forest"})
    (media / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = ModelSpec.model_validate({
        "encoder": {"name": "tiny-vit", "options": {"image_size": 32, "patch_size": 8, "dim": 32, "channels": 4}},
        "llm": {"path": tiny_llm_dir}, "domain": {"name": "remote_sensing", "options": {"bands": ["B04", "B03", "B02", "B08"]}},
        "max_length": 256,
    })
    make_shards(media / "items.jsonl", media, tmp_path / "shards", prefix="heldout",
                domain=build_domain("remote_sensing", spec.domain.options, raw=True))
    model, processor = build_model(spec)
    checkpoint = save_pretrained(model, processor, tmp_path / "run")
    model, processor = load_pretrained(checkpoint)
    raw = {kind.token: build_domain(kind.domain.name, kind.domain.options, raw=True) for kind in model.spec.kinds()}
    session = ReviewSession(model.eval(), processor, ReviewData(str(tmp_path / "shards" / "heldout-*.tar"), processor),
                            JudgementStore(tmp_path / "j.jsonl"), Sampling(mode="reference", max_new_tokens=2), judge="t",
                            run=str(checkpoint), raw_domains=raw, composite=(5, 1, 0))
    try:
        with pytest.raises(ReviewError, match="--composite names band position 5, but the run selects 4 bands"):
            session.current()
        assert session.unreadable == {}  # not three items "unreadable" for a flag the user can fix
    finally:
        session.close()


@pytest.mark.parametrize("device, words", [("gpu", "--device: 'gpu' is not a device"), ("cuda", "--device: cuda, but torch sees no CUDA GPU")])
def test_a_device_this_machine_lacks_is_one_line_naming_the_flag_before_anything_loads(tmp_path, monkeypatch, capsys, device, words):
    pytest.importorskip("fastapi", reason="the review page needs the serve extra")
    import torch

    from mmdomain.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = main(["review", str(tmp_path / "no-run"), "--data", str(tmp_path / "*.tar"), "--out", str(tmp_path / "j.jsonl"),
                 "--device", device])
    err = capsys.readouterr().err.strip()
    assert code == 2 and words in err and len(err.splitlines()) == 1, err
    assert "internal error" not in err and not (tmp_path / "j.jsonl").exists()
