"""Remote-sensing decoding: band selection by index or name, nodata, statistics, composites, tiling, GSD."""
from __future__ import annotations

import json

import numpy as np
import pytest

from mmdomain.domains import DecodeError, build_domain
from mmdomain.domains.remote_sensing import band_statistics

from .domain_tasks import COVERS, FLOOD_WORDS, WORDS, multiband_tile, train_task, write_flood_task, write_geotiff, write_multiband_task


@pytest.fixture
def tile_file(tmp_path):
    tile = multiband_tile(np.random.default_rng(0), 3)
    write_geotiff(tmp_path / "t.tif", tile)
    return tmp_path / "t.tif", tile


def _decode(path, **options):
    return build_domain("remote_sensing", options).decode(path.name, path.read_bytes())


def test_bands_by_name_and_index_with_nodata(tile_file):
    path, tile = tile_file
    (by_name,) = _decode(path, bands=["B08", "B11"])
    (by_index,) = _decode(path, bands=[3, 4])
    assert by_name.shape == (64, 64, 2) and np.array_equal(by_name, by_index)
    assert np.allclose(by_name[5, 5], tile[5, 5, 3:5] / 65535)  # unscaled bands: uint16 / 65535
    assert (by_name[:2, :2] == 0).all()  # nodata (the file's GDAL_NODATA tag) is zeroed
    with pytest.raises(DecodeError, match="band 'B99' not found; names are \\['B02'"):
        _decode(path, bands=["B99"])


def test_standardised_bands_skip_the_encoders_normalisation(tile_file, tmp_path):
    path, tile = tile_file
    stats = {"mean": [1000.0] * 6, "std": [500.0] * 6}
    domain = build_domain("remote_sensing", {"stats": stats})
    assert domain.output == "standardized"
    (image,) = domain.decode(path.name, path.read_bytes())
    assert np.allclose(image[10, 10], (tile[10, 10] - 1000.0) / 500.0, atol=1e-5) and (image[:2, :2] == 0).all()
    (tmp_path / "stats.json").write_text(json.dumps(stats))
    assert build_domain("remote_sensing", {"stats": str(tmp_path / "stats.json")}).output == "standardized"
    with pytest.raises(FileNotFoundError, match="mmdomain data stats"):
        build_domain("remote_sensing", {"stats": str(tmp_path / "missing.json")})


def test_composite_tiles_and_gsd(tile_file):
    path, _ = tile_file
    (rgb,) = _decode(path, mode="composite", bands=["B04", "B03", "B02"])
    assert rgb.shape == (64, 64, 3) and 0 <= rgb.min() and rgb.max() <= 1
    tiles = _decode(path, tile={"size": 32})
    assert len(tiles) == 4 and tiles[3].shape == (32, 32, 6)
    (coarse,) = _decode(path, gsd=10, target_gsd=20)
    assert coarse.shape == (32, 32, 6)
    with pytest.raises(ValueError, match="exactly three bands"):
        build_domain("remote_sensing", {"mode": "composite"})


def test_tiles_become_separate_media_items(tile_file):
    from mmdomain.domains import decode_media

    path, _ = tile_file
    domain = build_domain("remote_sensing", {"tile": {"size": 32}})
    conv = [{"role": "user", "content": "<image> what land cover is this ?"}, {"role": "assistant", "content": "urban"}]
    new_conv, media = decode_media(domain, conv, [(path.name, path.read_bytes())])
    assert len(media) == 4 and new_conv[0]["content"] == "<image> <image> <image> <image> what land cover is this ?"


