"""make-shards stores only checked files from inside --media, and every domain caps pixels from the header, at both stages."""
from __future__ import annotations

import io
import json
import struct
import tarfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageFile

from mmdomain.cli import main
from mmdomain.data import FailureBudget, iter_records
from mmdomain.domains import DecodeError, build_domain
from mmdomain.domains.generic import open_image
from mmdomain.shards import ShardError, make_shards

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
FIX = "model.domain.options.max_pixels"  # every too-many-pixels message names the option to raise


def _refused(cls, fn, *args, **kwargs) -> str:
    """The message of the error ``fn`` raises, which must be exactly ``cls`` (not a subclass, not a Pillow error)."""
    with pytest.raises(Exception) as info:
        fn(*args, **kwargs)
    assert info.type is cls, f"{info.type.__name__}: {info.value}"
    return str(info.value)


def _image(fmt: str, size=(40, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, format=fmt)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _claimed_png(width: int, height: int) -> bytes:
    """A valid-looking greyscale PNG whose IHDR claims width x height, with one tiny IDAT: a decompression bomb's
    header without the bomb, so a test can prove the size is refused before any pixel is decoded."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + _chunk(b"IEND", b"")


def _npy(header: dict, payload: bytes = b"") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + payload


@pytest.fixture
def no_pixel_decoding(monkeypatch):
    """Fails the test if Pillow decodes pixels: a refusal must come from the header alone."""
    def decode(self):
        raise AssertionError(f"pixels of a {self.size} image were decoded")
    monkeypatch.setattr(ImageFile.ImageFile, "load", decode)


def _dataset(tmp_path, files: dict[str, bytes], media_paths: list[str]):
    """Media files written under tmp_path/media and a JSONL with one caption sample per media path."""
    media = tmp_path / "media"
    for rel, data in files.items():
        (media / rel).parent.mkdir(parents=True, exist_ok=True)
        (media / rel).write_bytes(data)
    media.mkdir(exist_ok=True)
    jsonl = tmp_path / "samples.jsonl"
    jsonl.write_text("".join(json.dumps({"image": p, "caption": "a scan"}) + "\n" for p in media_paths))
    return jsonl, media, tmp_path / "shards"


def _everything_written(out: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()) if out.exists() else b""


# -- paths stay inside --media ----------------------------------------------------------------------------------

def test_absolute_media_path_is_refused(tmp_path):
    secret = tmp_path / "outside" / "secret.png"
    secret.parent.mkdir()
    secret.write_bytes(_image("PNG"))  # a perfectly good image: only its place makes it wrong
    jsonl, media, out = _dataset(tmp_path, {"ok.png": _image("PNG")}, ["ok.png", str(secret)])
    message = _refused(ShardError, make_shards, jsonl, media, out)
    assert f"{jsonl}:2: media path {str(secret)!r} is absolute" in message
    assert f"write it relative to --media ({media})" in message
    assert secret.read_bytes() not in _everything_written(out)


def test_parent_directory_path_is_refused_and_nothing_leaks(tmp_path):
    secret = tmp_path / "outside" / "secret.png"
    secret.parent.mkdir()
    secret.write_bytes(_image("PNG", (13, 17)))
    jsonl, media, out = _dataset(tmp_path, {"ok.png": _image("PNG")}, ["ok.png", "sub/../../outside/secret.png"])
    message = _refused(ShardError, make_shards, jsonl, media, out)
    assert f"{jsonl}:2: media path 'sub/../../outside/secret.png' climbs out of --media with '..'" in message
    assert f"relative to --media ({media}) without '..'" in message
    assert not list(out.glob("*.tar")) and secret.read_bytes() not in _everything_written(out)


def test_symlink_placed_inside_media_still_works(tmp_path):
    """The rule is lexical: a link a team put inside --media (an archive on another disk) is inside by intent."""
    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "scan.png").write_bytes(_image("PNG"))
    jsonl, media, out = _dataset(tmp_path, {}, ["linked/scan.png"])
    (media / "linked").symlink_to(archive, target_is_directory=True)
    assert make_shards(jsonl, media, out)["total"] == 1


# -- what is stored is what it claims -------------------------------------------------------------------------

def test_text_file_named_png_is_refused(tmp_path):
    jsonl, media, out = _dataset(tmp_path, {"secret.png": b"password=hunter2\n"}, ["secret.png"])
    message = _refused(ShardError, make_shards, jsonl, media, out)
    assert message.startswith(f"{jsonl}:1: media 'secret.png': not a PNG, JPEG, WebP or BMP image")
    assert "hunter2" not in message and b"hunter2" not in _everything_written(out)
    assert "member" not in message  # make-shards names the JSONL path once, not the domain's member wording
    assert "not a PNG" in _refused(DecodeError, build_domain("generic").decode, "k.0.png", b"password=hunter2\n")


def test_jpeg_named_png_is_refused_at_make_shards_but_decodes_from_other_shards(tmp_path):
    """make-shards stores a member under the file's extension, so it must not lie; shards from other tools that
    call a JPEG .png are still read by content, which is an allowed format within the cap either way."""
    jpeg = _image("JPEG")
    jsonl, media, out = _dataset(tmp_path, {"photo.png": jpeg}, ["photo.png"])
    message = _refused(ShardError, make_shards, jsonl, media, out)
    assert f"{jsonl}:1: media 'photo.png': holds a JPEG image but is named .png; rename it to .jpg" in message
    assert build_domain("generic").decode("k.0.png", jpeg)[0].shape == (30, 40, 3)


def test_other_pillow_formats_are_refused_even_when_named_as_allowed(tmp_path):
    gif, tiff = _image("GIF"), _image("TIFF")
    assert "not a PNG, JPEG, WebP or BMP image" in _refused(DecodeError, build_domain("generic").decode, "k.0.png", gif)
    assert "not a PNG, JPEG, WebP or BMP image" in _refused(DecodeError, build_domain("generic").prepare_for_shard, "a.bmp", tiff)


@pytest.mark.parametrize("fmt, ext", [("PNG", "png"), ("JPEG", "jpg"), ("JPEG", "jpeg"), ("WEBP", "webp"), ("BMP", "bmp")])
def test_allowed_formats_are_stored_byte_for_byte(tmp_path, fmt, ext):
    data = _image(fmt)
    jsonl, media, out = _dataset(tmp_path, {f"a.{ext}": data}, [f"a.{ext}"])
    make_shards(jsonl, media, out)
    with tarfile.open(out / "train-000000.tar") as tar:
        assert tar.extractfile(f"train-00000001.0.{ext}").read() == data


# -- pixel caps from the header, at make-shards and at decode time ---------------------------------------------

def test_decompression_bomb_refused_at_make_shards_without_decoding(tmp_path, no_pixel_decoding):
    jsonl, media, out = _dataset(tmp_path, {"bomb.png": _claimed_png(100_000, 100_000)}, ["bomb.png"])
    message = _refused(ShardError, make_shards, jsonl, media, out)
    assert message.startswith(f"{jsonl}:1: media 'bomb.png': 100000 x 100000 = 10000000000 pixels exceeds max_pixels=64000000; "
                              "rejected before decoding")
    assert FIX in message


def test_decompression_bomb_refused_at_decode_time_without_decoding(tmp_path, no_pixel_decoding):
    bomb = _claimed_png(100_000, 100_000)
    message = _refused(DecodeError, build_domain("generic").decode, "s1.0.png", bomb)
    assert message.startswith("member 's1.0.png': 100000 x 100000 = 10000000000 pixels exceeds max_pixels=64000000")
    # Through the shard reader: one named, counted failure, not a crash and not a 10 GB allocation.
    shard = tmp_path / "old-000000.tar"
    conversation = {"conversations": [{"role": "user", "content": "<image> ?"}, {"role": "assistant", "content": "x"}]}
    with tarfile.open(shard, "w") as tar:
        for name, data in [("s1.json", json.dumps(conversation).encode()), ("s1.0.png", bomb)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    failures = FailureBudget(1)
    assert list(iter_records([str(shard)], build_domain("generic"), failures=failures)) == []
    (reason, _), = failures.failures.values()
    assert failures.total == 1 and "'0.png'" in reason and "max_pixels=64000000" in reason


def test_pillow_bomb_limits_neither_warn_nor_decide(tmp_path, no_pixel_decoding):
    """Past Pillow's warning threshold (~89 M pixels) and past its error threshold (~179 M), the refusal is this
    domain's DecodeError naming max_pixels, with no warning; and a cap raised above Pillow's is the one that decides."""
    generic = build_domain("generic")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a DecompressionBombWarning would fail the test
        for width, height in [(10_000, 10_000), (20_000, 20_000)]:
            message = _refused(DecodeError, generic.decode, "k.0.png", _claimed_png(width, height))
            assert f"{width} x {height} = {width * height} pixels exceeds max_pixels=64000000" in message
        img = open_image("k.0.png", _claimed_png(20_000, 20_000), max_pixels=500_000_000)  # header only
        assert img.size == (20_000, 20_000)
        img.close()


def test_small_image_over_small_cap_refused_at_both_stages(tmp_path):
    jsonl, media, out = _dataset(tmp_path, {"small.png": _image("PNG", (40, 30))}, ["small.png"])
    domain = build_domain("generic", {"max_pixels": 1000})
    message = _refused(ShardError, make_shards, jsonl, media, out, domain=domain)
    assert f"{jsonl}:1: media 'small.png': 40 x 30 = 1200 pixels exceeds max_pixels=1000" in message and FIX in message
    message = _refused(DecodeError, domain.decode, "k.0.png", _image("PNG", (40, 30)))
    assert "member 'k.0.png': 40 x 30 = 1200 pixels exceeds max_pixels=1000" in message
    assert build_domain("generic", {"max_pixels": 1200}).decode("k.0.png", _image("PNG", (40, 30)))[0].shape == (30, 40, 3)


def test_animated_frames_count_against_the_cap():
    frames = [Image.new("RGB", (40, 30), c) for c in (0, 128, 255)]
    buf = io.BytesIO()
    frames[0].save(buf, format="PNG", save_all=True, append_images=frames[1:])
    message = _refused(DecodeError, build_domain("generic", {"max_pixels": 3000}).prepare_for_shard, "anim.png", buf.getvalue())
    assert "member 'anim.png': 40 x 30 x 3 frames = 3600 pixels exceeds max_pixels=3000" in message


def test_webp_size_is_read_before_pillow_allocates_its_canvas(monkeypatch):
    from PIL import WebPImagePlugin

    def opened(*args, **kwargs):
        raise AssertionError("Pillow opened the WebP (and allocated its canvas) before the size check")
    monkeypatch.setattr(WebPImagePlugin, "WebPImageFile", opened)
    message = _refused(DecodeError, build_domain("generic", {"max_pixels": 1000}).decode, "k.0.webp", _image("WEBP", (40, 30)))
    assert "member 'k.0.webp': 40 x 30 = 1200 pixels exceeds max_pixels=1000" in message


def test_cap_reachable_from_make_shards_domain_options_and_recipe(tmp_path, capsys):
    jsonl, media, out = _dataset(tmp_path, {"small.png": _image("PNG", (40, 30))}, ["small.png"])
    args = ["make-shards", "--jsonl", str(jsonl), "--media", str(media), "--out", str(out)]
    assert main([*args, "--domain-options", '{"max_pixels": 1000}']) == 2
    assert "40 x 30 = 1200 pixels exceeds max_pixels=1000" in capsys.readouterr().err
    assert main([*args, "--domain-options", '{"max_pixel": 1000}']) == 2  # a typo is named, not a traceback
    assert "--domain-options for the generic domain: max_pixel: Extra inputs are not permitted" in capsys.readouterr().err
    assert main([*args, "--domain-options", "{max_pixels: 1000}"]) == 2
    assert "--domain-options is not valid JSON" in capsys.readouterr().err

    recipe = yaml.safe_load((RECIPES / "medical" / "align_siglip_qwen2.5-0.5b.yaml").read_text())
    recipe["model"]["domain"].setdefault("options", {})["max_pixels"] = 1000
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main([*args, "--recipe", str(tmp_path / "recipe.yaml")]) == 2
    assert "40 x 30 = 1200 pixels exceeds max_pixels=1000" in capsys.readouterr().err


# -- .npy: header only, no pickle -----------------------------------------------------------------------------

def test_npy_object_dtype_refused_at_both_stages(tmp_path):
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    jsonl, media, out = _dataset(tmp_path, {"feats.npy": buf.getvalue()}, ["feats.npy"])
    message = _refused(ShardError, make_shards, jsonl, media, out)
    assert f"{jsonl}:1: media 'feats.npy': .npy with dtype object holds pickled Python objects" in message
    assert "save a numeric array" in message
    message = _refused(DecodeError, build_domain("generic").decode, "k.0.npy", buf.getvalue())
    assert message.startswith("member 'k.0.npy': .npy with dtype object holds pickled Python objects")


def test_npy_oversized_header_refused_at_both_stages_without_reading(tmp_path):
    huge = _npy({"descr": "<f4", "fortran_order": False, "shape": (100_000, 100_000)}, b"\x00" * 16)
    jsonl, media, out = _dataset(tmp_path, {"feats.npy": huge}, ["feats.npy"])
    message = _refused(ShardError, make_shards, jsonl, media, out)
    assert f"{jsonl}:1: media 'feats.npy': .npy array of shape (100000, 100000) has 10000000000 elements, over max_pixels=64000000" in message
    assert FIX in message
    message = _refused(DecodeError, build_domain("generic").decode, "k.0.npy", huge)
    assert message.startswith("member 'k.0.npy': .npy array of shape (100000, 100000) has 10000000000 elements, over max_pixels=64000000")


def test_npy_truncated_or_with_trailing_bytes_is_refused():
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    buf = io.BytesIO()
    np.save(buf, array)
    generic = build_domain("generic")
    assert np.array_equal(generic.decode("k.0.npy", buf.getvalue())[0], array)
    assert "truncated .npy" in _refused(DecodeError, generic.decode, "k.0.npy", buf.getvalue()[:-4])
    message = _refused(DecodeError, generic.prepare_for_shard, "a.npy", buf.getvalue() + b"hidden")
    assert message.startswith("member 'a.npy': .npy holds 6 bytes after its array")


# -- other domains: one max_pixels per domain ------------------------------------------------------------------

@pytest.mark.parametrize("domain", ["medical", "remote_sensing"])
def test_domains_delegating_png_honour_their_own_max_pixels(tmp_path, domain):
    png = _image("PNG", (40, 30), "L")
    capped = build_domain(domain, {"max_pixels": 1000})
    for stage in (capped.decode, capped.prepare_for_shard):
        message = _refused(DecodeError, stage, "k.0.png", png)
        assert "member 'k.0.png': 40 x 30 = 1200 pixels exceeds max_pixels=1000" in message and FIX in message
    assert build_domain(domain).decode("k.0.png", png)[0].shape == (30, 40)
    # ... and at make-shards, where the PNG is now checked instead of copied unopened.
    jsonl, media, out = _dataset(tmp_path, {"cxr.png": png, "fake.png": b"not an image"}, ["cxr.png", "fake.png"])
    assert f"{jsonl}:1: media 'cxr.png': 40 x 30 = 1200" in _refused(ShardError, make_shards, jsonl, media, out, domain=capped)
    message = _refused(ShardError, make_shards, jsonl, media, tmp_path / "other", domain=build_domain(domain))
    assert f"{jsonl}:2: media 'fake.png': not a PNG, JPEG, WebP or BMP image" in message


def test_tiff_size_is_checked_from_the_header(tmp_path):
    """A small TIFF whose tags claim 100000 x 100000: refused from the header, before tifffile reads strips."""
    import tifffile

    path = tmp_path / "huge.tif"
    tifffile.imwrite(path, np.zeros((8, 8), np.uint16))
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tif.pages[0].tags["ImageWidth"].overwrite(100_000)
        tif.pages[0].tags["ImageLength"].overwrite(100_000)
    domain = build_domain("remote_sensing")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tifffile warns that the strips do not match the claimed size
        for stage in (domain.decode, domain.prepare_for_shard):
            message = _refused(DecodeError, stage, "huge.tif", path.read_bytes())
            assert message.startswith("member 'huge.tif': shape (100000, 100000) exceeds max_pixels=268435456; rejected before reading")
            assert FIX in message
