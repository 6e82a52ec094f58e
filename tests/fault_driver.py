"""Run the `mmdomain` CLI with one injected fault, for the kill and disk-full tests.

    python tests/fault_driver.py FAULT N -- run RECIPE [overrides]

FAULT happens at the N-th occurrence (counted in this process), on every rank, or under torchrun only on rank FAULT_RANK if set:
- ``kill-after-optimizer-step``: SIGKILL right after the N-th optimizer step (mid-step bookkeeping, before its save);
- ``kill-before-rename``: SIGKILL after the N-th checkpoint's COMPLETE marker is written, before its rename;
- ``kill-mid-write``: the N-th safetensors file gets 100 bytes, then SIGKILL (a checkpoint half written);
- ``disk-full``: the N-th safetensors write fails with ENOSPC (the process goes on to report it);
- ``sigterm-after-optimizer-step``: the process sends itself SIGTERM right after the N-th optimizer step.

SLOW_TEARDOWN_S=S makes each rank that does not fault wait S seconds before destroying its process group, the way a
slow teardown (NCCL, a loaded machine) does: long enough for torchrun to SIGTERM it after a peer died.
"""
from __future__ import annotations

import errno
import os
import signal
import sys


def main() -> int:
    fault, n, separator, *argv = sys.argv[1:]
    assert separator == "--", "usage: fault_driver.py FAULT N -- ARGS"
    target, calls = int(n), {"n": 0}
    if os.environ.get("FAULT_RANK", os.environ.get("RANK")) != os.environ.get("RANK"):  # FAULT_RANK: only that rank faults
        from mmdomain.cli import main as cli

        if os.environ.get("SLOW_TEARDOWN_S"):
            import time

            from mmdomain.distributed import World

            close = World.close

            def closing(self):
                time.sleep(float(os.environ["SLOW_TEARDOWN_S"]))
                close(self)

            World.close = closing
        return cli(argv)

    def due() -> bool:
        calls["n"] += 1
        return calls["n"] == target

    def kill() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    if fault in ("kill-after-optimizer-step", "sigterm-after-optimizer-step"):
        import torch

        step = torch.optim.AdamW.step

        def stepping(self, *args, **kwargs):
            out = step(self, *args, **kwargs)
            if due():
                kill() if fault.startswith("kill") else os.kill(os.getpid(), signal.SIGTERM)
            return out

        torch.optim.AdamW.step = stepping
    elif fault == "kill-before-rename":
        import mmdomain.checkpoint as checkpoint

        publish = checkpoint._publish

        def publishing(tmp, target_dir):
            if due():
                kill()
            return publish(tmp, target_dir)

        checkpoint._publish = publishing
    elif fault in ("kill-mid-write", "disk-full"):
        import safetensors.torch

        save_file = safetensors.torch.save_file

        def saving(tensors, filename, metadata=None):
            if due():
                if fault == "disk-full":
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
                with open(filename, "wb") as f:
                    f.write(b"\0" * 100)
                kill()
            return save_file(tensors, filename, metadata=metadata)

        safetensors.torch.save_file = saving
    else:
        raise SystemExit(f"unknown fault {fault!r}")
    from mmdomain.cli import main as cli

    return cli(argv)


if __name__ == "__main__":
    sys.exit(main())
