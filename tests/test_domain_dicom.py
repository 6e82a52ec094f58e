"""DICOM display fidelity: enhanced multi-frame functional groups, VOI LUT Sequence, SIGMOID windows, palette colour."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

from mmdomain.domains import build_domain
from mmdomain.domains.dicom_attributes import ITEM_KEYWORDS, PIXEL_KEYWORDS
from mmdomain.domains.medical import PRESETS

from .domain_tasks import ct_slice, write_dicom, write_enhanced_ct


def _decode(path: Path, **options) -> list[np.ndarray]:
    return build_domain("medical", options).decode(path.name, path.read_bytes())


def _linear(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    return np.clip((hu - (center - 0.5)) / (width - 1) + 0.5, 0, 1)


def _stored_hu(hu: np.ndarray, intercept: float, slope: float) -> np.ndarray:
    """The HU a file holds after ``write_enhanced_ct`` rounds them to stored integers."""
    return np.round((hu - intercept) / slope) * slope + intercept


def _frames(seed: int = 0, n: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [ct_slice(rng, i % 4) for i in range(n)]


def test_enhanced_ct_rescale_is_read_from_the_per_frame_groups(tmp_path):
    """Each frame has its own intercept/slope, only inside PerFrameFunctionalGroupsSequence: every frame decodes to
    its HU (today's top-level-only path would window the raw stored values)."""
    hu = _frames()
    rescales = [(-3000.0, 1.0), (-1024.0, 2.0), (-2048.0, 1.0)]
    write_enhanced_ct(tmp_path / "e.dcm", hu, rescales=rescales)
    assert "RescaleIntercept" not in dcmread(tmp_path / "e.dcm")
    for index in range(3):
        (lung,) = _decode(tmp_path / "e.dcm", window="lung", frame=index)
        assert np.allclose(lung, _linear(_stored_hu(hu[index], *rescales[index]), *PRESETS["lung"]), atol=1e-5), f"frame {index}"
    (middle,) = _decode(tmp_path / "e.dcm", window="soft_tissue")
    assert np.allclose(middle, _linear(_stored_hu(hu[1], *rescales[1]), *PRESETS["soft_tissue"]), atol=1e-5)


def test_enhanced_ct_shared_rescale_and_window_give_the_file_window(tmp_path):
    hu = _frames(1)
    write_enhanced_ct(tmp_path / "e.dcm", hu, shared_rescale=(-1024.0, 1.0), window=(40.0, 80.0))
    (image,) = _decode(tmp_path / "e.dcm")  # window: file -> the shared Frame VOI LUT group's 40/80
    assert np.allclose(image, _linear(_stored_hu(hu[1], -1024.0, 1.0), 40.0, 80.0), atol=1e-5)


def _keywords(ds, path: str = "") -> set[str]:
    """Every attribute keyword at any depth, as 'Parent>Child' paths."""
    found = set()
    for elem in ds:
        where = f"{path}>{elem.keyword or elem.tag}" if path else (elem.keyword or str(elem.tag))
        found.add(where)
        if elem.VR == "SQ":
            for item in elem.value:
                found |= _keywords(item, where)
    return found


def test_enhanced_ct_survives_shards_with_only_pixel_describing_groups(tmp_path):
    """make-shards -> shard member -> decode gives the source's HU picture; the stored file keeps the pixel-describing
    functional groups and nothing else (no Frame Content datetimes, private tags, explanations, UIDs, names)."""
    from mmdomain.shards import make_shards

    media = tmp_path / "media"
    media.mkdir()
    hu = _frames(2)
    write_enhanced_ct(media / "e.dcm", hu, rescales=[(-3000.0, 1.0), (-2048.0, 1.0), (-1024.0, 1.0)], window=(40.0, 80.0),
                      patient="Doe^Jane^Secretname")
    (tmp_path / "s.jsonl").write_text(json.dumps({"id": "e", "image": "e.dcm", "question": "where ?", "answer": "left"}) + "\n")
    domain = build_domain("medical", {"window": "file"})
    make_shards(tmp_path / "s.jsonl", media, tmp_path / "shards", domain=domain)
    with tarfile.open(next((tmp_path / "shards").glob("*.tar"))) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".dcm"))
        stored = tar.extractfile(member).read()
    (from_shard,) = domain.decode(member.name, stored)
    assert np.allclose(from_shard, _linear(_stored_hu(hu[1], -2048.0, 1.0), 40.0, 80.0), atol=1e-5)
    (source,) = _decode(media / "e.dcm", window="file")
    assert np.array_equal(from_shard, source)

    allowed = set(PIXEL_KEYWORDS) | {"SOPInstanceUID"}
    for sequence, inner in ITEM_KEYWORDS.items():
        allowed |= {f"{outer}>{sequence}" for outer in allowed if outer.endswith(sequence)}
    kept = _keywords(dcmread(io.BytesIO(stored)))
    for path in kept:
        parts = path.split(">")
        assert parts[0] in allowed, path
        for parent, child in zip(parts, parts[1:]):
            assert child in ITEM_KEYWORDS[parent], path
    assert {"PerFrameFunctionalGroupsSequence>PixelValueTransformationSequence>RescaleIntercept",
            "SharedFunctionalGroupsSequence>FrameVOILUTSequence>WindowCenter",
            "PerFrameFunctionalGroupsSequence>PlanePositionSequence>ImagePositionPatient"} <= kept
    for secret in (b"Secretname", b"SYN-", b"20240101", b"SYNTHETIC", b"Doe^Jane"):
        assert secret not in stored, secret
    assert b"SYN-private" in (media / "e.dcm").read_bytes() and b"20240101120000" in (media / "e.dcm").read_bytes()


