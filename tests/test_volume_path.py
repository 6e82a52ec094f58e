"""Volumes as volumes: ``nifti.mode: volume`` decodes one stack of slices per file, the 2-D encoder sees every slice,
and the ``depth_pool`` connector joins them into the token count the processor reserved."""
from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch

from connectors import create_connector
from mmdomain.domains import build_domain

from .domain_tasks import write_side_task


def _nifti(volume: np.ndarray) -> bytes:
    import nibabel as nib

    return gzip.compress(nib.Nifti1Image(volume, np.eye(4)).to_bytes())


def test_volume_mode_decodes_one_evenly_resampled_stack():
    volume = np.stack([np.full((6, 5), float(z)) for z in range(9)], axis=-1).astype(np.float32)
    volume[0, 0, :] = 100  # the window's top, so each slice's value shows through a min-max window
    (stack,) = build_domain("medical", {"window": "minmax", "nifti": {"mode": "volume", "count": 4}}).decode("v.nii.gz", _nifti(volume))
    assert stack.shape == (4, 6, 5)
    assert np.allclose(stack[:, 1, 1] * 100, [0, 3, 5, 8])  # first to last slice, nearest ones (np.round: 2.67 -> 3, 5.33 -> 5)
    (windows,) = build_domain("medical", {"window": ["minmax", "brain"], "nifti": {"mode": "volume", "count": 4}}).decode("v.nii.gz", _nifti(volume))
    assert windows.shape == (4, 6, 5, 2)
    # A 2-D image in a volume model is a one-slice volume: the same depth, so it batches with CT volumes.
    from PIL import Image
    import io

    png = io.BytesIO()
    Image.fromarray(np.arange(30, dtype=np.uint8).reshape(6, 5)).save(png, format="PNG")
    (flat,) = build_domain("medical", {"nifti": {"mode": "volume", "count": 4}}).decode("x.png", png.getvalue())
    assert flat.shape == (4, 6, 5) and all(np.array_equal(flat[0], s) for s in flat)


def test_depth_pool_joins_slices_by_depth_and_reports_its_tokens():
    connector = create_connector("depth_pool", in_dim=16, out_dim=24, groups=2)
    slices = torch.randn(3, 5, 7, 16)  # 3 volumes, 5 slices of 7 tokens
    out = connector(slices)
    assert out.shape == (3, connector.num_output_tokens(7), 24) == (3, 14, 24)
    # Depth order matters (a position signal per slice): the same slices in reverse give other tokens.
    assert not torch.allclose(connector(slices.flip(1)), out, atol=1e-4)
    # Slab 0 sees only the first slices: changing the last slice leaves its tokens alone.
    changed = slices.clone()
    changed[:, -1] += 5
    assert torch.allclose(connector(changed)[:, :7], out[:, :7]) and not torch.allclose(connector(changed)[:, 7:], out[:, 7:])
    assert create_connector("depth_pool", in_dim=16, out_dim=24)(torch.randn(2, 7, 16)).shape == (2, 7, 24)  # an image: one slice
    with pytest.raises(ValueError, match="groups=2 needs at least 2 slices per item; got 1"):
        connector(torch.randn(2, 7, 16))


def test_volume_domain_with_a_slice_blind_connector_is_refused(tiny_llm_dir):
    from mmdomain.builder import build_model
    from mmdomain.errors import ModelLoadError
    from mmdomain.spec import ModelSpec

    spec = ModelSpec.model_validate({"encoder": {"name": "tiny-vit", "options": {"image_size": 32, "channels": 1}}, "llm": {"path": tiny_llm_dir},
                                     "domain": {"name": "medical", "options": {"nifti": {"mode": "volume", "count": 4}}}})
    with pytest.raises(ModelLoadError, match=r"model.domain decodes each volume as 4 slices .* model.connector 'mlp' takes one image's tokens; use connector depth_pool"):
        build_model(spec)
    too_many = spec.model_copy(update={"connector": spec.connector.model_copy(update={"name": "depth_pool", "options": {"groups": 5}})})
    with pytest.raises(ModelLoadError, match=r"model.connector 'depth_pool' needs at least 5 slices per item, but model.domain decodes 4 \(nifti.count\)"):
        build_model(too_many)


VOLUME_DOMAIN = {"name": "medical", "options": {"nifti": {"mode": "volume", "count": 4}}}


@pytest.fixture(scope="module")
def volume_shards(tmp_path_factory):
    """Left/right NIfTI volumes (5 slices, stored in assorted voxel orders) in train and test shards."""
    from mmdomain.shards import make_shards

    root = tmp_path_factory.mktemp("volumes")
    write_side_task(root, 48, 8)
    for split in ("train", "test"):
        make_shards(root / f"{split}.jsonl", root / "media", root / "shards", prefix=split, domain=build_domain("medical", VOLUME_DOMAIN["options"]))
    return root / "shards"


