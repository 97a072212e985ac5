"""A checkpoint's completion marker records each file's size and checksum; a resume skips a checkpoint whose files
changed since (truncated, corrupted, missing), names the file, removes it and falls back to the previous one."""

from __future__ import annotations

import json

import pytest

from ftune.run_dir import CHECKPOINT_COMPLETE, RunDir, mark_checkpoint_complete
from ftune.training.checkpoints import checkpoint_damage, resume_point


@pytest.fixture
def run(tmp_path):
    run = RunDir(tmp_path / "run")
    for step in (2, 4, 6):
        folder = run.checkpoints / f"checkpoint-{step}"
        (folder / "sub").mkdir(parents=True)
        (folder / "optimizer.pt").write_bytes(bytes(range(256)) * (step + 10))
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        (folder / "sub" / "shard-0.bin").write_bytes(b"\1" * 100)
        mark_checkpoint_complete(folder)
    return run


def resume(run):
    said = []
    return resume_point(run, said.append), said


def test_the_marker_records_every_file(run):
    marker = json.loads((run.checkpoints / "checkpoint-6" / CHECKPOINT_COMPLETE).read_text())
    assert sorted(marker["files"]) == ["optimizer.pt", "sub/shard-0.bin", "trainer_state.json"]
    assert marker["files"]["optimizer.pt"]["size"] == 256 * 16 and len(marker["files"]["optimizer.pt"]["sha256"]) == 64
    assert resume(run) == (run.checkpoints / "checkpoint-6", ["Resuming from checkpoint-6"])


@pytest.mark.parametrize("damage,named", [
    ("truncate", "optimizer.pt is damaged (2,048 bytes, 4,096 when written)"),
    ("flip", "optimizer.pt is damaged (its SHA-256 differs from the one recorded when it was written)"),
    ("delete", "sub/shard-0.bin is missing"),
    ("marker", f"{CHECKPOINT_COMPLETE} is damaged"),
])
def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_used(run, damage, named):
    newest = run.checkpoints / "checkpoint-6"
    optimizer = newest / "optimizer.pt"
    if damage == "truncate":
        optimizer.write_bytes(optimizer.read_bytes()[:2048])
    elif damage == "flip":
        data = bytearray(optimizer.read_bytes())
        data[1000] ^= 0xFF
        optimizer.write_bytes(bytes(data))
    elif damage == "delete":
        (newest / "sub" / "shard-0.bin").unlink()
    else:
        marker = newest / CHECKPOINT_COMPLETE
        marker.write_text(marker.read_text()[:50])
    assert checkpoint_damage(newest) == named
    checkpoint, said = resume(run)
    assert checkpoint == run.checkpoints / "checkpoint-4"
    assert said == [f"Skipping checkpoint-6: {named}; removing it and resuming from the previous complete checkpoint",
                    "Resuming from checkpoint-4"]
    assert not newest.exists() and checkpoint_damage(checkpoint) is None


def test_every_checkpoint_damaged_starts_from_step_zero(run):
    for step in (2, 4, 6):
        (run.checkpoints / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    checkpoint, said = resume(run)
    assert checkpoint is None and said[-1] == "No complete checkpoint yet; training from step 0" and len(said) == 4


def test_a_marker_from_before_checksums_is_trusted(run):
    newest = run.checkpoints / "checkpoint-6"
    (newest / CHECKPOINT_COMPLETE).write_text("complete\n")
    (newest / "optimizer.pt").write_bytes(b"changed")  # nothing recorded to compare with
    assert resume(run)[0] == newest
