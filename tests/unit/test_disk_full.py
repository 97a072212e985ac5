"""A write that runs out of room is one line whatever the writer raised: decided from errno and the filesystem's state
(the file-size limit, the free space), not from the exception class; other failures pass through untouched."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ftune import disk
from ftune.disk import DiskFull, explained
from ftune.run_dir import atomic_dir, atomic_file
from tests.conftest import REPO

# In a child process: cap files at 16 KiB (SIGXFSZ ignored, so writes fail with EFBIG) and let each writer that
# ftune's saves go through run into the cap inside ftune's write paths; print the lines they became.
WRITERS = r"""
import json, resource, sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from ftune.disk import DiskFull, explained, report_file_size_limit
from ftune.run_dir import atomic_dir, write_text_atomic

report_file_size_limit()
resource.setrlimit(resource.RLIMIT_FSIZE, (16384, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
root = Path(sys.argv[1])
big = torch.zeros(20000)
writers = {
    "torch.save": lambda folder: torch.save({"x": big}, folder / "optimizer.pt"),
    "safetensors": lambda folder: save_file({"x": big}, str(folder / "model.safetensors")),
    "python": lambda folder: write_text_atomic(folder / "metrics.jsonl", "x" * 20000),
}
lines = {}
for name, write in writers.items():
    folder = root / name
    folder.mkdir()
    try:  # as a Trainer checkpoint is written: in place, in the folder the explanation watches
        with explained(folder, needs="a checkpoint needs about 0.1 MiB", then="continue with ftune train --resume"):
            write(folder)
    except DiskFull as full:
        lines[name + " in place"] = full.problems
    try:  # as merge and export write: into a staging copy that replaces the target only when whole
        with atomic_dir(root / (name + "-staged")) as staging:
            write(staging)
    except DiskFull as full:
        lines[name + " staged"] = full.problems
print(json.dumps(lines))
"""


def test_every_writer_past_the_file_size_limit_is_one_line_naming_the_file(tmp_path):
    done = subprocess.run([sys.executable, "-c", WRITERS, str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(lines) == 6, lines  # each writer failed, in place and staged, and each failure was recognised
    for kind, problems in lines.items():
        [line] = problems
        assert line.startswith("cannot write ") and "File too large" in line and "file-size limit (ulimit -f) 0.016 MiB" in line, line
        assert "MiB free there" in line and "raise the file-size limit" in line, line
    assert "optimizer.pt" in lines["torch.save in place"][0] and "--resume" in lines["torch.save in place"][0]
    # The target, not the hidden staging copy (safetensors leaves no partial file to name, so the folder is named).
    assert f"cannot write {tmp_path}/safetensors-staged:" in lines["safetensors staged"][0]
    assert f"cannot write {tmp_path}/python-staged/metrics.jsonl:" in lines["python staged"][0]
    assert "more than the" in lines["safetensors staged"][0] and "run the command again" in lines["safetensors staged"][0]
    # Staged writes leave nothing behind: no target, no hidden staging folder.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["python", "safetensors", "torch.save"]


def raise_in_save(err: BaseException):
    def save():  # a frame named like a write, as torch.save's
        raise err
    save()


def test_errno_anywhere_in_the_chain_decides(tmp_path):
    def wrapped():
        try:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "optimizer.pt"))
        except OSError as err:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 23987456 vs 23987348") from err

    with pytest.raises(DiskFull) as info, explained(tmp_path, needs="a checkpoint needs about 1 MiB"):
        wrapped()
    [line] = info.value.problems
    assert line.startswith(f"cannot write {tmp_path / 'optimizer.pt'}: No space left on device;") and "free space and run" in line
    with pytest.raises(DiskFull, match="Disk quota exceeded"), explained(tmp_path, needs="x"):
        raise RuntimeError("Error while serializing: I/O error: Disk quota exceeded (os error 122)")


def test_without_errno_a_full_filesystem_or_a_file_at_the_limit_decides(tmp_path, monkeypatch):
    unexpected = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    with pytest.raises(RuntimeError) as info, explained(tmp_path, needs="x"):
        raise_in_save(unexpected)  # room to spare and no limit: not a disk problem, passed through untouched
    assert info.value is unexpected

    (tmp_path / "optimizer.pt").write_bytes(b"\0" * 4096)
    monkeypatch.setattr(disk, "file_size_limit", lambda: 4096)
    with pytest.raises(DiskFull, match=r"optimizer.pt: File too large; .* file-size limit \(ulimit -f\) 0.0039 MiB"), explained(tmp_path, needs="x"):
        raise_in_save(unexpected)

    monkeypatch.setattr(disk, "file_size_limit", lambda: None)
    monkeypatch.setattr(disk, "free_bytes", lambda path: 12345)
    with pytest.raises(DiskFull, match="No space left on device; 0.012 MiB free there"), explained(tmp_path, needs="x"):
        raise_in_save(unexpected)
    with pytest.raises(ValueError), explained(tmp_path, needs="x"):  # not raised while writing: never read as a full disk
        raise ValueError("bad shape")


def test_a_failed_staged_write_removes_its_partial_copy(tmp_path):
    target = tmp_path / "merged"
    with pytest.raises(DiskFull) as info, atomic_dir(target) as staging:
        (staging / "model.safetensors").write_bytes(b"\0" * 1000)
        raise OSError(errno.EDQUOT, "Disk quota exceeded")
    assert f"cannot write {target}: Disk quota exceeded" in info.value.problems[0]
    assert "more than the 0.00095 MiB" in info.value.problems[0]
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.EDQUOT  # --debug shows the cause
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DiskFull, match="Permission denied; fix its permissions"), atomic_file(tmp_path / "summary.json"):
        raise PermissionError(errno.EACCES, "Permission denied")
    assert list(tmp_path.iterdir()) == []


def test_other_failures_inside_a_staged_write_pass_through(tmp_path):
    with pytest.raises(KeyError), atomic_dir(tmp_path / "out"):
        raise KeyError("weight")
    assert list(tmp_path.iterdir()) == []
    assert Path(tmp_path).exists()