def _volume_recipe(shards, llm: str, out, **changes) -> dict:
    return {
        "stage": "instruct",
        "model": {"encoder": {"name": "tiny-vit", "options": {"image_size": 32, "patch_size": 8, "dim": 32, "depth": 1, "channels": 1}},
                  "connector": {"name": "depth_pool", "options": {"groups": 2}}, "llm": {"path": llm}, "domain": VOLUME_DOMAIN, "max_length": 96},
        "trainable": {"connector": True, "llm": "full"},
        "data": {"train": str(shards / "train-*.tar"), "eval": str(shards / "test-*.tar"), "shuffle_buffer": 0},
        "optim": {"lr": 1e-3, "warmup_steps": 2, "max_steps": 12, "batch_size": 8},
        "output_dir": str(out), "log_every": 4, "seed": 3, **changes,
    }


def test_volume_path_trains_saves_and_reloads(tiny_llm_dir, volume_shards, tmp_path):
    """A recipe with nifti.mode volume and depth_pool trains (loss falls); the checkpoint reloads to the same
    outputs; every item fills exactly the placeholder tokens the processor reserved."""
    from mmdomain.builder import load_pretrained
    from mmdomain.data import FailureBudget, iter_records
    from mmdomain.recipe import validate_recipe
    from mmdomain.train import train

    result = train(validate_recipe(_volume_recipe(volume_shards, tiny_llm_dir, tmp_path / "run")))
    assert result["final_loss"] < result["first_loss"]

    model, processor = load_pretrained(tmp_path / "run")
    again, _ = load_pretrained(tmp_path / "run")
    assert processor.tokens_per_item == 2 * 16  # two slabs of a 4 x 4 patch grid
    (record,) = list(iter_records([str(p) for p in sorted(volume_shards.glob("test-*.tar"))], processor.domain,
                                  failures=FailureBudget(0)))[:1]
    sample = processor(record.conversations, record.media, key=record.key)
    assert sample.media[0].shape == (1, 4, 1, 32, 32)  # one item of 4 slices
    assert int((sample.input_ids == processor.media_token_id).sum()) == processor.tokens_per_item
    batch = processor.collate([sample])
    model.eval(), again.eval()
    with torch.no_grad():
        tokens = model.encode(0, batch["media"][0])
        assert tokens.shape[:2] == (1, processor.tokens_per_item)
        logits = model(batch["input_ids"], batch["attention_mask"], media=batch["media"], return_logits=True).logits
        assert torch.equal(logits, again(batch["input_ids"], batch["attention_mask"], media=batch["media"], return_logits=True).logits)
    stored = json.loads((sorted((tmp_path / "run").glob("**/mmdomain_config.json"))[-1]).read_text())
    assert stored["tokens_per_item"] == [processor.tokens_per_item]


def test_volume_features_cache_slice_by_slice(tiny_llm_dir, volume_shards, tmp_path):
    """cache-features stores each volume's slices' features ``[slices, tokens, dim]``; trained from the cache, the model
    gives the loss of the full pipeline."""
    from mmdomain.builder import build_model
    from mmdomain.cli import main
    from mmdomain.data import FailureBudget, expand_shards, iter_records
    from mmdomain.feature_cache import open_cache
    from mmdomain.recipe import load_recipe

    (tmp_path / "r.yaml").write_text(json.dumps(_volume_recipe(volume_shards, tiny_llm_dir, tmp_path / "run")))
    assert main(["-q", "cache-features", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "cache")]) == 0
    recipe = load_recipe(tmp_path / "r.yaml")
    torch.manual_seed(recipe.seed)  # the random encoder the cache was made with
    model, proc = build_model(recipe.model)
    raw = list(iter_records(expand_shards(recipe.data.train), proc.domains, failures=FailureBudget(0)))[:8]
    full = model(**proc.collate([proc(r.conversations, r.media, key=r.key) for r in raw]))
    train_patterns, _ = open_cache(tmp_path / "cache", model, proc, recipe)
    cached = list(iter_records(expand_shards(train_patterns), proc.domains, failures=FailureBudget(0)))[:8]
    batch = proc.collate([proc(r.conversations, r.media, key=r.key) for r in cached])
    assert batch["media"][0].encoded and batch["media"][0].values.shape == (8, 4, 16, 32)
    assert abs(model(**batch).loss.item() - full.loss.item()) < 1e-3  # fp16 storage of the features


def test_a_dicom_series_in_volume_mode_is_one_stack_in_position_order(tmp_path):
    """The series helper hands its volume to the same slice views: ``volume`` mode gives one stack, slices in position order."""
    from pydicom.uid import generate_uid

    from .test_domain_dicom_series import WINDOW, _shard_items, _windowed, write_series

    positions = [30.0, -10.0, 20.0, 0.0, 10.0]
    volume = write_series(tmp_path / "media" / "series", [f"s{i}.dcm" for i in range(5)], positions, series_uid=generate_uid())
    member, data = _shard_items(tmp_path, [{"id": "ct", "image": "series"}])["ct"]
    in_order = [_windowed(volume[p]) for p in sorted(positions)]
    (stack,) = build_domain("medical", {"window": WINDOW, "nifti": {"mode": "volume", "count": 3}}).decode(member, data)
    assert stack.shape == (3, 64, 64) and all(np.allclose(stack[k], in_order[i], atol=1e-5) for k, i in enumerate([0, 2, 4]))
