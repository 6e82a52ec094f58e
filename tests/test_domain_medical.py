"""Medical decoding: real pydicom / nibabel files, HU windows, MONOCHROME1, limits, missing codecs, no PHI anywhere."""
from __future__ import annotations

import gzip
import io
import json

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from mmdomain.domains import DecodeError, build_domain
from mmdomain.domains.medical import PRESETS, Window, apply_window

from .domain_tasks import QUADRANTS, SIDES, WORDS, ct_slice, train_task, write_ct_task, write_dicom, write_side_task


def _png_bytes() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _decode(path, **options):
    from pathlib import Path

    path = Path(path)
    return build_domain("medical", options).decode(path.name, path.read_bytes())


def test_ct_small_goes_through_modality_lut_and_window():
    path = get_testdata_file("CT_small.dcm")
    ds = dcmread(path)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)  # intercept -1024
    (lung,) = _decode(path, window="lung")
    c, w = PRESETS["lung"]
    expected = np.clip((hu - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
    assert lung.shape == (128, 128) and lung.dtype == np.float32
    assert np.allclose(lung, expected, atol=1e-5)
    (stack,) = _decode(path, window=["lung", "mediastinum", "bone"])
    assert stack.shape == (128, 128, 3) and np.allclose(stack[..., 0], lung)
    assert not np.allclose(stack[..., 1], stack[..., 2])


@pytest.mark.parametrize("name,shape", [("MR_small_RLE.dcm", (64, 64)), ("MR_small_jp2klossless.dcm", (64, 64)),
                                        ("MR_small_bigendian.dcm", (64, 64)), ("SC_rgb_rle_2frame.dcm", (100, 100, 3))])
def test_compressed_multiframe_and_colour_files_decode(name, shape):
    (image,) = _decode(get_testdata_file(name))
    assert image.shape == shape and 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0


def test_file_window_is_used_when_present():
    path = get_testdata_file("MR_small_RLE.dcm")  # WindowCenter 600
    ds = dcmread(path)
    (image,) = _decode(path)  # window: file
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    assert np.allclose(image, apply_window(ds.pixel_array.astype(np.float32), Window(center=c, width=w)))


def test_missing_codec_names_the_syntax_and_the_install():
    with pytest.raises(DecodeError, match=r"JPEG-LS.*cannot be decoded here.*pip install pylibjpeg"):
        _decode(get_testdata_file("JPEGLSNearLossless_16.dcm"))


def test_monochrome1_is_inverted_after_windowing(tmp_path):
    hu = ct_slice(np.random.default_rng(0), 0)
    write_dicom(tmp_path / "m2.dcm", hu, monochrome1=False, intercept=-1024.0, slope=1.0)
    write_dicom(tmp_path / "m1.dcm", hu, monochrome1=True, intercept=0.0, slope=2.0)
    window = {"center": 40, "width": 40}
    (mono2,) = _decode(tmp_path / "m2.dcm", window=window)
    (mono1,) = _decode(tmp_path / "m1.dcm", window=window)
    # The synthetic MONOCHROME1 file mirrors its values; displayed correctly, both show the same picture.
    assert np.abs(mono1 - mono2).mean() < 0.02
    raw1, raw2 = dcmread(tmp_path / "m1.dcm").pixel_array, dcmread(tmp_path / "m2.dcm").pixel_array
    assert np.corrcoef(raw1.ravel(), raw2.ravel())[0, 1] < 0  # while the stored values run the other way


def test_header_over_the_pixel_limit_is_rejected_before_decoding(tmp_path):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns, ds.NumberOfFrames, ds.SamplesPerPixel = 60000, 60000, 100, 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.PhotometricInterpretation = 16, 16, 15, 0, "MONOCHROME2"
    ds.PixelData = b"\x00\x00" * 4  # a lie: decoding would fail differently, or allocate 720 GB
    ds.save_as(tmp_path / "huge.dcm", enforce_file_format=True)
    with pytest.raises(DecodeError, match=r"60000 x 60000 x 100 frames .* exceeds max_pixels=64000000; rejected before decoding"):
        _decode(tmp_path / "huge.dcm")


def test_nibabel_real_volumes_and_slice_modes(tmp_path):
    import nibabel as nib
    from nibabel.testing import data_path

    anat = f"{data_path}/anatomical.nii"  # stored LAS: decoded RAS+ by default, as stored on request
    vol = np.asarray(nib.as_closest_canonical(nib.load(anat)).dataobj, dtype=np.float32)
    (middle,) = _decode(anat, window="minmax")
    ref = np.take(vol, vol.shape[2] // 2, axis=2)
    assert middle.shape == ref.shape and np.allclose(middle, (ref - ref.min()) / (ref.max() - ref.min()), atol=1e-6)
    (stored,) = _decode(anat, window="minmax", nifti={"orientation": "as_stored"})
    assert np.allclose(stored, middle[::-1])
    assert len(_decode(anat, nifti={"mode": "even", "count": 4})) == 4
    (stack,) = _decode(anat, nifti={"mode": "neighbours", "index": 3, "neighbours": 1, "axis": 2})
    assert stack.shape == ref.shape + (3,)
    (four_d,) = _decode(f"{data_path}/example4d.nii.gz")  # 4-D, gzipped: first volume, middle slice
    assert four_d.ndim == 2 and 0 <= four_d.min() and four_d.max() <= 1
    (nifti2,) = _decode(f"{data_path}/example_nifti2.nii.gz")
    assert nifti2.ndim == 2
    with pytest.raises(DecodeError, match="exceeds max_nifti_bytes=1000; rejected before decompressing"):
        _decode(f"{data_path}/example4d.nii.gz", max_nifti_bytes=1000)


def _nifti_bytes(data: np.ndarray, affine: np.ndarray, compressed: bool = True) -> bytes:
    import nibabel as nib

    raw = nib.Nifti1Image(data, affine).to_bytes()
    return gzip.compress(raw) if compressed else raw


def test_nifti_decodes_the_same_whatever_voxel_order_the_file_stored():
    """One RAS volume written three ways: as is, mirrored in x under an affine that says so, and with x and y
    swapped. Canonical decoding gives the same pictures; as_stored gives each file's own order (the old behaviour)."""
    rng = np.random.default_rng(0)
    ras = rng.normal(size=(12, 10, 7)).astype(np.float32)
    ras[:3, 2:5, :] += 6  # a finding on the patient's left (low x in RAS+)
    flipped_x = np.array([[-1, 0, 0, 11], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float)  # LAS: voxel i is world x = 11 - i
    swapped_xy = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float)  # ARS: axis 0 runs anterior
    files = {"ras": _nifti_bytes(ras, np.eye(4)), "las": _nifti_bytes(ras[::-1].copy(), flipped_x),
             "ars": _nifti_bytes(ras.transpose(1, 0, 2).copy(), swapped_xy)}
    medical = build_domain("medical", {"window": "minmax", "nifti": {"mode": "even", "count": 3}})
    views = {k: medical.decode(f"{k}.nii.gz", v) for k, v in files.items()}
    for k in ("las", "ars"):
        assert all(np.allclose(a, b) for a, b in zip(views[k], views["ras"])), k
    assert views["ras"][1][:3, 2:5].mean() > 0.8  # the finding stays at low x: the patient's left
    as_stored = build_domain("medical", {"window": "minmax", "nifti": {"mode": "even", "count": 3, "orientation": "as_stored"}})
    las, ars = as_stored.decode("las.nii.gz", files["las"]), as_stored.decode("ars.nii.gz", files["ars"])
    assert np.allclose(las[1], views["ras"][1][::-1]) and np.allclose(ars[1], views["ras"][1].T)


def test_the_stored_voxel_order_is_recorded_in_the_sample_metadata(tmp_path):
    """Decoding reorients to RAS+; the order the file stored (and its voxel size) travels in the sample's metadata."""
    from mmdomain.data import FailureBudget, iter_records
    from mmdomain.shards import make_shards

    (tmp_path / "media").mkdir()
    volume = np.random.default_rng(0).normal(size=(6, 5, 4)).astype(np.float32)
    flipped_x = np.array([[-2.0, 0, 0, 11], [0, 1, 0, 0], [0, 0, 3, 0], [0, 0, 0, 1]])
    (tmp_path / "media" / "a.nii.gz").write_bytes(_nifti_bytes(volume, flipped_x))
    (tmp_path / "media" / "b.png").write_bytes(_png_bytes())
    (tmp_path / "s.jsonl").write_text(json.dumps({"id": "s", "media": ["a.nii.gz", "b.png"], "question": "<image> <image> ?", "answer": "left"}) + "\n")
    make_shards(tmp_path / "s.jsonl", tmp_path / "media", tmp_path / "shards", domain=build_domain("medical"))
    (record,) = iter_records([str(tmp_path / "shards" / "train-000000.tar")], build_domain("medical"), failures=FailureBudget(0))
    assert record.meta == {"media": [{"orientation": "LAS", "voxel_mm": [2.0, 1.0, 3.0]}, {}]}


def test_nifti_with_a_degenerate_affine_names_the_way_out():
    import nibabel as nib

    img = nib.Nifti1Image(np.ones((4, 4, 3), np.float32), None)
    img.set_sform(np.diag([1.0, 0.0, 1.0, 1.0]), code=2)  # axis 1 maps nowhere: no orientation to reorient by
    data = gzip.compress(img.to_bytes())
    with pytest.raises(DecodeError, match=r"member 'z.nii.gz': its affine gives no orientation.*nifti.orientation: as_stored"):
        build_domain("medical").decode("z.nii.gz", data)
    (image,) = build_domain("medical", {"nifti": {"orientation": "as_stored"}}).decode("z.nii.gz", data)
    assert image.shape == (4, 4)


@pytest.mark.parametrize("compressed", [True, False])
def test_nifti_with_a_large_header_extension_opens_and_is_stored_without_it(compressed):
    """Only the fixed header is parsed for the size check: a 4 kB extension (far past the 540 bytes read first) is
    no reason to refuse the file. make-shards' copy drops the extension and keeps the picture."""
    import nibabel as nib

    volume = np.arange(8 * 6 * 5, dtype=np.float32).reshape(8, 6, 5)
    img = nib.Nifti1Image(volume, np.eye(4))
    img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"Doe^Jane " * 460))  # code 6: a comment, 4 kB
    name = "x.nii.gz" if compressed else "x.nii"
    data = img.to_bytes()
    data = gzip.compress(data) if compressed else data
    medical = build_domain("medical", {"window": "minmax"})
    (image,) = medical.decode(name, data)
    assert np.allclose(image, (volume[..., 2] - volume[..., 2].min()) / np.ptp(volume[..., 2]))
    stored = medical.prepare_for_shard(name, data)
    raw = gzip.decompress(stored) if compressed else stored
    assert b"Doe^Jane" not in raw and len(raw) < len(img.to_bytes()) - 4000
    assert np.allclose(medical.decode(name, stored)[0], image)


def test_nifti_free_text_is_stripped_for_shards(tmp_path):
    import nibabel as nib

    img = nib.Nifti1Image(np.zeros((4, 4, 3), np.float32), np.eye(4))
    img.header["descrip"] = b"Doe^Jane 1970-01-01"
    data = gzip.compress(img.to_bytes())
    stored = build_domain("medical").prepare_for_shard("v.nii.gz", data)
    assert b"Doe^Jane" not in gzip.decompress(stored) and b"Doe^Jane" in gzip.decompress(data)


def test_no_phi_in_any_written_file(tmp_path, tiny_llm_dir):
    """A DICOM with a patient name goes through make-shards, a training step and a checkpoint; no written file
    holds the name or the ID (the source file does)."""
    from mmdomain.cli import main

    media = tmp_path / "media"
    media.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        write_dicom(media / f"s{i}.dcm", ct_slice(rng, i), monochrome1=False, intercept=-1024.0, slope=1.0, patient="Doe^Jane^Secretname")
        rows.append({"id": f"s{i}", "image": f"s{i}.dcm", "question": "where is the lesion ?", "answer": "left"})
    assert b"Secretname" in (media / "s0.dcm").read_bytes() and b"SYN-s0" in (media / "s0.dcm").read_bytes()
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "written"
    assert main(["-q", "make-shards", "--jsonl", str(tmp_path / "samples.jsonl"), "--media", str(media), "--out", str(out / "shards"),
                 "--domain", "medical", "--domain-options", '{"phi_allow": ["Modality"]}']) == 0
    recipe = {"model": {"encoder": {"name": "tiny-vit", "options": {"image_size": 32, "channels": 1}}, "llm": {"path": tiny_llm_dir},
                        "domain": {"name": "medical", "options": {"window": "soft_tissue"}}},
              "data": {"train": str(out / "shards" / "*.tar"), "eval": str(out / "shards" / "*.tar")},
              "optim": {"max_steps": 1, "batch_size": 4}, "output_dir": str(out / "run")}
    (tmp_path / "r.yaml").write_text(json.dumps(recipe))
    assert main(["-q", "run", str(tmp_path / "r.yaml")]) == 0
    written = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".tar" for p in written) and any(p.name == "model.safetensors" for p in written)
    for path in written:
        data = path.read_bytes()
        for secret in (b"Secretname", b"Doe^Jane", b"SYN-s", b"20240101"):
            assert secret not in data, f"{path} holds {secret!r}"
    # The stripped DICOM still decodes to the same picture, and the allow-listed field survived.
    import tarfile

    with tarfile.open(next(p for p in written if p.suffix == ".tar")) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".dcm"))
        stored = tar.extractfile(member).read()
    assert dcmread(io.BytesIO(stored)).Modality == "CT"


