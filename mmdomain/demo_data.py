"""The demo's synthetic domain task: grey 64x64 "scans" with one lesion in one of four quadrants.

Each scan has a blotchy low-frequency background, faint stripes, speckle and two faint distractor spots; a
Gaussian lesion (peak about 4-6 background standard deviations) sits in one quadrant: an ideal matched filter
names the quadrant about 98 % of the time (misses are lesions on a midline), so the task is learnable but not
trivial. Questions come in four paraphrases; the answer is the quadrant (chance 0.25). Align samples are captions
naming the quadrant; instruct and held-out samples are questions with the four choices.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

QUADRANTS = ["upper left", "upper right", "lower left", "lower right"]
QUESTIONS = ["where is the lesion ?", "which quadrant holds the finding ?", "in which quadrant is the lesion ?", "where is the finding ?"]
CAPTION = "a scan with a lesion in the {} quadrant ."
CAPTION_PROMPT = "describe the scan ."
SIZE = 64


def vocabulary() -> list[str]:
    words = " ".join(QUADRANTS + QUESTIONS + [CAPTION, CAPTION_PROMPT]).split()
    return list(dict.fromkeys(words))


def _blob(size: int, cy: float, cx: float, sigma: float) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size]
    return np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * sigma**2))


def make_scan(rng: np.random.Generator, quadrant: int) -> np.ndarray:
    """One uint8 scan with its lesion in ``quadrant`` (0..3 as in QUADRANTS)."""
    coarse = rng.normal(size=(8, 8))
    background = np.kron(coarse, np.ones((SIZE // 8, SIZE // 8)))
    background = np.real(np.fft.ifft2(np.fft.fft2(background) * np.exp(-0.02 * (np.add.outer(np.fft.fftfreq(SIZE) ** 2, np.fft.fftfreq(SIZE) ** 2) * SIZE**2))))
    img = background / (background.std() + 1e-6) * 0.5
    angle = rng.uniform(0, np.pi)
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    img += 0.3 * np.sin((np.cos(angle) * x + np.sin(angle) * y) * rng.uniform(0.3, 0.8))
    img += rng.normal(scale=0.35, size=(SIZE, SIZE))
    for _ in range(2):  # distractors: fainter and smaller than the lesion, anywhere
        img += rng.uniform(0.3, 0.5) * _blob(SIZE, rng.uniform(4, SIZE - 4), rng.uniform(4, SIZE - 4), rng.uniform(1.5, 2.5))
    img = (img - img.mean()) / (img.std() + 1e-6)
    half = SIZE // 2
    cy = rng.uniform(6, half - 6) + (half if quadrant >= 2 else 0)
    cx = rng.uniform(6, half - 6) + (half if quadrant % 2 else 0)
    img += rng.uniform(1.0, 1.5) * _blob(SIZE, cy, cx, rng.uniform(3.0, 4.5)) * 4.0
    img = (img - img.mean()) / (img.std() + 1e-6)
    return np.clip(img * 40 + 128, 0, 255).astype(np.uint8)


def write_split(directory: Path, name: str, n: int, seed: int, *, kind: str, shuffle_images: bool = False) -> Path:
    """Write ``n`` PNG scans and ``{name}.jsonl``; ``kind`` is ``caption``, ``vqa`` or ``pairs`` (the right quadrant
    chosen over a random wrong one). Returns the JSONL path.

    ``shuffle_images`` permutes the images against their labels: the control in which nothing is learnable.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    media = directory / "media"
    media.mkdir(parents=True, exist_ok=True)
    quadrants = rng.integers(0, 4, size=n)
    files = []
    for i, q in enumerate(quadrants):
        path = media / f"{name}-{i:05d}.png"
        Image.fromarray(make_scan(rng, int(q))).save(path)
        files.append(path.name)
    if shuffle_images:
        files = [files[j] for j in rng.permutation(n)]
    jsonl = directory / f"{name}.jsonl"
    with jsonl.open("w") as f:
        for i, (file, q) in enumerate(zip(files, quadrants)):
            answer = QUADRANTS[int(q)]
            if kind == "caption":
                record = {"id": f"{name}-{i:05d}", "image": file, "question": CAPTION_PROMPT, "answer": CAPTION.format(answer)}
            elif kind == "pairs":  # preference pairs: the right quadrant preferred to a wrong one
                wrong = QUADRANTS[(int(q) + 1 + int(rng.integers(3))) % 4]
                record = {"id": f"{name}-{i:05d}", "media": [file], "prompt": QUESTIONS[int(rng.integers(4))], "chosen": answer,
                          "rejected": wrong, "choices": QUADRANTS}
            else:
                record = {"id": f"{name}-{i:05d}", "image": file, "question": QUESTIONS[int(rng.integers(4))], "answer": answer, "choices": QUADRANTS}
            f.write(json.dumps(record) + "\n")
    return jsonl
