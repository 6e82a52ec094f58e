"""The CPU training process keeps large freed tensors in its heap, unless the user chose the allocator themselves."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from mmdomain import host_allocator

# In a fresh interpreter (the tuning is process-wide and done once): whether a 64 MiB block comes from the brk heap
# (what the raised mmap threshold does) or from its own mmap (glibc's default above 32 MiB).
PROBE = """
import ctypes, json, sys
from mmdomain.host_allocator import tune_host_allocator
said = tune_host_allocator() if sys.argv[1] == "tune" else "untouched"
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
block = libc.malloc(64 << 20)
heap = [line.split()[0].split("-") for line in open("/proc/self/maps") if line.rstrip().endswith("[heap]")]
in_heap = any(int(lo, 16) <= block < int(hi, 16) for lo, hi in heap)
print(json.dumps({"said": said, "in_heap": in_heap}))
"""

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")


def _probe(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD", host_allocator.ENV)}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env={**clean, **env}, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_tuned_process_serves_large_blocks_from_the_heap():
    assert _probe("plain") == {"said": "untouched", "in_heap": False}  # glibc's default: its own mapping, unmapped on free
    tuned = _probe("tune")
    assert tuned["in_heap"] and tuned["said"].startswith("tuned")


@glibc_only
def test_the_users_choice_is_left_alone():
    for env, reason in [({host_allocator.ENV: "system"}, "MMDOMAIN_HOST_ALLOCATOR=system"), ({"MALLOC_ARENA_MAX": "2"}, "MALLOC_ARENA_MAX is set")]:
        result = _probe("tune", **env)
        assert result == {"said": f"left as it is ({reason})", "in_heap": False}


def test_a_preloaded_allocator_is_left_alone(monkeypatch):
    monkeypatch.delenv(host_allocator.ENV, raising=False)
    for name in [k for k in os.environ if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert host_allocator._user_choice() == "jemalloc is preloaded"


def test_cpu_training_tunes_the_allocator(tiny_llm_dir, tmp_path, monkeypatch):
    """A CPU run asks for the tuning before it builds anything (spied on: this test process keeps its allocator)."""
    import mmdomain.train as train_module
    from mmdomain.cli import main
    from mmdomain.recipe import validate_recipe

    from .conftest import write_side_task

    calls = []
    monkeypatch.setattr(train_module, "tune_host_allocator", lambda: calls.append("tuned"))
    (tmp_path / "task").mkdir()
    write_side_task(tmp_path / "task")
    assert main(["-q", "make-shards", "--jsonl", str(tmp_path / "task" / "samples.jsonl"), "--media", str(tmp_path / "task" / "media"),
                 "--out", str(tmp_path / "s")]) == 0
    recipe = validate_recipe({"model": {"encoder": {"name": "tiny-vit", "options": {"image_size": 32, "patch_size": 8, "dim": 32, "channels": 1}},
                                        "llm": {"path": tiny_llm_dir}, "max_length": 64},
                              "data": {"train": str(tmp_path / "s" / "*.tar")}, "optim": {"max_steps": 1, "batch_size": 4},
                              "output_dir": str(tmp_path / "run"), "device": "cpu"})
    train_module.train(recipe)
    assert calls == ["tuned"]