@pytest.mark.slow
def test_hu_window_makes_the_ct_finding_learnable(tmp_path):
    """The finding is +12 HU: clear through a 40/40 window, below one grey level of a min-max 8-bit picture of a
    -1024..3071 HU slice. A third of the files are MONOCHROME1 and intercepts differ."""
    from mmdomain.tiny_models import write_tiny_llm

    write_ct_task(tmp_path, 1200, 200)
    llm = str(write_tiny_llm(tmp_path / "llm", WORDS, hidden=128, ffn=256))
    adapted = train_task(tmp_path / "dicom", tmp_path / "media", tmp_path / "adapted", llm,
                         domain={"name": "medical", "options": {"window": {"center": 40, "width": 40}}}, channels=1, steps=250)
    naive = train_task(tmp_path / "naive", tmp_path / "media", tmp_path / "naive", llm, domain={"name": "generic"}, channels=1, steps=250)
    print(f"CT quadrant task ({len(QUADRANTS)} choices): medical adapter {adapted:.3f}, naive 8-bit path {naive:.3f}")
    assert adapted >= 0.9
    assert naive <= 0.4


@pytest.mark.slow
def test_canonical_orientation_makes_left_and_right_learnable(tmp_path):
    """The finding is on the patient's left or right; each file stores the volume in one of four voxel orders (x
    flipped, x and y swapped, both) under an affine that says which. Reoriented to RAS+ the side is always the same
    rows of the picture; as stored, the same pixels mean left in one file and right in another."""
    from mmdomain.tiny_models import write_tiny_llm

    write_side_task(tmp_path, 600, 200)
    llm = str(write_tiny_llm(tmp_path / "llm", WORDS, hidden=128, ffn=256))
    canonical = train_task(tmp_path, tmp_path / "media", tmp_path / "canonical", llm, domain={"name": "medical"}, channels=1, steps=150)
    as_stored = train_task(tmp_path, tmp_path / "media", tmp_path / "as_stored", llm, channels=1, steps=150,
                           domain={"name": "medical", "options": {"nifti": {"orientation": "as_stored"}}})
    print(f"NIfTI side task ({len(SIDES)} choices): canonical {canonical:.3f}, as stored {as_stored:.3f}")
    assert canonical >= 0.9
    assert as_stored <= 0.65


