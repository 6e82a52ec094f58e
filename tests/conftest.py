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
