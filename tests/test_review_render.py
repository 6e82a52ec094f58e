"""What the review page shows of each media kind: a DICOM through the recipe's window, stacked windows as RGB, a
volume as a strip, a GeoTIFF as a chosen band composite, audio as a clean WAV plus a spectrogram; only pixels and
samples, never a header."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from mmdomain.domains import build_domain
from mmdomain.review_render import composite, image_panels, png_bytes, render_member, spectrogram, to_unit
from mmdomain.review_store import ReviewError

from .domain_tasks import ct_slice, multiband_tile, write_dicom, write_geotiff
from .review_fixtures import IDENTIFYING, PATIENT, WINDOW, windowed


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def _png_chunks(png: bytes) -> list[bytes]:
    chunks, at = [], 8
    while at < len(png):
        length = int.from_bytes(png[at : at + 4], "big")
        chunks.append(png[at + 4 : at + 8])
        at += 12 + length
    return chunks


@pytest.fixture
def ct(tmp_path):
    hu = ct_slice(np.random.default_rng(3), 1)
    write_dicom(tmp_path / "ct.dcm", hu, monochrome1=False, intercept=-1024.0, slope=1.0, patient=PATIENT)
    return hu, (tmp_path / "ct.dcm").read_bytes()


def test_a_dicom_is_shown_through_the_recipes_window_and_nothing_but_its_pixels_leaves(ct):
    hu, data = ct
    (view,) = render_member("0.dcm", data, build_domain("medical", {"window": WINDOW}), label="image 1")
    assert view.kind == "image" and view.wav is None
    assert np.array_equal(_pixels(view.png), windowed(hu))
    assert set(_png_chunks(view.png)) == {b"IHDR", b"IDAT", b"IEND"}  # no text chunk could carry a header value
    assert not any(secret in view.png for secret in IDENTIFYING)
    (lung,) = render_member("0.dcm", data, build_domain("medical", {"window": "lung"}), label="image 1")
    assert not np.array_equal(_pixels(lung.png), _pixels(view.png))  # the recipe's window decides, not a fixed one


def test_three_stacked_windows_are_one_rgb_image_and_two_are_two_grey_panels(ct):
    _, data = ct
    (rgb,) = render_member("0.dcm", data, build_domain("medical", {"window": ["lung", "mediastinum", "bone"]}), label="image 1")
    assert _pixels(rgb.png).shape == (64, 64, 3)
    two = render_member("0.dcm", data, build_domain("medical", {"window": ["lung", "bone"]}), label="image 1")
    assert [v.label for v in two] == ["image 1, channel 1", "image 1, channel 2"] and _pixels(two[0].png).shape == (64, 64)


def test_a_volume_item_is_a_strip_of_its_slices():
    volume = np.stack([np.full((8, 6), k / 3, np.float32) for k in range(4)])
    ((label, strip),) = image_panels(volume, volume=True)
    assert label == "4 slices" and strip.shape == (8, 4 * 6 + 3 * 2)
    assert [float(strip[0, k * 8]) for k in range(4)] == pytest.approx([0, 1 / 3, 2 / 3, 1])


def test_integer_images_are_scaled_by_their_dtype_and_large_ones_shrunk():
    assert to_unit(np.array([[0, 65535]], np.uint16)).tolist() == [[0.0, 1.0]]
    assert to_unit(np.array([[0, 255]], np.uint8)).tolist() == [[0.0, 1.0]]
    assert Image.open(io.BytesIO(png_bytes(np.zeros((300, 100)), max_side=150))).size == (50, 150)


def test_a_geotiff_is_shown_as_the_chosen_three_bands(tmp_path):
    tile = multiband_tile(np.random.default_rng(0), 2)
    write_geotiff(tmp_path / "t.tif", tile)
    domain = build_domain("remote_sensing", {"bands": ["B04", "B03", "B02", "B08"]})
    data = (tmp_path / "t.tif").read_bytes()
    (view,) = render_member("0.tif", data, domain, label="image 1", composite_bands=(3, 0, 1))
    assert view.label == "image 1 (R, G, B = B08, B04, B03)"
    shown = _pixels(view.png).astype(float)
    valid = tile[..., 3] != 0  # the nodata corner (GDAL_NODATA 0) is black
    lo, hi = np.percentile(tile[..., 3][valid], [2, 98])
    expected_red = np.round(np.clip((tile[..., 3] - lo) / (hi - lo), 0, 1) * valid * 255)
    assert np.abs(shown[..., 0] - expected_red).max() <= 1  # NIR as red, stretched over its own 2-98 %
    assert (shown[:2, :2] == 0).all()
    (default,) = render_member("0.tif", data, domain, label="image 1")
    assert default.label == "image 1 (R, G, B = B04, B03, B02)"
    with pytest.raises(ReviewError, match="--composite names band position 4, but the run selects 4 bands"):
        render_member("0.tif", data, domain, label="image 1", composite_bands=(4, 1, 0))
    (grey,) = render_member("0.tif", data, build_domain("remote_sensing", {"bands": ["B08"]}), label="image 1")
    assert grey.label == "image 1 (R, G, B = B08, B08, B08)"  # one band: shown grey, not refused
    bands, valid_mask = domain.read_bands("0.tif", data)
    assert composite(bands, valid_mask, (0, 1, 2)).shape == (64, 64, 3)


def test_audio_is_a_clean_wav_of_what_the_encoder_hears_and_a_spectrogram_with_the_tone_where_it_belongs(tmp_path):
    import soundfile as sf

    rate = 22050
    t = np.arange(int(rate * 0.5)) / rate
    with sf.SoundFile(tmp_path / "tone.wav", "w", samplerate=rate, channels=2, format="WAV") as f:
        f.title, f.artist = PATIENT, "SYN-0001"  # tags an audio file may carry; they must not reach the page
        f.write(np.stack([0.5 * np.sin(2 * np.pi * 1000 * t)] * 2, axis=1))
    data = (tmp_path / "tone.wav").read_bytes()
    assert PATIENT.encode() in data
    (view,) = render_member("0.wav", data, build_domain("audio", {"sample_rate": 16000}), label="audio 1")
    assert view.kind == "audio" and not any(secret in view.wav or secret in view.png for secret in IDENTIFYING)
    heard, heard_rate = sf.read(io.BytesIO(view.wav))
    assert heard_rate == 16000 and abs(len(heard) - 8000) <= 1 and np.abs(heard).max() == pytest.approx(0.5, abs=0.02)
    image = _pixels(view.png).astype(float)
    assert image.shape[0] == 257  # 512-point STFT: 257 frequency rows, low frequencies at the bottom
    row = int(np.argmax(image.sum(axis=(1, 2))))
    assert abs((256 - row) * 16000 / 512 - 1000) <= 40
    assert spectrogram(np.zeros(100, np.float32), 16000).shape[-1] == 3  # a clip shorter than the window still draws
