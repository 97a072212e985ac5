"""SIGKILL a real ``ftune train`` at chosen moments, resume until it completes, and compare with an
uninterrupted run: same per-step losses, same final weights, same summary figures (bitwise, CPU fp32)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from ftune.cli import app
from tests.conftest import recipe_dict, write_recipe
from tests.e2e.forked import fault_check, run_ftune

STEPS = 6  # checkpoints at 2, 4, 6


@pytest.fixture(scope="module")
def recipe(tiny_llama_dir, alpaca_files, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    train, held_out = alpaca_files
    recipe = recipe_dict(tiny_llama_dir, train, held_out, root / "unused", training={"max_steps": STEPS, "save_steps": 2, "save_total_limit": 2})
    return write_recipe(root / "recipe.yaml", recipe)


@pytest.fixture(scope="module")
def reference(recipe, tmp_path_factory):
    run = tmp_path_factory.mktemp("reference") / "run"
    done = run_ftune("train", str(recipe), "--set", f"output_dir={run}")
    assert done.returncode == 0, done.stderr
    return fault_check.outcome(run)


@pytest.mark.parametrize("point,at", [
    ("model_load", 1), ("between_steps", 3), ("mid_checkpoint", 4), ("after_last_step", 1), ("final_eval", 1),
])
def test_killed_run_resumes_to_the_uninterrupted_result(point, at, recipe, reference, tmp_path):
    run = tmp_path / "run"
    died = run_ftune("train", str(recipe), "--set", f"output_dir={run}", fault=(point, at))
    assert died.returncode == -signal.SIGKILL, died.stderr
    assert not (run / "summary.json").exists()
    resumed = run_ftune("train", str(recipe), "--set", f"output_dir={run}", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "no longer runs" in resumed.stdout + resumed.stderr  # the dead process's lock was taken over
    if point == "mid_checkpoint":
        assert "Skipping checkpoint-4: it was not completely written" in resumed.stdout
    if point in ("after_last_step", "final_eval"):
        assert "Training had finished at step 6" in resumed.stdout and "step 7" not in resumed.stdout
    assert fault_check.identical(reference, fault_check.outcome(run)) == []
    assert len(list((run / "checkpoints").glob("checkpoint-*"))) <= 2  # save_total_limit holds after the resume


def test_second_writer_is_refused_with_the_first_ones_pid(recipe, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / ".ftune.lock").write_text(f"{holder.pid} {os.uname().nodename}\n")
        result = CliRunner().invoke(app, ["train", str(recipe), "--set", f"output_dir={run}", "--overwrite"])
        assert result.exit_code == 2 and f"pid {holder.pid}" in result.stderr and "another ftune process" in result.stderr
        assert (run / ".ftune.lock").is_file()  # the live holder keeps its lock
    finally:
        holder.kill()


def test_full_disk_is_one_line_and_resume_works_once_space_is_back(recipe, tmp_path, monkeypatch):
    import transformers

    run = tmp_path / "run"
    save = transformers.TrainerState.save_to_json

    def disk_full(self, json_path):
        if "checkpoint-4" in str(json_path):
            raise OSError(errno.ENOSPC, "No space left on device", json_path)
        return save(self, json_path)

    monkeypatch.setattr(transformers.TrainerState, "save_to_json", disk_full)
    result = CliRunner().invoke(app, ["train", str(recipe), "--set", f"output_dir={run}"])
    assert result.exit_code == 2, result.output
    [line] = result.stderr.strip().splitlines()
    assert "checkpoint-4" in line and "No space left on device" in line and "MiB free there" in line and "--resume" in line
    assert (run / "checkpoints" / "checkpoint-2" / "ftune-complete").is_file()  # the previous checkpoint is intact
    assert not (run / "checkpoints" / "checkpoint-4").exists()  # the partial one is removed
    assert not (run / ".ftune.lock").exists()

    monkeypatch.setattr(transformers.TrainerState, "save_to_json", save)
    result = CliRunner().invoke(app, ["train", str(recipe), "--set", f"output_dir={run}", "--resume"])
    assert result.exit_code == 0, result.output
    assert "Resuming from checkpoint-2" in result.output and (run / "summary.json").is_file()
