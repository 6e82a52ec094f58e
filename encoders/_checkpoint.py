"""Read third-party weight files (safetensors, or torch checkpoints read with ``weights_only=True``) and say in one
line, naming the file, why one cannot be read or does not fit a model."""
from __future__ import annotations

import argparse
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Iterable

import torch

from .errors import EncoderNotFoundError, WeightsFileError

# The weight files transformers reads from a model directory (safetensors first, torch pickles when there are none);
# other *.bin files there, e.g. training_args.bin, are not weights.
_HF_SAFETENSORS = ("model.safetensors", "model-*-of-*.safetensors")
_HF_PICKLES = ("pytorch_model.bin", "pytorch_model-*-of-*.bin")


def existing_weights_file(path: str | Path, what: str = "weights file") -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise EncoderNotFoundError(
            f"{what} {str(path)!r} does not exist. mmdomain and its encoders never download: "
            "fetch the file yourself and pass its local path"
        )
    return path


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict from a local file; never a download, never unrestricted unpickling."""
    path = existing_weights_file(path)
    try:
        state = _load(path, header_only=False)
    except Exception as exc:  # torch reports a broken file as any of half a dozen types (see unreadable_reason)
        raise WeightsFileError(unreadable_reason(path, exc)) from exc
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise WeightsFileError(f"weights file {str(path)!r} holds a {type(state).__name__}, not a state dict of tensors; "
                               "check that it is a checkpoint of the model's weights")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def diagnose_weights(path: str | Path) -> str | None:
    """Why the weights at ``path`` cannot be read, in one line naming the file and the fix; None when they can.

    ``path`` is a weights file, or a transformers model directory (its ``model*.safetensors``, or when there are none
    its ``pytorch_model*.bin``). Cheap: safetensors headers are checked without reading tensors, and zip-format torch
    files are opened memory-mapped, so this can run before a library reads the file itself, or after it failed.
    """
    path = Path(path).expanduser()
    for file in _hf_weight_files(path) if path.is_dir() else [path]:
        try:
            _load(file, header_only=True)
        except Exception as exc:  # torch reports a broken file as any of half a dozen types (see unreadable_reason)
            return unreadable_reason(file, exc)
    return None


def _hf_weight_files(directory: Path) -> list[Path]:
    def matching(patterns: Iterable[str]) -> list[Path]:
        return sorted({p for pattern in patterns for p in directory.glob(pattern) if p.is_file()})

    return matching(_HF_SAFETENSORS) or matching(_HF_PICKLES)


def _load(path: Path, *, header_only: bool) -> Any:
    if path.suffix == ".safetensors":
        if header_only:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:  # validates the header against the file's length
                f.keys()
            return None
        from safetensors.torch import load_file

        return load_file(str(path))
    # Only zip-format files can be memory-mapped; legacy torch pickles are read whole.
    mmap = header_only and zipfile.is_zipfile(path)
    # timm's training checkpoints store their argparse.Namespace under "args", and timm loads them with it
    # allow-listed; a Namespace holds plain attributes only, so allowing it here too opens nothing.
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)


def unreadable_reason(path: Path, exc: BaseException) -> str:
    """One line for a weights file that failed to load with ``exc``: the file, what is wrong with it, and the fix."""
    message = str(exc)
    name = f"weights file {str(path)!r}"
    if isinstance(exc, pickle.UnpicklingError):
        needed = re.search(r"GLOBAL ([\w.]+)", message)
        if needed:
            return (f"{name} is a pickle that needs {needed.group(1)} to load, and torch refuses to unpickle it "
                    "(weights_only=True: unpickling arbitrary objects can run code). If you trust its source, convert "
                    "it to safetensors once (torch.load(..., weights_only=False) in a separate session, then "
                    "safetensors.torch.save_file of its tensors), or use the .safetensors release of the same weights")
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", message)
        return (f"{name} is not a checkpoint torch can read with weights_only=True"
                f"{f' ({detail.group(1).strip()})' if detail else ''}: a pickle of other objects, or not a checkpoint "
                "at all (e.g. an HTML page saved by a failed download). Download it again, or use the .safetensors "
                "release of the same weights")
    if type(exc).__name__ == "SafetensorError":
        return (f"{name} is not a complete safetensors file ({_first_line(message)}); it is probably truncated or "
                "corrupt: download it again and compare its size with the source's")
    return (f"{name} is not a readable torch checkpoint ({type(exc).__name__}: {_first_line(message) or 'no detail'}); "
            "it is probably truncated, corrupt or not a checkpoint at all: download it again, or use the .safetensors "
            "release of the same weights")


def _first_line(text: str, limit: int = 120) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


_SIZE_MISMATCH = re.compile(r"size mismatch for ([^:\s]+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from "
                            r"checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)")


def describe_key_mismatch(missing: list[str] | tuple[str, ...] = (), shapes: list[tuple[str, Any, Any]] | tuple = (),
                          load_error: str = "") -> str:
    """What did not fit, in one line: how many weights are missing or of another shape, and the first few.

    ``shapes`` holds (name, shape in the file, shape in the model); ``load_error`` is torch's ``load_state_dict``
    message, whose size mismatches are parsed here instead of pasting its long text.
    """
    shapes = [(k, _shape(f), _shape(m)) for k, f, m in shapes] + _SIZE_MISMATCH.findall(load_error)
    strict_missing = re.search(r"Missing key\(s\) in state_dict: (.*)", load_error)
    missing = list(missing) + (re.findall(r'"([^"]+)"', strict_missing.group(1)) if strict_missing else [])
    parts = []
    if missing:
        parts.append(f"{len(missing)} weights missing (first: {', '.join(sorted(missing)[:3])})")
    if shapes:
        first = "; ".join(f"{k}: file {f}, model {m}" for k, f, m in sorted(shapes)[:3])
        parts.append(f"{len(shapes)} of another shape (first: {first})")
    if not parts and load_error:
        parts.append(_first_line(load_error.replace("\n", " "), 200))
    return "; ".join(parts)


def _shape(shape: Any) -> str:
    return shape if isinstance(shape, str) else str(list(shape))
