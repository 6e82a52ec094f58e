"""Shared pieces of the export tests: tiny CLIP / SigLIP towers on disk, LoRA made visible, a Python without mmdomain."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from mmdomain.builder import build_model, save_pretrained
from mmdomain.spec import ModelSpec

# Lines a subprocess runs first: the venv's editable install of mmdomain (a meta-path finder) and any folder holding
# mmdomain, encoders or connectors are taken away, and the script checks that mmdomain is really not importable.
WITHOUT_MMDOMAIN = textwrap.dedent("""
    import os, sys
    sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    sys.path = [p for p in sys.path if p and not any(os.path.isdir(os.path.join(p, n)) for n in ("mmdomain", "encoders", "connectors"))]
    try:
        import mmdomain  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("mmdomain is importable in the subprocess; the test would prove nothing")
""")


def run_without_mmdomain(script: str, cwd: Path) -> dict:
    """Run ``script`` in a fresh ``python -I`` (no PYTHONPATH, no user site, cwd elsewhere) where mmdomain cannot be
    imported; it prints one JSON line last, returned here."""
    done = subprocess.run([sys.executable, "-I", "-c", WITHOUT_MMDOMAIN + textwrap.dedent(script)], cwd=cwd, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_tower(directory: Path, kind: str = "clip", layers: int = 3) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(1)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4, image_size=32, patch_size=8)
    model = CLIPVisionModel(CLIPVisionConfig(**common)) if kind == "clip" else SiglipVisionModel(SiglipVisionConfig(**common))
    with torch.no_grad():  # transformers' init (std 0.02) leaves features that barely depend on the image
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
    model.save_pretrained(str(directory))
    return directory


def visible_lora(model) -> None:
    """LoRA's B starts at zero, so an untrained adapter changes nothing; give every adapter a visible effect."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.requires_grad_(True)  # as training marks them: a checkpoint stores what trains
            if "lora_B" in name:
                p.normal_(0, 0.2)


def make_checkpoint(out: Path, llm_dir: str, tower: Path, *, layer: int = -2, keep_cls: bool = False, llm_lora: bool = False,
                    encoder_lora: bool = False, connector: dict | None = None, encoder: dict | None = None, domain: dict | None = None) -> Path:
    spec = {"encoder": encoder or {"name": f"hf:{tower}", "options": {"layer": layer, "keep_cls": keep_cls}},
            "connector": connector or {"name": "mlp"}, "llm": {"path": llm_dir}, "domain": domain or {"name": "generic"}}
    if llm_lora:
        spec["llm"]["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0}
    if encoder_lora:
        spec["encoder"]["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0}
    model, processor = build_model(ModelSpec.model_validate(spec))
    visible_lora(model)
    return save_pretrained(model, processor, out)


def sample_image(seed: int = 0, size: int = 32):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