@pytest.mark.slow
def test_volume_path_sees_a_finding_off_the_middle_slice(tmp_path):
    """The finding lies in slice 1 or 3 of 5 and in no other: the middle slice never shows it, while the volume path
    (all 5 slices through the encoder, joined by depth_pool) does. Both read the volume through one fixed window, as
    a reader would: the default percentile window, taken over a whole volume, clips this small finding into the
    tissue's brightest texture, and trained that way the volume path stayed at chance (0.54)."""
    from mmdomain.tiny_models import write_tiny_llm

    write_side_task(tmp_path, 600, 200, depth=5, finding_slices=(1, 3))
    llm = str(write_tiny_llm(tmp_path / "llm", WORDS, hidden=128, ffn=256))
    window = {"center": 100, "width": 240}
    volume = train_task(tmp_path, tmp_path / "media", tmp_path / "volume", llm, channels=1, steps=150, connector={"name": "depth_pool"},
                        domain={"name": "medical", "options": {"window": window, "nifti": {"mode": "volume", "count": 5}}})
    middle = train_task(tmp_path, tmp_path / "media", tmp_path / "middle", llm, channels=1, steps=150,
                        domain={"name": "medical", "options": {"window": window}})
    print(f"NIfTI off-middle finding ({len(SIDES)} choices): volume path {volume:.3f}, middle slice {middle:.3f}")
    assert volume >= 0.85
    assert middle <= 0.65
