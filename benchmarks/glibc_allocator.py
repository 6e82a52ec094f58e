"""`--allocator tuned` of the step benchmarks: glibc keeps large freed blocks in its heap instead of fresh pages.

glibc's malloc serves an allocation above its mmap threshold (128 KiB at start, adapting up to 32 MiB) with a new
mmap and returns it to the kernel on free, so a CPU step that allocates and frees the same large tensors every step
page-faults them in again (the kernel zero-fills every page). Raising both thresholds (``mallopt``) keeps them.
This moves HF Llava's tiny-preset step (its 266 MB all-position logits) from a bimodal 1.1-2.5 s to medians of
0.83-0.86 s in two 12-round runs, and it is why two quiet runs of the same baseline disagreed by half. mmdomain's own
step does not gain from it (`bench_host_allocator.py`: 1.05-1.07x slower tuned, 3 process pairs), so `mmdomain run`
leaves the allocator alone; the benchmarks use it to give the baseline its best allocator and report both.

Nothing is changed where the user already chose (a ``MALLOC_*`` / ``GLIBC_TUNABLES`` environment, a preloaded
allocator) or on a C library other than glibc.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

log = logging.getLogger(__name__)

# mallopt's parameter numbers (<malloc.h>) and the values set: an int, so at most 2 GiB - 1.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 1 << 30  # anything below 1 GiB comes from the heap (a 151,936-vocabulary logits chunk is 32 MiB)
TRIM_THRESHOLD = 2**31 - 1  # never shrink the heap from the top

_applied: str | None = None


def _user_choice() -> str | None:
    """Why the allocator is left as it is, or None when it is ours to tune."""
    chosen = [name for name in os.environ if name.startswith("MALLOC_") or name == "GLIBC_TUNABLES"]
    if chosen:
        return f"{chosen[0]} is set"
    preload = os.environ.get("LD_PRELOAD", "")
    for other in ("jemalloc", "tcmalloc", "mimalloc"):
        if other in preload:
            return f"{other} is preloaded"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc"
    return None


def tune_host_allocator() -> str:
    """Raise glibc's mmap and trim thresholds for this process (once); returns what was done, for the log."""
    global _applied
    if _applied is not None:
        return _applied
    reason = _user_choice()
    if reason is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            ok = libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(MMAP_THRESHOLD)) == 1
            ok = libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(TRIM_THRESHOLD)) == 1 and ok
        except (OSError, AttributeError) as exc:  # no loadable libc, or one without mallopt
            ok, reason = False, f"mallopt unavailable ({exc})"
        else:
            reason = None if ok else "mallopt refused the thresholds"
    if reason is None:
        _applied = "tuned: freed blocks below 1 GiB stay in the heap (mallopt M_MMAP_THRESHOLD 1 GiB, M_TRIM_THRESHOLD 2 GiB)"
    else:
        _applied = f"left as it is ({reason})"
    log.info("host allocator %s", _applied)
    return _applied
