"""The export folder's life on disk: what a killed export leaves is cleared by the next one, and an OUT that is a
file is refused before any weights load."""
from __future__ import annotations

import subprocess
import sys

import pytest

from mmdomain.export import export
from mmdomain.export_output import ExportError, ExportWriter


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(done.stdout)


def test_the_previous_export_left_aside_by_a_kill_mid_replace_is_removed_by_the_next_export(tmp_path):
    out = tmp_path / "out"
    aside = tmp_path / f".out.old-{_dead_pid()}"  # os.replace(OUT, aside) done, the kill came before the new one moved in
    aside.mkdir()
    (aside / "model.safetensors").write_bytes(b"0" * 1000)
    with ExportWriter(out) as writer:
        (writer.path / "config.json").write_text("{}")
    assert (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no hidden model copy stays behind


def test_an_out_that_is_a_file_is_refused_before_the_run_is_even_read(tmp_path):
    (tmp_path / "out").write_text("notes")
    with pytest.raises(ExportError, match="is a file, not a folder; choose another OUT"):
        export(tmp_path / "no-such-run", tmp_path / "out", "native", overwrite=True)
    assert (tmp_path / "out").read_text() == "notes"