def _with(path: Path, **attributes) -> Path:
    ds = dcmread(path)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def _voi_lut_item(first: int, entries: int):
    """A non-linear 16-bit VOI LUT (a square-root curve across -160..240 HU)."""
    from pydicom.dataset import Dataset

    hu = np.arange(entries) + first
    item = Dataset()
    item.LUTDescriptor = [entries, first, 16]
    item.add_new("LUTData", "US", np.round(65535 * np.sqrt(np.clip((hu + 160) / 400, 0, 1))).astype(np.uint16).tolist())
    item.LUTExplanation = "Doe^Jane's curve"
    return item


def _pydicom_chain(path: Path) -> np.ndarray:
    ds = dcmread(path)
    return apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)


@pytest.mark.filterwarnings("ignore:Applying a VOI LUT on a float input")  # the reference chain below feeds pydicom floats
@pytest.mark.parametrize("monochrome1", [False, True])
def test_file_window_applies_a_voi_lut_sequence(tmp_path, monochrome1):
    hu = ct_slice(np.random.default_rng(3), 0)
    write_dicom(tmp_path / "v.dcm", hu, monochrome1=monochrome1, intercept=-1024.0, slope=1.0)
    path = _with(tmp_path / "v.dcm", VOILUTSequence=[_voi_lut_item(-1024, 4096)])
    (image,) = _decode(path)
    expected = _pydicom_chain(path) / 65535.0
    assert np.allclose(image, 1.0 - expected if monochrome1 else expected, atol=1e-6)
    assert len(np.unique(np.round(image, 3))) > 20  # the curve, not a clipped mask
    domain = build_domain("medical")
    stored = domain.prepare_for_shard("v.dcm", path.read_bytes())
    assert np.array_equal(domain.decode("v.dcm", stored)[0], image) and b"Doe^Jane" not in stored


