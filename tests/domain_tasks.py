"""Synthetic domain tasks for the "decoding matters" tests: a CT finding visible only in the right HU window, a
finding on the patient's left or right in NIfTI files stored in several voxel orders, and land cover that differs
only in non-RGB bands. Each is trained through a recipe twice: with the domain adapter,
and with the naive path every LLaVA-family codebase takes (an 8-bit RGB/grey picture of the file's raw values)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

QUADRANTS = ["upper left", "upper right", "lower left", "lower right"]
COVERS = ["water", "forest", "crop", "urban"]
SIDES = ["left", "right"]
WORDS = "where is the finding ? what land cover is this".split() + " ".join(QUADRANTS).split() + COVERS
SIZE = 64


def _smooth(rng: np.random.Generator, scale: int = 8) -> np.ndarray:
    coarse = rng.normal(size=(SIZE // scale + 1, SIZE // scale + 1))
    up = np.kron(coarse, np.ones((scale, scale)))[:SIZE, :SIZE]
    return (up - up.mean()) / (up.std() + 1e-6)


def _blob(cy: float, cx: float, sigma: float) -> np.ndarray:
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    return np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * sigma**2))


def ct_slice(rng: np.random.Generator, quadrant: int) -> np.ndarray:
    """HU image: air outside a round body, soft tissue at 40 +- 3 HU, a +12 HU finding in one quadrant, and a small
    metal implant at 3071 HU (the full CT range, so a min-max picture has 16 HU per grey level)."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    body = (y - 31.5) ** 2 + (x - 31.5) ** 2 < 30**2
    hu = np.full((SIZE, SIZE), -1024.0)
    tissue = 40 + 1.5 * _smooth(rng) + 2.5 * rng.normal(size=(SIZE, SIZE))
    half = SIZE // 2
    cy = rng.uniform(10, half - 8) + (half - 2 if quadrant >= 2 else 0)
    cx = rng.uniform(10, half - 8) + (half - 2 if quadrant % 2 else 0)
    tissue += 14 * _blob(cy, cx, rng.uniform(3.5, 5))
    hu[body] = tissue[body]
    iy, ix = rng.integers(20, 44, size=2)
    hu[iy : iy + 3, ix : ix + 3] = 3071
    return hu


def write_dicom(path: Path, hu: np.ndarray, *, monochrome1: bool, intercept: float, slope: float, patient: str = "Anon^Synthetic") -> None:
    """A CT DICOM whose displayed picture through the right window is the same whichever photometric it uses:
    MONOCHROME1 files store values whose modality output is mirrored around the window centre."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    values = (80.0 - hu) if monochrome1 else hu  # 40 - (hu - 40): inversion after windowing undoes the mirror
    stored = np.round((values - intercept) / slope).astype(np.int16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientName, ds.PatientID, ds.StudyDate = patient, "SYN-" + path.stem, "20240101"
    ds.Modality = "CT"
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = intercept, slope
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_enhanced_ct(path: Path, hu_frames: list[np.ndarray], *, rescales: list[tuple[float, float]] | None = None,
                      shared_rescale: tuple[float, float] | None = None, window: tuple[float, float] | None = None,
                      patient: str = "Anon^Synthetic") -> None:
    """An Enhanced CT Image Storage multi-frame file whose rescale (intercept, slope) lives only in the functional
    groups: one per frame in ``rescales`` (per-frame groups), or ``shared_rescale`` for all. ``window`` (center,
    width) goes into the shared Frame VOI LUT group. Each frame also carries a Frame Content item with an acquisition
    datetime and a private tag, as scanners write them, which must not reach shards."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import EnhancedCTImageStorage, ExplicitVRLittleEndian, generate_uid

    def group(**values: object) -> Dataset:
        item = Dataset()
        for keyword, value in values.items():
            setattr(item, keyword, value)
        return item

    per_frame_rescale = rescales or [shared_rescale] * len(hu_frames)
    stored = [np.round((hu - intercept) / slope) for hu, (intercept, slope) in zip(hu_frames, per_frame_rescale)]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.StudyDate, ds.AcquisitionDateTime = patient, "SYN-" + path.stem, "20240101", "20240101120000"
    ds.Modality = "CT"
    ds.Rows, ds.Columns = hu_frames[0].shape
    ds.NumberOfFrames = len(hu_frames)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    shared = group(PixelMeasuresSequence=[group(PixelSpacing=[0.7, 0.7], SliceThickness=1.0)],
                   PlaneOrientationSequence=[group(ImageOrientationPatient=[1, 0, 0, 0, 1, 0])])
    if shared_rescale is not None:
        shared.PixelValueTransformationSequence = [group(RescaleIntercept=shared_rescale[0], RescaleSlope=shared_rescale[1], RescaleType="HU")]
    if window is not None:
        shared.FrameVOILUTSequence = [group(WindowCenter=window[0], WindowWidth=window[1], WindowCenterWidthExplanation="Doe^Jane's window")]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for i in range(len(hu_frames)):
        item = group(FrameContentSequence=[group(FrameAcquisitionDateTime="20240101120000", FrameReferenceDateTime="20240101120000")],
                     PlanePositionSequence=[group(ImagePositionPatient=[0.0, 0.0, float(i)])])
        if rescales is not None:
            item.PixelValueTransformationSequence = [group(RescaleIntercept=rescales[i][0], RescaleSlope=rescales[i][1], RescaleType="HU")]
        item.private_block(0x0099, "SYNTHETIC", create=True).add_new(0x10, "LO", "SYN-private")  # a private tag inside a frame item
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = frames
    ds.PixelData = np.stack(stored).astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def naive_png(dicom_path: Path, png_path: Path) -> None:
    """What generic pipelines do: the raw stored array, min-max scaled to 8 bits, no LUT, no photometric."""
    from pydicom import dcmread

    raw = dcmread(dicom_path).pixel_array.astype(np.float64)
    Image.fromarray(np.round((raw - raw.min()) / max(np.ptp(raw), 1) * 255).astype(np.uint8)).save(png_path)