def test_band_statistics_and_the_cli(tmp_path, tiny_llm_dir):
    from mmdomain.cli import main

    write_multiband_task(tmp_path, 12, 2)
    domain = build_domain("remote_sensing", {})
    files = sorted((tmp_path / "media").glob("train-*.tif"))
    stats = band_statistics(domain, ((f.name, f.read_bytes()) for f in files))
    stacked = np.stack([build_domain("remote_sensing", {}).read_bands(f.name, f.read_bytes())[0] for f in files])
    keep = np.ones(stacked.shape[1:3], bool)
    keep[:2, :2] = False  # the nodata corner is excluded
    valid = stacked[:, keep]
    assert np.allclose(stats["mean"], valid.reshape(-1, 6).mean(0), rtol=1e-4)
    assert np.allclose(stats["std"], valid.reshape(-1, 6).std(0, ddof=1), rtol=1e-3)

    recipe = {"model": {"encoder": {"name": "tiny-vit", "options": {"channels": 6}}, "llm": {"path": tiny_llm_dir},
                        "domain": {"name": "remote_sensing", "options": {"stats": str(tmp_path / "stats.json")}}},
              "data": {"train": str(tmp_path / "shards" / "*.tar")}, "optim": {"max_steps": 1}, "output_dir": str(tmp_path / "run")}
    (tmp_path / "r.yaml").write_text(json.dumps(recipe))
    # Shards from the recipe before its statistics exist: they are computed from these very shards (make-shards used
    # to demand the stats file, and `data stats` the shards).
    assert main(["-q", "make-shards", "--jsonl", str(tmp_path / "tif" / "train.jsonl"), "--media", str(tmp_path / "media"),
                 "--out", str(tmp_path / "shards"), "--recipe", str(tmp_path / "r.yaml")]) == 0
    assert main(["-q", "data", "stats", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "stats.json")]) == 0
    written = json.loads((tmp_path / "stats.json").read_text())
    assert np.allclose(written["mean"], stats["mean"]) and written["files"] == 12
    assert main(["-q", "run", str(tmp_path / "r.yaml")]) == 0  # the recipe trains from the written statistics


@pytest.mark.slow
def test_non_rgb_bands_make_land_cover_learnable(tmp_path):
    """Classes differ only in NIR and SWIR: all six bands through a 6-channel encoder learn them; an RGB picture
    of the same tiles cannot."""
    from mmdomain.tiny_models import write_tiny_llm

    write_multiband_task(tmp_path, 1200, 200)
    llm = str(write_tiny_llm(tmp_path / "llm", WORDS, hidden=128, ffn=256))
    domain = build_domain("remote_sensing", {})
    files = sorted((tmp_path / "media").glob("train-*.tif"))[:300]
    stats = band_statistics(domain, ((f.name, f.read_bytes()) for f in files))
    adapted = train_task(tmp_path / "tif", tmp_path / "media", tmp_path / "adapted", llm, steps=250, channels=6,
                         domain={"name": "remote_sensing", "options": {"stats": {"mean": stats["mean"], "std": stats["std"]}}})
    naive = train_task(tmp_path / "naive", tmp_path / "media", tmp_path / "naive", llm, domain={"name": "generic"}, channels=3, steps=250)
    print(f"6-band land cover ({len(COVERS)} classes): remote-sensing adapter {adapted:.3f}, naive RGB path {naive:.3f}")
    assert adapted >= 0.9
    assert naive <= 0.4


def test_a_run_computes_missing_statistics_and_refuses_other_bands(tmp_path, tiny_llm_dir, caplog):
    import logging

    from mmdomain.band_stats import BandStatsError
    from mmdomain.cli import main
    from mmdomain.recipe import load_recipe
    from mmdomain.train import train

    write_multiband_task(tmp_path, 6, 2)
    stats_path = tmp_path / "shards" / "stats.json"
    recipe = {"model": {"encoder": {"name": "tiny-vit", "options": {"channels": 6}}, "llm": {"path": tiny_llm_dir},
                        "domain": {"name": "remote_sensing", "options": {"bands": ["B02", "B03", "B04", "B08", "B11", "B12"],
                                                                         "stats": str(stats_path)}}},
              "data": {"train": str(tmp_path / "shards" / "train-*.tar")}, "optim": {"max_steps": 1}, "output_dir": str(tmp_path / "run")}
    (tmp_path / "r.yaml").write_text(json.dumps(recipe))
    shard_args = ["-q", "make-shards", "--jsonl", str(tmp_path / "tif" / "train.jsonl"), "--media", str(tmp_path / "media"),
                  "--out", str(tmp_path / "shards"), "--recipe", str(tmp_path / "r.yaml")]
    assert main(shard_args) == 0
    with caplog.at_level(logging.INFO, logger="mmdomain.band_stats"):
        train(load_recipe(tmp_path / "r.yaml"))
    lines = [r.getMessage() for r in caplog.records if r.name == "mmdomain.band_stats"]
    assert len(lines) == 1 and "did not exist; computed from 6 files" in lines[0]
    written = json.loads(stats_path.read_text())
    files = sorted((tmp_path / "media").glob("train-*.tif"))
    expected = band_statistics(build_domain("remote_sensing", {}), ((f.name, f.read_bytes()) for f in files))
    assert np.allclose(written["mean"], expected["mean"]) and written["shards"][0][0] == "train-000000.tar"
    assert not list(stats_path.parent.glob(".*.tmp"))  # written under a temporary name, then renamed

    # Other shards than the statistics came from (a later stage's data, shards rebuilt): used as they are, with a
    # warning naming them, since runs trained with these numbers depend on them.
    write_multiband_task(tmp_path, 9, 2, seed=1)
    assert main([*shard_args, "--overwrite"]) == 0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mmdomain.band_stats"):
        assert train(load_recipe(tmp_path / "r.yaml", ["overwrite=true"]))["steps"] == 1
    assert "computed from 1 training shards" in caplog.text and "differing: train-000000.tar" in caplog.text
    assert json.loads(stats_path.read_text()) == written  # never rewritten under the runs that used it
    # Other bands than the statistics were made for: refused too.
    with pytest.raises(BandStatsError, match="computed for the band options"):
        train(load_recipe(tmp_path / "r.yaml", ["overwrite=true", "model.domain.options.bands=[B04,B03,B02,B08,B11,B12]"]))
    assert main(["-q", "data", "stats", str(tmp_path / "r.yaml"), "--out", str(stats_path)]) == 0
    assert train(load_recipe(tmp_path / "r.yaml", ["overwrite=true"]))["steps"] == 1


