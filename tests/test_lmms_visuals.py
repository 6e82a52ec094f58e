"""Images that lmms-eval tasks hand over as PIL objects reach the model with the pixels the same picture has as a
file in mmdomain: a palette or RGBA image as RGB (np.asarray of a palette image is its palette indices), 16-bit grey
kept 16-bit."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("lmms_eval", reason="the lmms-eval plugin needs the lmms extra")

from mmdomain.domains.generic import decode_image  # noqa: E402
from mmdomain.lmms_model import visual_arrays  # noqa: E402


def _picture(mode: str) -> Image.Image:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    if mode == "P":
        return rgb.quantize(16)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (16, 16), dtype=np.uint16))
    return rgb.convert(mode)


@pytest.mark.parametrize("mode", ["P", "RGBA", "LA", "CMYK", "RGB", "L", "I;16"])
def test_a_pil_visual_gives_the_pixels_of_the_same_picture_as_a_file(mode):
    picture = _picture(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    encoded = io.BytesIO()
    picture.save(encoded, format=fmt)
    reopened = Image.open(io.BytesIO(encoded.getvalue()))
    (array,) = visual_arrays([reopened])
    as_file = decode_image(f"x.{fmt.lower()}", encoded.getvalue(), 10**6)
    assert array.shape == as_file.shape and array.dtype == as_file.dtype
    assert np.array_equal(array, as_file)