def write_ct_task(root: Path, n_train: int, n_test: int, seed: int = 0) -> None:
    """``root/{dicom,naive}/{train,test}.jsonl`` plus media; a third of files MONOCHROME1, intercepts 0 or -1024."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        rows_dicom, rows_png = [], []
        for i in range(n):
            q = int(rng.integers(4))
            name = f"{split}-{i:05d}"
            media = root / "media"
            media.mkdir(parents=True, exist_ok=True)
            write_dicom(media / f"{name}.dcm", ct_slice(rng, q), monochrome1=i % 3 == 0,
                        intercept=[-1024.0, 0.0][i % 2], slope=2.0 if i % 5 == 0 else 1.0)
            naive_png(media / f"{name}.dcm", media / f"{name}.png")
            row = {"id": name, "question": "where is the finding ?", "answer": QUADRANTS[q], "choices": QUADRANTS}
            rows_dicom.append({**row, "image": f"{name}.dcm"})
            rows_png.append({**row, "image": f"{name}.png"})
        for kind, rows in (("dicom", rows_dicom), ("naive", rows_png)):
            (root / kind).mkdir(parents=True, exist_ok=True)
            (root / kind / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


# Voxel orders a NIfTI file may store a RAS volume in, each with the affine that says so. The flips make every order
# ambiguous to a reader that ignores the affine: a finding at low rows is the patient's left in RAS files and right
# in LAS ones; at low columns, left in ARS files and right in the flipped-swapped ones.
def _ras(v: np.ndarray) -> np.ndarray:
    return v


def _las(v: np.ndarray) -> np.ndarray:
    return v[::-1]


def _ars(v: np.ndarray) -> np.ndarray:
    return v.transpose(1, 0, 2)


def _als(v: np.ndarray) -> np.ndarray:
    return v[::-1].transpose(1, 0, 2)


VOXEL_ORDERS = {
    "RAS": (_ras, np.eye(4)),
    "LAS": (_las, np.array([[-1, 0, 0, SIZE - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float)),
    "ARS": (_ars, np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float)),
    "ALS": (_als, np.array([[0, -1, 0, SIZE - 1], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float)),
}


def side_volume(rng: np.random.Generator, side: int, depth: int = 5, finding_slice: int | None = None) -> np.ndarray:
    """A RAS+ volume ``[x, y, z]`` (x towards the patient's right): a round body of textured tissue and a bright
    finding in the patient's left (``side`` 0, low x) or right half, at a random front-back position, in slice
    ``finding_slice`` (the middle one by default) only."""
    x, y = np.mgrid[0:SIZE, 0:SIZE]
    body = (x - 31.5) ** 2 + (y - 31.5) ** 2 < 30**2
    centre = depth // 2 if finding_slice is None else finding_slice
    cx = rng.uniform(12, 24) + (28 if side else 0)
    cy = rng.uniform(14, 50)
    volume = np.zeros((SIZE, SIZE, depth), np.float32)
    for z in range(depth):
        tissue = 100 + 10 * _smooth(rng) + 5 * rng.normal(size=(SIZE, SIZE))
        tissue += 80 * np.exp(-((z - centre) ** 2) / 0.25) * _blob(cx, cy, 4.0)  # 1.5 one slice away: invisible there
        volume[..., z] = np.where(body, tissue, 0.0)
    return volume


def write_side_task(root: Path, n_train: int, n_test: int, seed: int = 0, depth: int = 5, finding_slices: tuple[int, ...] | None = None) -> None:
    """``root/{train,test}.jsonl`` plus ``root/media/*.nii.gz``: "where is the finding ?" -> left / right, each file in
    one of ``VOXEL_ORDERS`` at random; the finding is centred on the middle slice, or on one of ``finding_slices``."""
    import gzip

    import nibabel as nib

    rng = np.random.default_rng(seed)
    media = root / "media"
    media.mkdir(parents=True, exist_ok=True)
    orders = list(VOXEL_ORDERS)
    for split, n in (("train", n_train), ("test", n_test)):
        rows = []
        for i in range(n):
            side = int(rng.integers(2))
            reorder, affine = VOXEL_ORDERS[orders[int(rng.integers(len(orders)))]]
            at = None if finding_slices is None else finding_slices[int(rng.integers(len(finding_slices)))]
            stored = np.round(reorder(side_volume(rng, side, depth, at))).astype(np.int16)
            name = f"{split}-{i:05d}.nii.gz"
            (media / name).write_bytes(gzip.compress(nib.Nifti1Image(stored, affine).to_bytes(), compresslevel=1))
            rows.append({"id": f"{split}-{i:05d}", "image": name, "question": "where is the finding ?", "answer": SIDES[side], "choices": SIDES})
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_enhanced_ct_task(root: Path, n_train: int, n_test: int, seed: int = 0) -> None:
    """``root/enhanced/{train,test}.jsonl`` over ``root/media`` (Enhanced CT, 3 frames, the labelled finding in the
    middle frame, each frame's rescale only in its per-frame functional group, stored values offset by 2048-3000)
    and ``root/media_top_level`` (the same files without functional groups: what a top-level-only reader sees)."""
    from pydicom import dcmread

    rng = np.random.default_rng(seed)
    for folder in ("media", "media_top_level", "enhanced"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        rows = []
        for i in range(n):
            quadrants = [int(q) for q in rng.integers(4, size=3)]
            name = f"{split}-{i:05d}.dcm"
            rescales = [(float(rng.choice([-3000.0, -2048.0])), 1.0) for _ in quadrants]
            write_enhanced_ct(root / "media" / name, [ct_slice(rng, q) for q in quadrants], rescales=rescales)
            ds = dcmread(root / "media" / name)
            del ds.PerFrameFunctionalGroupsSequence, ds.SharedFunctionalGroupsSequence
            ds.save_as(root / "media_top_level" / name, enforce_file_format=True)
            rows.append({"id": name[:-4], "image": name, "question": "where is the finding ?", "answer": QUADRANTS[quadrants[1]],
                         "choices": QUADRANTS})
        (root / "enhanced" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def multiband_tile(rng: np.random.Generator, cover: int) -> np.ndarray:
    """6 bands (B, G, R, NIR, SWIR1, SWIR2) uint16 reflectance x 10000. RGB statistics are the same for every class;
    the class is carried by the NIR level and the SWIR1/SWIR2 balance only."""
    tile = np.empty((SIZE, SIZE, 6), np.float64)
    for b in range(3):
        tile[..., b] = 1200 + 300 * _smooth(rng) + 80 * rng.normal(size=(SIZE, SIZE))
    nir_high, swir_high = cover // 2, cover % 2
    tile[..., 3] = (2400 if nir_high else 1600) + 250 * _smooth(rng) + 100 * rng.normal(size=(SIZE, SIZE))
    tile[..., 4] = (2200 if swir_high else 1500) + 250 * _smooth(rng) + 100 * rng.normal(size=(SIZE, SIZE))
    tile[..., 5] = (1500 if swir_high else 2200) + 250 * _smooth(rng) + 100 * rng.normal(size=(SIZE, SIZE))
    tile[:2, :2] = 0  # a nodata corner
    return np.clip(tile, 0, 10000).astype(np.uint16)


def write_geotiff(path: Path, tile: np.ndarray) -> None:
    import tifffile

    names = ["B02", "B03", "B04", "B08", "B11", "B12"]
    meta = "<GDALMetadata>" + "".join(f'<Item name="DESCRIPTION" sample="{i}" role="description">{n}</Item>' for i, n in enumerate(names)) + "</GDALMetadata>"
    tifffile.imwrite(path, tile, planarconfig="contig", photometric="minisblack",
                     extratags=[(42112, "s", 0, meta, True), (42113, "s", 0, "0", True)])


def write_multiband_task(root: Path, n_train: int, n_test: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        rows_tif, rows_png = [], []
        for i in range(n):
            cover = int(rng.integers(4))
            name = f"{split}-{i:05d}"
            media = root / "media"
            media.mkdir(parents=True, exist_ok=True)
            tile = multiband_tile(rng, cover)
            write_geotiff(media / f"{name}.tif", tile)
            rgb = tile[..., [2, 1, 0]].astype(np.float64)  # the naive path: an RGB picture, other bands dropped
            Image.fromarray(np.clip(rgb / 3000 * 255, 0, 255).astype(np.uint8)).save(media / f"{name}.png")
            row = {"id": name, "question": "what land cover is this ?", "answer": COVERS[cover], "choices": COVERS}
            rows_tif.append({**row, "image": f"{name}.tif"})
            rows_png.append({**row, "image": f"{name}.png"})
        for kind, rows in (("tif", rows_tif), ("naive", rows_png)):
            (root / kind).mkdir(parents=True, exist_ok=True)
            (root / kind / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


FLOOD_WORDS = "which acquisition shows the flood ? earlier later".split()


def write_flood_task(root: Path, n_train: int, n_test: int, seed: int = 0) -> None:
    """Two acquisitions of one place, one flooded (water: low NIR and SWIR) and one dry (forest, crop or urban): "which
    acquisition shows the flood ?" -> earlier / later. Each JSONL line lists the two files in a random order;
    ``root/dated`` gives their dates, ``root/undated`` does not (the naive path: a set of images, time unknown)."""
    from datetime import date, timedelta

    rng = np.random.default_rng(seed)
    media = root / "media"
    media.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        dated, undated = [], []
        for i in range(n):
            name = f"{split}-{i:05d}"
            flood_later = bool(rng.integers(2))
            first = date(2019, 1, 1) + timedelta(days=int(rng.integers(0, 1000)))
            second = first + timedelta(days=int(rng.integers(20, 400)))
            tiles = [multiband_tile(rng, 0 if not flood_later else int(rng.integers(1, 4))),
                     multiband_tile(rng, 0 if flood_later else int(rng.integers(1, 4)))]
            files = [f"{name}-{c}.tif" for c in rng.permutation(["a", "b"])]  # names say nothing of the order
            for tile, file in zip(tiles, files):
                write_geotiff(media / file, tile)
            order = rng.permutation(2)
            row = {"id": name, "media": [files[k] for k in order], "question": "which acquisition shows the flood ?",
                   "answer": "later" if flood_later else "earlier", "choices": ["earlier", "later"]}
            dated.append({**row, "dates": [[first, second][k].isoformat() for k in order]})
            undated.append(row)
        for kind, rows in (("dated", dated), ("undated", undated)):
            (root / kind).mkdir(parents=True, exist_ok=True)
            (root / kind / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def train_task(jsonl_dir: Path, media: Path, out: Path, llm_dir: str, *, domain: dict, channels: int, steps: int = 300,
               patch_size: int = 8, max_length: int = 128, connector: dict | None = None) -> float:
    """make-shards with ``domain``, train connector + the tiny LLM (encoder frozen), return held-out accuracy."""
    from mmdomain.domains import build_domain
    from mmdomain.recipe import validate_recipe
    from mmdomain.shards import make_shards
    from mmdomain.train import train

    shards = out / "shards"
    for split in ("train", "test"):
        make_shards(jsonl_dir / f"{split}.jsonl", media, shards, prefix=split, samples_per_shard=500,
                    domain=build_domain(domain["name"], domain.get("options"), raw=True))  # statistics come from the shards
    recipe = validate_recipe({
        "stage": "instruct",
        "model": {"encoder": {"name": "tiny-vit", "options": {"image_size": SIZE, "patch_size": patch_size, "dim": 64, "depth": 2, "channels": channels}},
                  "connector": connector or {"name": "mlp"}, "llm": {"path": llm_dir}, "domain": domain, "max_length": max_length},
        "trainable": {"connector": True, "llm": "full"},
        "data": {"train": str(shards / "train-*.tar"), "eval": str(shards / "test-*.tar"), "shuffle_buffer": 500},
        "optim": {"lr": 1e-3, "warmup_steps": 20, "max_steps": steps, "batch_size": 32},
        "output_dir": str(out / "run"), "log_every": 50,
    })
    return train(recipe)["eval"]["closed"]["accuracy"]