def test_acquisitions_are_put_in_date_order_with_their_dates_in_the_prompt(tmp_path):
    import tarfile

    from mmdomain.shards import ShardError, make_shards

    media = tmp_path / "media"
    media.mkdir()
    rng = np.random.default_rng(0)
    for name, cover in (("late.tif", 0), ("early.tif", 2), ("mid.tif", 1)):
        write_geotiff(media / name, multiband_tile(rng, cover))
    rows = [{"id": "place", "media": ["late.tif", "early.tif", "mid.tif"], "dates": ["2022-06-01", "2021-05-01", "2021-11-30T10:00:00Z"],
             "question": "did the cover change ?", "answer": "yes"},
            {"id": "marked", "media": ["late.tif", "early.tif"], "dates": ["2022-06-01", "2021-05-01"],
             "conversations": [{"role": "user", "content": "compare <image> with <image> : did it change ?"}, {"role": "assistant", "content": "no"}]}]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    make_shards(tmp_path / "s.jsonl", media, tmp_path / "shards", domain=build_domain("remote_sensing", {}))
    with tarfile.open(tmp_path / "shards" / "train-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    sample = json.loads(members["place.json"])
    assert sample["conversations"][0]["content"] == ("<image> (2021-05-01) <image> (2021-11-30T10:00:00Z) <image> (2022-06-01) "
                                                     "did the cover change ?")
    assert sample["acquisition_dates"] == ["2021-05-01", "2021-11-30T10:00:00Z", "2022-06-01"]
    assert [members[f"place.{i}.tif"] for i in range(3)] == [(media / n).read_bytes() for n in ("early.tif", "mid.tif", "late.tif")]
    marked = json.loads(members["marked.json"])
    assert marked["conversations"][0]["content"] == "compare <image> (2021-05-01) with <image> (2022-06-01) : did it change ?"
    assert members["marked.0.tif"] == (media / "early.tif").read_bytes()
    # Read back for training, each marker carries its date once (the stored sample is normalised again when read).
    from mmdomain.data import FailureBudget, iter_records

    read = {r.key.split(":")[-1]: r for r in iter_records([str(tmp_path / "shards" / "train-000000.tar")], build_domain("remote_sensing", {}),
                                                        failures=FailureBudget(0))}
    assert read["marked"].conversations[0]["content"] == "compare <image> (2021-05-01) with <image> (2022-06-01) : did it change ?"
    assert read["place"].conversations[0]["content"].count("(2021-05-01)") == 1 and len(read["place"].media) == 3

    for dates, message in ((["2022-06-01", "last spring"], r"s.jsonl:1: dates\[1\] 'last spring' is not an ISO date"),
                           (["2022-06-01"], r"s.jsonl:1: 1 dates for 2 media items")):
        (tmp_path / "s.jsonl").write_text(json.dumps({**rows[0], "media": ["late.tif", "early.tif"], "dates": dates}) + "\n")
        with pytest.raises(ShardError, match=message):
            make_shards(tmp_path / "s.jsonl", media, tmp_path / "bad", domain=build_domain("remote_sensing", {}), overwrite=True)


@pytest.mark.slow
def test_dated_acquisitions_make_the_flood_date_learnable(tmp_path):
    """Which of two acquisitions of a place is flooded, the earlier or the later? With dates, make-shards puts the
    images in date order (dates in the prompt) and the answer is learnt; the same images as an undated set, in the
    order a folder happens to list them, leave the model at chance. The band statistics come from the shards (the
    run computes the missing stats file)."""
    import time

    from mmdomain.tiny_models import write_tiny_llm

    started = time.perf_counter()
    write_flood_task(tmp_path, 320, 100)
    llm = str(write_tiny_llm(tmp_path / "llm", FLOOD_WORDS, hidden=128, ffn=256))
    common = dict(llm_dir=llm, channels=6, steps=100, patch_size=16)
    dated = train_task(tmp_path / "dated", tmp_path / "media", tmp_path / "with_dates", **common,
                       domain={"name": "remote_sensing", "options": {"stats": str(tmp_path / "with_dates" / "stats.json")}})
    assert json.loads((tmp_path / "with_dates" / "stats.json").read_text())["files"] == 640
    undated = train_task(tmp_path / "undated", tmp_path / "media", tmp_path / "without_dates", **common,
                         domain={"name": "remote_sensing", "options": {"stats": str(tmp_path / "without_dates" / "stats.json")}})
    print(f"flood date (2 choices): dated, ordered {dated:.3f}; undated set {undated:.3f}; {time.perf_counter() - started:.0f} s")
    assert dated >= 0.9
    assert undated <= 0.65


def _write_sar(path, power):
    import tifffile

    meta = "<GDALMetadata>" + "".join(f'<Item name="DESCRIPTION" sample="{i}" role="description">{n}</Item>' for i, n in enumerate(["VV", "VH"])) + "</GDALMetadata>"
    tifffile.imwrite(path, power.astype(np.float32), planarconfig="contig", photometric="minisblack",
                     extratags=[(42112, "s", 0, meta, True), (42113, "s", 0, "-9999", True)])


def test_sar_linear_power_decodes_to_db_and_gets_robust_statistics_in_db(tmp_path):
    rng = np.random.default_rng(0)
    # Speckle: single-look intensity is exponential around the mean backscatter (VV -8 dB, VH -15 dB).
    power = rng.exponential(1.0, (64, 64, 2)) * 10 ** (np.array([-8.0, -15.0]) / 10)
    power[0, 0] = [0.0, 1e-9]  # no return: floored at sar_floor_db
    power[1, 1] = -9999  # nodata
    _write_sar(tmp_path / "s1.tif", power)
    data = (tmp_path / "s1.tif").read_bytes()
    domain = build_domain("remote_sensing", {"bands": ["VV", "VH"], "band_kinds": ["sar_linear", "sar_linear"]})
    db, valid = domain.read_bands("s1.tif", data)
    assert np.allclose(db[5, 5], 10 * np.log10(power[5, 5]), atol=1e-4)
    assert np.allclose(db[0, 0], [-50.0, -50.0]) and not valid[1, 1].any()
    (unit,) = domain.decode("s1.tif", data)
    assert np.allclose(unit[5, 5], np.clip((10 * np.log10(power[5, 5]) + 30) / 35, 0, 1), atol=1e-5) and (unit[1, 1] == 0).all()

    stats = band_statistics(domain, [("s1.tif", data)])
    keep = valid[..., 0]
    for c in range(2):
        values = 10 * np.log10(np.maximum(power[..., c][keep], 1e-5))
        median = np.median(values)
        assert abs(stats["mean"][c] - median) < 0.01  # the median of dB, not the mean of linear power
        assert abs(stats["std"][c] - 1.4826 * np.median(np.abs(values - median))) < 0.01
    assert stats["units"] == ["dB (median, 1.4826 MAD)"] * 2
    # Not the dB of the linear mean: exponential speckle's median is ln 2 of its mean, 1.6 dB lower.
    assert 10 * np.log10(power[..., 0][keep].mean()) - stats["mean"][0] > 1.5
    standardised = build_domain("remote_sensing", {"bands": ["VV", "VH"], "band_kinds": ["sar_linear", "sar_linear"],
                                                    "stats": {"mean": stats["mean"], "std": stats["std"]}})
    (image,) = standardised.decode("s1.tif", data)
    assert np.allclose(image[5, 5], (db[5, 5] - np.array(stats["mean"])) / np.array(stats["std"]), atol=1e-4)

    # A median speckle filter (in dB): one bright speckle in a flat field is removed, nodata stays out of the windows.
    flat = np.full((16, 16, 2), 0.1)
    flat[8, 8] = 10.0
    flat[3, 3] = -9999
    _write_sar(tmp_path / "flat.tif", flat)
    filtered = build_domain("remote_sensing", {"band_kinds": ["sar_linear", "sar_db"], "speckle_filter": 3})
    db, valid = filtered.read_bands("flat.tif", (tmp_path / "flat.tif").read_bytes())
    assert np.allclose(db[8, 8, 0], -10.0) and np.allclose(db[2:5, 2:5, 0][valid[2:5, 2:5, 0]], -10.0)
    with pytest.raises(ValueError, match="band_kinds names 1 kinds for 2 bands"):
        build_domain("remote_sensing", {"bands": ["VV", "VH"], "band_kinds": ["sar_linear"]})


def test_a_sentinel2_band_set_at_10_20_60_m_decodes_onto_the_10_m_grid(tmp_path):
    import random
    import tarfile

    import tifffile

    from mmdomain.domains.sentinel2 import S2_ORDER
    from mmdomain.shards import make_shards

    resolution = {"B02": 10, "B03": 10, "B04": 10, "B08": 10, "B05": 20, "B06": 20, "B07": 20, "B8A": 20, "B11": 20, "B12": 20,
                  "B01": 60, "B09": 60, "B10": 60}
    folder = tmp_path / "media" / "S2A_T32TQM_20210501"
    folder.mkdir(parents=True)
    files = []
    for k, band in enumerate(S2_ORDER):
        side = 600 // resolution[band]  # 60, 30 or 10 pixels: the same 600 m square
        values = np.full((side, side), 1000 + 100 * k, np.uint16)
        if band == "B11":
            values[3, 3] = 0  # nodata at 20 m: the 2 x 2 pixels it covers at 10 m, and nothing around them
        if band == "B01":
            values[:] = 1000 + 10 * np.arange(side)  # a ramp along x: bilinear resampling reproduces it exactly inside
        files.append(f"T32TQM_20210501T101031_{band}_{resolution[band]}m.tif")
        tifffile.imwrite(folder / files[-1], values, extratags=[(42113, "s", 0, "0", True)])
    scl = np.where(np.add.outer(np.arange(30), np.arange(30)) % 2 == 0, 4, 6).astype(np.uint8)  # classes: vegetation / water
    tifffile.imwrite(folder / "T32TQM_20210501T101031_SCL_20m.tif", scl)
    files.append("T32TQM_20210501T101031_SCL_20m.tif")
    random.Random(0).shuffle(files)  # stored in any order: the band names decide
    row = {"id": "tile", "media": [[f"S2A_T32TQM_20210501/{f}" for f in files]], "question": "what land cover is this ?", "answer": "crop"}
    (tmp_path / "s.jsonl").write_text(json.dumps(row) + "\n")
    make_shards(tmp_path / "s.jsonl", tmp_path / "media", tmp_path / "shards", domain=build_domain("remote_sensing", {}))
    with tarfile.open(tmp_path / "shards" / "train-000000.tar") as tar:
        data = tar.extractfile("tile.0.tif.tar").read()

    domain = build_domain("remote_sensing", {"bands": S2_ORDER})
    bands, valid = domain.read_bands("0.tif.tar", data)
    assert bands.shape == (60, 60, 13)
    for k, band in enumerate(S2_ORDER):
        if band not in ("B01", "B11"):
            assert np.allclose(bands[..., k], 1000 + 100 * k, atol=1e-3), band
    b11 = S2_ORDER.index("B11")
    assert not valid[6:8, 6:8, b11].any() and valid[..., b11].sum() == 3600 - 4
    assert np.allclose(bands[..., b11][valid[..., b11]], 1000 + 100 * b11, atol=1e-3)  # nodata did not blend into its neighbours
    x = np.arange(60)
    inside = (x >= 3) & (x < 57)  # source coordinate (x + 0.5) / 6 - 0.5 within the 10 source pixels
    assert np.allclose(bands[0, inside, 0], 1000 + 10 * ((x[inside] + 0.5) / 6 - 0.5), atol=1e-3)

    everything, _ = build_domain("remote_sensing", {}).read_bands("0.tif.tar", data)
    assert everything.shape == (60, 60, 14)  # the 13 bands in Sentinel-2 order, then SCL
    scl_up = everything[..., 13]
    assert set(np.unique(scl_up)) == {4.0, 6.0} and np.array_equal(scl_up[::2, ::2], scl)  # nearest: no blended class
    (image,) = domain.decode("0.tif.tar", data)
    assert image.shape == (60, 60, 13) and np.isclose(image[30, 30, 1], 1100 / 65535)
