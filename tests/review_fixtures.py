"""A tiny run and shards to review: synthetic CT DICOMs carrying patient attributes (which must never reach the page
or the judgements), a tiny random model with the medical domain and a brain window, and a session over them."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mmdomain.builder import build_model, save_pretrained
from mmdomain.domains import build_domain
from mmdomain.spec import ModelSpec

from .domain_tasks import QUADRANTS, ct_slice, write_dicom

WINDOW = {"center": 40.0, "width": 80.0}
# What the synthetic DICOMs say about their patient; none of it may appear in anything the review serves or writes.
PATIENT = "Doe^Jane"
IDENTIFYING = [b"Doe^Jane", b"Doe", b"SYN-", b"20240101"]


def write_ct_items(media: Path, n: int, seed: int = 0) -> list[np.ndarray]:
    """``media/ct-{i}.dcm`` (HU slices; every third, from the third on, MONOCHROME1) and ``media/items.jsonl``; returns the HU arrays."""
    rng = np.random.default_rng(seed)
    media.mkdir(parents=True, exist_ok=True)
    slices, rows = [], []
    for i in range(n):
        quadrant = int(rng.integers(4))
        hu = ct_slice(rng, quadrant)
        write_dicom(media / f"ct-{i}.dcm", hu, monochrome1=i % 3 == 2, intercept=-1024.0, slope=1.0, patient=PATIENT)
        slices.append(hu)
        rows.append({"id": f"ct{i}", "image": f"ct-{i}.dcm", "question": "where is the finding ?", "answer": QUADRANTS[quadrant],
                     "choices": QUADRANTS})
    (media / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return slices


def medical_spec(llm_dir: str, window: dict = WINDOW) -> ModelSpec:
    return ModelSpec.model_validate({
        "encoder": {"name": "tiny-vit", "options": {"image_size": 32, "patch_size": 8, "dim": 32, "channels": 1}},
        "llm": {"path": llm_dir}, "domain": {"name": "medical", "options": {"window": window}}, "max_length": 256,
    })


def write_review_run(root: Path, llm_dir: str, n: int = 5) -> tuple[Path, str, list[np.ndarray]]:
    """(checkpoint, shard pattern, HU arrays) of ``n`` CT items sharded by make-shards and a tiny untrained model."""
    from mmdomain.shards import make_shards

    slices = write_ct_items(root / "media", n)
    spec = medical_spec(llm_dir)
    make_shards(root / "media" / "items.jsonl", root / "media", root / "shards", prefix="heldout",
                domain=build_domain("medical", spec.domain.options, raw=True))
    model, processor = build_model(spec)
    checkpoint = save_pretrained(model, processor, root / "run")
    return checkpoint, str(root / "shards" / "heldout-*.tar"), slices


def review_session(checkpoint: Path, shards: str, out: Path, *, mode: str = "pair", limit: int | None = None, judge: str = "tester",
                   max_new_tokens: int = 6):
    """A ReviewSession as `mmdomain review` builds it (without the server)."""
    from mmdomain.builder import load_pretrained
    from mmdomain.review_answers import Sampling
    from mmdomain.review_items import ReviewData
    from mmdomain.review_session import ReviewSession
    from mmdomain.review_store import JudgementStore

    model, processor = load_pretrained(checkpoint)
    raw = {kind.token: build_domain(kind.domain.name, kind.domain.options, raw=True) for kind in model.spec.kinds()}
    store = JudgementStore(out)
    return ReviewSession(model.eval(), processor, ReviewData(shards, processor, limit=limit), store,
                         Sampling(mode=mode, max_new_tokens=max_new_tokens), judge=judge, run=str(checkpoint), raw_domains=raw)


def windowed(hu: np.ndarray) -> np.ndarray:
    """The recipe's window applied by hand (the DICOM linear VOI function) to the HU the file stores (whole numbers:
    intercept -1024, slope 1): what the page must show, in 8 bits."""
    center, width = WINDOW["center"], WINDOW["width"]
    unit = np.clip((np.round(hu) - (center - 0.5)) / (width - 1) + 0.5, 0, 1)
    return np.round(unit * 255)
