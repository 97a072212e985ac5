"""The run directory's lock and checkpoint bookkeeping, without training anything."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ftune.errors import FtuneError
from ftune.run_dir import CHECKPOINT_COMPLETE, LOCK_FILE, RunDir, atomic_file, mark_checkpoint_complete, run_lock


def test_lock_is_exclusive_reentrant_and_released(tmp_path):
    with run_lock(tmp_path):
        assert (tmp_path / LOCK_FILE).read_text().split()[0] == str(os.getpid())
        with run_lock(tmp_path):  # the same process (export merging first) may enter again
            pass
        assert (tmp_path / LOCK_FILE).is_file()
    assert not (tmp_path / LOCK_FILE).exists()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    (tmp_path / LOCK_FILE).write_text(f"{dead} {os.uname().nodename}\n")
    notes = []
    with run_lock(tmp_path, echo=notes.append):
        assert (tmp_path / LOCK_FILE).read_text().split()[0] == str(os.getpid())
    assert notes and f"pid {dead}" in notes[0] and "taking over" in notes[0]


def test_live_lock_is_refused_with_its_pid(tmp_path):
    (tmp_path / LOCK_FILE).write_text(f"{os.getppid()} {os.uname().nodename}\n")
    with pytest.raises(FtuneError, match=f"pid {os.getppid()}"):
        with run_lock(tmp_path):
            pass


def test_only_marked_checkpoints_count(tmp_path):
    run = RunDir(tmp_path)
    for step in (2, 4, 6):
        (run.checkpoints / f"checkpoint-{step}").mkdir(parents=True)
        (run.checkpoints / f"checkpoint-{step}" / "adapter_model.safetensors").write_bytes(b"w")
    for step in (2, 4):
        mark_checkpoint_complete(run.checkpoints / f"checkpoint-{step}")
    assert run.last_checkpoint().name == "checkpoint-4"
    assert [p.name for p in run.incomplete_checkpoints()] == ["checkpoint-6"]
    assert (run.checkpoints / "checkpoint-4" / CHECKPOINT_COMPLETE).is_file()


def test_atomic_file_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(OSError):
        with atomic_file(target) as staging:
            staging.write_text("half")
            raise OSError("disk full")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.json"]
