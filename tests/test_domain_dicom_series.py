"""A DICOM series as one sample: one series only, slices ordered by position, stripped, re-packed anonymously, and
decoded to the same slice views a NIfTI volume gets."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from mmdomain.domains import build_domain
from mmdomain.shards import ShardError, make_shards

from .domain_tasks import ct_slice, write_dicom

WINDOW = {"center": 40, "width": 80}


def _windowed(hu: np.ndarray) -> np.ndarray:
    return np.clip((np.round(hu) - 39.5) / 79 + 0.5, 0, 1)


def write_series(folder: Path, names: list[str], positions: list[float], *, series_uid: str, seed: int = 0,
                 geometry: bool = True, instance_numbers: list[int] | None = None) -> dict[float, np.ndarray]:
    """One CT file per name at ``positions`` (mm along the normal of a tilted orientation); returns position -> HU."""
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study = generate_uid()
    row, col = np.array([1.0, 0.0, 0.0]), np.array([0.0, np.cos(0.3), np.sin(0.3)])
    normal = np.cross(row, col)
    volume = {}
    for i, (name, position) in enumerate(zip(names, positions)):
        hu = ct_slice(rng, i % 4)
        volume[position] = hu
        write_dicom(folder / name, hu, monochrome1=False, intercept=-1024.0, slope=1.0, patient="Doe^Jane^Secretname")
        ds = dcmread(folder / name)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series_uid
        ds.InstanceNumber = (instance_numbers or list(range(1, len(names) + 1)))[i]
        if geometry:
            ds.ImageOrientationPatient = [*row, *col]
            ds.ImagePositionPatient = [float(v) for v in (10.0 * row + 5.0 * col + position * normal)]
        ds.save_as(folder / name, enforce_file_format=True)
    return volume


def _shard_items(tmp_path: Path, rows: list[dict], **options) -> dict[str, tuple[str, bytes]]:
    """make-shards over ``rows``; sample key -> (member name, bytes) of its one media item."""
    (tmp_path / "s.jsonl").write_text("".join(json.dumps({"question": "where ?", "answer": "left", **r}) + "\n" for r in rows))
    make_shards(tmp_path / "s.jsonl", tmp_path / "media", tmp_path / "shards", domain=build_domain("medical", {"window": WINDOW, **options}))
    items = {}
    for shard in (tmp_path / "shards").glob("*.tar"):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if not member.name.endswith(".json"):
                    items[member.name.split(".")[0]] = (member.name, tar.extractfile(member).read())
    return items


def test_shuffled_names_give_the_same_volume_in_position_order(tmp_path):
    """A folder whose names run against the positions (and instance numbers that run backwards, as head-first
    acquisitions do) and a list of the same files: both decode to slices in position order."""
    from pydicom.uid import generate_uid

    positions = [30.0, -10.0, 20.0, 0.0, 10.0]
    names = ["a_3.dcm", "b_0.dcm", "c_2.dcm", "d_1.dcm", "e_4.dcm"]  # not position order
    volume = write_series(tmp_path / "media" / "series", names, positions, series_uid=generate_uid(), instance_numbers=[1, 5, 2, 4, 3])
    by_position = [n for _, n in sorted(zip(positions, names))]
    items = _shard_items(tmp_path, [{"id": "folder", "image": "series"},
                                    {"id": "list", "image": [[f"series/{n}" for n in by_position]]}])
    hu_in_order = [volume[p] for p in sorted(positions)]
    for key in ("folder", "list"):
        member, data = items[key]
        assert member.endswith(".dcm.tar")
        with tarfile.open(fileobj=__import__("io").BytesIO(data)) as tar:
            assert tar.getnames() == [f"{i:06d}.dcm" for i in range(5)]
        for index in range(5):
            (view,) = build_domain("medical", {"window": WINDOW, "nifti": {"mode": "index", "index": index}}).decode(member, data)
            assert view.shape == (64, 64) and np.allclose(view, _windowed(hu_in_order[index]), atol=1e-5), (key, index)
        (stack,) = build_domain("medical", {"window": WINDOW, "nifti": {"mode": "neighbours", "index": 0}}).decode(member, data)
        assert stack.shape == (64, 64, 3) and np.allclose(stack[..., 2], _windowed(hu_in_order[1]), atol=1e-5)
        assert len(build_domain("medical", {"window": WINDOW, "nifti": {"mode": "even", "count": 3}}).decode(member, data)) == 3
    assert items["folder"][1] != b"" and np.array_equal(
        build_domain("medical").decode(*items["folder"])[0], build_domain("medical").decode(*items["list"])[0])


def test_a_mixed_series_folder_is_refused_naming_the_file(tmp_path):
    from pydicom.uid import generate_uid

    one, other = generate_uid(), generate_uid()
    write_series(tmp_path / "media" / "mixed", ["s1.dcm", "s2.dcm"], [0.0, 5.0], series_uid=one)
    write_series(tmp_path / "media" / "mixed", ["zz_scout.dcm"], [2.5], series_uid=other, seed=1)
    with pytest.raises(ShardError, match=r"file 'mixed/zz_scout.dcm' belongs to another series than 'mixed/s1.dcm'") as caught:
        _shard_items(tmp_path, [{"id": "m", "image": "mixed"}])
    assert one not in str(caught.value) and other not in str(caught.value)


def test_repeated_positions_and_unorderable_slices_are_refused(tmp_path):
    from pydicom.uid import generate_uid

    write_series(tmp_path / "media" / "dup", ["x.dcm", "y.dcm", "z.dcm"], [0.0, 5.0, 5.0], series_uid=generate_uid())
    with pytest.raises(ShardError, match=r"files 'dup/y.dcm' and 'dup/z.dcm' have the same slice position"):
        _shard_items(tmp_path, [{"id": "d", "image": "dup"}])


def test_without_geometry_instance_numbers_order_the_slices(tmp_path):
    from pydicom.uid import generate_uid

    volume = write_series(tmp_path / "media" / "flat", ["p.dcm", "q.dcm", "r.dcm"], [0.0, 1.0, 2.0], series_uid=generate_uid(),
                          geometry=False, instance_numbers=[3, 1, 2])
    member, data = _shard_items(tmp_path, [{"id": "f", "image": "flat"}])["f"]
    first = build_domain("medical", {"window": WINDOW, "nifti": {"mode": "index", "index": 0}}).decode(member, data)[0]
    assert np.allclose(first, _windowed(volume[1.0]), atol=1e-5)  # q.dcm: instance number 1


def test_series_limits_count_the_whole_volume(tmp_path):
    from pydicom.uid import generate_uid

    write_series(tmp_path / "media" / "big", [f"{i}.dcm" for i in range(5)], [float(i) for i in range(5)], series_uid=generate_uid())
    with pytest.raises(ShardError, match=r"64 x 64 x 5 slices exceeds max_pixels=20000; rejected before decoding"):
        _shard_items(tmp_path, [{"id": "b", "image": "big"}], max_pixels=20000)  # each slice (4096) fits; the volume does not
    with pytest.raises(ShardError, match=r"more than 3 files in one bundle"):
        _shard_items(tmp_path, [{"id": "b", "image": "big"}], max_slices=3)


def test_no_phi_reaches_the_series_shard(tmp_path):
    from pydicom.uid import generate_uid

    series_uid = generate_uid()
    names = ["Doe_Jane_1.dcm", "Doe_Jane_2.dcm", "Doe_Jane_3.dcm"]
    write_series(tmp_path / "media" / "Doe_Jane_CT", names, [0.0, 2.0, 4.0], series_uid=series_uid)
    sources = [dcmread(tmp_path / "media" / "Doe_Jane_CT" / n) for n in names]
    secrets = [b"Secretname", b"Doe^Jane", b"Doe_Jane", b"SYN-", b"20240101", series_uid.encode(), sources[0].StudyInstanceUID.encode(),
               *(ds.SOPInstanceUID.encode() for ds in sources)]
    assert all(s in (tmp_path / "media" / "Doe_Jane_CT" / names[0]).read_bytes() for s in (b"Secretname", b"SYN-", series_uid.encode()))
    _shard_items(tmp_path, [{"id": "p", "image": "Doe_Jane_CT"}])
    for shard in (tmp_path / "shards").iterdir():
        data = shard.read_bytes()
        for secret in secrets:
            assert secret not in data, f"{shard.name} holds {secret!r}"


def test_series_file_window_and_stacked_windows(tmp_path):
    """``window: [file, lung]`` on a series: channel 0 is the files' own 40/80 window (applied by pydicom), channel 1
    the lung preset, for the slice the nifti options pick."""
    from pydicom.uid import generate_uid

    names = ["k.dcm", "l.dcm", "m.dcm"]
    volume = write_series(tmp_path / "media" / "w", names, [0.0, 3.0, 6.0], series_uid=generate_uid())
    for n in names:
        ds = dcmread(tmp_path / "media" / "w" / n)
        ds.WindowCenter, ds.WindowWidth = 40, 80
        ds.save_as(tmp_path / "media" / "w" / n, enforce_file_format=True)
    member, data = _shard_items(tmp_path, [{"id": "w", "image": "w"}])["w"]
    (image,) = build_domain("medical", {"window": ["file", "lung"], "nifti": {"mode": "index", "index": 1}}).decode(member, data)
    hu = np.round(volume[3.0])
    assert image.shape == (64, 64, 2)
    assert np.allclose(image[..., 0], _windowed(hu), atol=1e-5)
    assert np.allclose(image[..., 1], np.clip((hu + 600.5) / 1499 + 0.5, 0, 1), atol=1e-5)


def test_slices_without_position_or_instance_number_are_refused(tmp_path):
    from pydicom.uid import generate_uid

    write_series(tmp_path / "media" / "bare", ["g.dcm", "h.dcm"], [0.0, 1.0], series_uid=generate_uid(), geometry=False)
    ds = dcmread(tmp_path / "media" / "bare" / "h.dcm")
    del ds.InstanceNumber
    ds.save_as(tmp_path / "media" / "bare" / "h.dcm", enforce_file_format=True)
    with pytest.raises(ShardError, match=r"cannot be ordered: file 'bare/g.dcm' lacks ImagePositionPatient.*file 'bare/h.dcm' lacks InstanceNumber"):
        _shard_items(tmp_path, [{"id": "b", "image": "bare"}])


def test_a_scanner_folder_without_extensions_and_with_a_dicomdir_is_one_series(tmp_path):
    """Scanners write IM000001-style names without an extension and put a DICOMDIR beside them: the files are told
    DICOM by their preamble, the index is left out, and a lone extensionless DICOM is taken too."""
    from pydicom.uid import generate_uid

    volume = write_series(tmp_path / "media" / "IMAGES", ["IM000003", "IM000001", "IM000002"], [20.0, 0.0, 10.0], series_uid=generate_uid())
    (tmp_path / "media" / "IMAGES" / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    items = _shard_items(tmp_path, [{"id": "scan", "image": "IMAGES"}, {"id": "one", "image": "IMAGES/IM000002"}])
    member, data = items["scan"]
    assert member.endswith(".dcm.tar")
    views = build_domain("medical", {"window": WINDOW, "nifti": {"mode": "even", "count": 3}}).decode(member, data)
    assert [float(np.abs(v - _windowed(volume[p])).max()) < 1e-5 for v, p in zip(views, [0.0, 10.0, 20.0])] == [True] * 3
    assert items["one"][0].endswith(".dcm") and np.allclose(build_domain("medical", {"window": WINDOW}).decode(*items["one"])[0],
                                                            _windowed(volume[10.0]), atol=1e-5)
