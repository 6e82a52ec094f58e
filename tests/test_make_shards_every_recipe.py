"""make-shards --recipe works with every shipped recipe on a fresh folder: it needs neither the recipe's models nor
its band statistics (a remote-sensing run computes those from the shards on first use)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mmdomain.cli import main
from mmdomain.recipe import load_recipe

from .domain_tasks import ct_slice, multiband_tile, write_dicom, write_geotiff

RECIPES = sorted((Path(__file__).parent.parent / "recipes").rglob("*.yaml"))


def _media(domain: str, folder: Path) -> str:
    """One small synthetic file of the domain's kind; returns its name."""
    rng = np.random.default_rng(0)
    if domain == "remote_sensing":
        write_geotiff(folder / "tile.tif", multiband_tile(rng, 1))  # bands named B02 ... B12, as the recipes select them
        return "tile.tif"
    if domain == "medical":
        write_dicom(folder / "slice.dcm", ct_slice(rng, 0), monochrome1=False, intercept=-1024.0, slope=1.0)
        return "slice.dcm"
    if domain == "audio":
        import soundfile

        soundfile.write(folder / "clip.wav", 0.1 * rng.normal(size=8000).astype(np.float32), 8000)
        return "clip.wav"
    from PIL import Image

    Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(folder / "image.png")
    return "image.png"


@pytest.mark.parametrize("recipe", RECIPES, ids=[f"{p.parent.name}/{p.name}" for p in RECIPES])
def test_make_shards_needs_no_models_and_no_statistics(recipe, tmp_path, monkeypatch):
    import encoders

    import mmdomain.llm

    def refuse(*args, **kwargs):
        raise AssertionError("make-shards loaded a model")

    monkeypatch.setattr(encoders, "create_encoder", refuse)
    monkeypatch.setattr(mmdomain.llm, "load_llm", refuse)
    monkeypatch.chdir(tmp_path)  # a fresh folder: the recipe's relative paths (shards, stats, runs/demo/...) are all absent
    model = load_recipe(recipe).model
    (tmp_path / "media").mkdir()
    name = _media(model.domain.name, tmp_path / "media")
    (tmp_path / "samples.jsonl").write_text(json.dumps({"media": [name], "question": "what is shown ?", "answer": "something"}) + "\n")
    assert main(["-q", "make-shards", "--recipe", str(recipe), "--jsonl", "samples.jsonl", "--media", "media", "--out", "shards"]) == 0
    assert json.loads((tmp_path / "shards" / "manifest.json").read_text())["train"]["total"] == 1
    assert not any(Path(p).exists() for p in ("shards/s2/stats_rgb.json", "shards/s2/stats_6band.json"))