@pytest.mark.parametrize("monochrome1", [False, True])
def test_file_window_honours_the_sigmoid_voi_lut_function(tmp_path, monochrome1):
    hu = ct_slice(np.random.default_rng(4), 1)
    write_dicom(tmp_path / "s.dcm", hu, monochrome1=monochrome1, intercept=-1024.0, slope=1.0)
    path = _with(tmp_path / "s.dcm", WindowCenter=20, WindowWidth=60, VOILUTFunction="SIGMOID")
    (image,) = _decode(path)
    ds = dcmread(path)
    values = apply_modality_lut(ds.pixel_array, ds)
    expected = 1.0 / (1.0 + np.exp(-4 * (values - 20) / 60))  # PS3.3 C.11.2.1.3.1, scaled to [0, 1]
    low, high = -32768 - 1024, 32767 - 1024  # pydicom's output range for signed 16-bit stored values and this rescale
    assert np.allclose(expected, (_pydicom_chain(path) - low) / (high - low), atol=1e-9)
    assert np.allclose(image, 1.0 - expected if monochrome1 else expected, atol=1e-5)
    (linear,) = _decode(_with(path, VOILUTFunction="LINEAR"))
    assert np.abs(linear - image).max() > 0.05  # the two functions differ, so the test sees which was used


def test_palette_colour_becomes_rgb_through_the_file_tables():
    path = Path(get_testdata_file("examples_palette.dcm"))
    ds = dcmread(path)
    assert ds.PhotometricInterpretation == "PALETTE COLOR" and ds.SamplesPerPixel == 1
    (image,) = _decode(path, window="lung")  # windows apply to greyscale only
    expected = apply_color_lut(ds.pixel_array, ds)[..., :3] / 65535.0  # 16-bit table entries
    assert image.shape == (ds.Rows, ds.Columns, 3) and image.dtype == np.float32
    assert np.allclose(image, expected, atol=1e-6)
    assert np.abs(image[..., 0] - image[..., 2]).max() > 0.2  # colour, not grey
    domain = build_domain("medical")
    stored = domain.prepare_for_shard(path.name, path.read_bytes())
    assert np.array_equal(domain.decode(path.name, stored)[0], image)


def test_an_invalid_file_window_is_one_clear_line_without_the_value(tmp_path):
    from mmdomain.domains import DecodeError

    write_dicom(tmp_path / "w.dcm", ct_slice(np.random.default_rng(5), 2), monochrome1=False, intercept=-1024.0, slope=1.0)
    path = _with(tmp_path / "w.dcm", WindowCenter=40, WindowWidth=60, VOILUTFunction="CUBIC_XYZZY")
    with pytest.raises(DecodeError, match=r"'w.dcm'.*VOI LUT or window is invalid.*set window to a preset") as caught:
        _decode(path)
    assert "XYZZY" not in str(caught.value)
    (image,) = _decode(path, window="soft_tissue")  # the fix the message names works
    assert image.shape == (64, 64)


@pytest.mark.slow
def test_functional_group_rescale_makes_the_enhanced_ct_finding_learnable(tmp_path):
    """Enhanced CT whose per-frame rescale (intercepts -3000 or -2048) lives only in the functional groups; the +12 HU
    finding in the middle frame shows through a 40/40 HU window. Read from the groups, it is learnable; read from
    the top level alone (the files with their groups removed: today's path), every body pixel is past the window."""
    from mmdomain.tiny_models import write_tiny_llm

    from .domain_tasks import QUADRANTS, WORDS, train_task, write_enhanced_ct_task

    write_enhanced_ct_task(tmp_path, 1200, 200)
    llm = str(write_tiny_llm(tmp_path / "llm", WORDS, hidden=128, ffn=256))
    domain = {"name": "medical", "options": {"window": {"center": 40, "width": 40}}}
    grouped = train_task(tmp_path / "enhanced", tmp_path / "media", tmp_path / "grouped", llm, domain=domain, channels=1, steps=150)
    top_level = train_task(tmp_path / "enhanced", tmp_path / "media_top_level", tmp_path / "top_level", llm, domain=domain, channels=1, steps=150)
    print(f"enhanced CT quadrant task ({len(QUADRANTS)} choices): functional groups {grouped:.3f}, top level only {top_level:.3f}")
    assert grouped >= 0.9
    assert top_level <= 0.4
