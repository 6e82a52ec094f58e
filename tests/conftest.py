"""Shared fixtures: tiny random-init models and tokenizers written to temporary directories (offline, CPU)."""
from __future__ import annotations

import pytest
import torch

from mmdomain.tiny_models import write_tiny_llm

WORDS = "where is the finding lesion upper lower left right describe image a scan shows in quadrant . ?".split()

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory):
    return str(write_tiny_llm(tmp_path_factory.mktemp("llm"), WORDS, hidden=64, ffn=128, layers=2))


@pytest.fixture(scope="session")
def chat_llm_dir(tmp_path_factory):
    words = WORDS + ["<|im_start|>", "<|im_end|>", "user", "assistant", "system"]
    return str(write_tiny_llm(tmp_path_factory.mktemp("chat_llm"), words, hidden=64, ffn=128, layers=2, chat_template=CHATML))


def write_side_task(root, n: int = 64) -> None:
    """A tiny learnable task under ``root``: ``media/{i}.png`` with a bright left or right half, and ``samples.jsonl``
    asking where the lesion is (answer ``left`` or ``right``, choices given)."""
    import json

    import numpy as np
    from PIL import Image

    (root / "media").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        side = ["left", "right"][i % 2]
        img = rng.normal(100, 10, (32, 32))
        img[:, :16 if side == "left" else 16:] += 80
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / "media" / f"{i}.png")
        rows.append({"id": f"x{i}", "image": f"{i}.png", "question": "where is the lesion ?", "answer": side, "choices": ["left", "right"]})
    (root / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def with_changes(data: dict, changes: dict) -> dict:
    """``data`` with ``{"optim__max_steps": 5}``-style changes applied (``__`` separates nested keys)."""
    for key, value in changes.items():
        node = data
        *parents, leaf = key.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return data


def write_tar(path, members) -> str:
    """A tar file of ``(name, bytes)`` members, as any tool might write a shard."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)
