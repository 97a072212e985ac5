"""A process of a multi-process run that is killed or fails ends the whole run within seconds: ``ftune train --nproc 2``
exits non-zero with one line naming the rank and its cause, no traceback, the run directory unlocked, and ``--resume``
continues to the curve of an uninterrupted run. The kills are real SIGKILLs, placed in one rank by
scripts/fault_check.py's ``rank_fault_environment`` (CPU, gloo, the tiny model)."""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest
from safetensors.torch import load_file

from ftune.recipe import load_recipe
from ftune.run_dir import CHECKPOINT_COMPLETE, LOCK_FILE, RunDir
from ftune.training.run import run_training
from tests.e2e.forked import fault_check
from tests.e2e.test_distributed import FP32, STAGES, assert_same_curve, quiet, recipe_for, step_losses, step_lrs, two_process_command
from tests.tolerances import assert_same_updates

KILL_LINE = r"error: rank {rank} of 2 \(pid \d+\) was killed by SIGKILL .*; the other processes were stopped; .* --resume$"


def killed_launch(recipe_path, hook, *, point: str, step: int, rank: int, resume: bool) -> subprocess.CompletedProcess:
    """``ftune train --nproc 2`` whose rank ``rank`` SIGKILLs itself at ``point``: it must end within 60 s of the kill
    with the one line naming that rank, and no traceback from the process that was stopped."""
    command = two_process_command(recipe_path) + (["--resume"] if resume else [])
    died = subprocess.run(command, env=fault_check.rank_fault_environment(point, step, rank, hook), capture_output=True,
                          text=True, timeout=300)
    ended = time.time()
    assert died.returncode == 1, died.stderr[-3000:]
    assert ended - float((hook / "killed").read_text()) < 60
    errors = [line for line in died.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.match(KILL_LINE.format(rank=rank), errors[0]), died.stderr[-3000:]
    assert "Traceback" not in died.stderr
    return died


def test_a_rank_killed_mid_step_or_mid_save_ends_the_run_and_resume_continues_the_curve(tmp_path, tiny_llama_dir, alpaca_files):
    one = run_training(load_recipe(recipe_for(tmp_path, tiny_llama_dir, alpaca_files, "one", training={**FP32, "batch_size": 4})), echo=quiet)
    two_path = recipe_for(tmp_path, tiny_llama_dir, alpaca_files, "two", training={**FP32, "batch_size": 2})
    run = RunDir(tmp_path / "two")

    # Rank 0, which holds the run directory's lock, dies inside step 3: the launcher stops rank 1 and lets the lock go.
    killed_launch(two_path, tmp_path / "mid-step", point="mid_step", step=3, rank=0, resume=False)
    assert not run.summary.exists() and not (run.root / LOCK_FILE).exists()
    assert [p.name for p in run.checkpoint_folders()] == ["checkpoint-2"]

    # Resumed, rank 1 dies while checkpoint-4 is saved, before its RNG state: rank 0 wrote the rest of the folder but
    # waits for every rank before it marks a checkpoint complete, so checkpoint-4 is not taken for a whole one.
    killed_launch(two_path, tmp_path / "mid-save", point="mid_checkpoint", step=4, rank=1, resume=True)
    partial = run.checkpoints / "checkpoint-4"
    assert (partial / "trainer_state.json").is_file() and not (partial / "rng_state_1.pth").exists()
    assert not (partial / CHECKPOINT_COMPLETE).exists() and not (run.root / LOCK_FILE).exists()

    resumed = subprocess.run(two_process_command(two_path) + ["--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Skipping checkpoint-4: it was not completely written" in resumed.stdout and "Resuming from checkpoint-2" in resumed.stdout
    assert json.loads(run.summary.read_text())["steps"] == 4
    assert_same_curve(step_losses(run), step_losses(one))
    adapter, single = load_file(run.model / "adapter_model.safetensors"), load_file(one.model / "adapter_model.safetensors")
    assert_same_updates(adapter, single, lrs=step_lrs(one), steps=STAGES)


def failure(tmp_path, rank: int, exitcode: int, message: str | None = None, timestamp: int = 100):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    error_file = tmp_path / f"error-{rank}.json"
    if message is not None:
        error_file.write_text(json.dumps({"message": message, "timestamp": timestamp}))
    return ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file=str(error_file))


def test_the_launcher_names_the_process_that_failed_first(tmp_path):
    from ftune.training.distributed import PEER_LOST
    from ftune.training.launch import describe_failure, first_failure

    # A survivor that lost its peer, or one the launcher stopped, is not the cause even when it ended first.
    lost = failure(tmp_path, 0, PEER_LOST, "lost contact with another process of the run (Connection reset by peer)", timestamp=1)
    crashed = failure(tmp_path, 1, 1, "IndexError: index 7 is out of range", timestamp=5)
    assert first_failure({0: lost, 1: crashed}) == (1, crashed)
    assert describe_failure(1, crashed, 2) == "rank 1 of 2 (pid 1001) failed with exit code 1: IndexError: index 7 is out of range"
    killed, stopped = failure(tmp_path, 3, -9), failure(tmp_path, 2, -15)
    assert first_failure({2: stopped, 3: killed}) == (3, killed)
    assert describe_failure(3, killed, 4).startswith("rank 3 of 4 (pid 1003) was killed by SIGKILL")
    # Every process timed out waiting (one stopped answering): the line says so, from the rank that noticed first.
    assert describe_failure(0, lost, 2) == "rank 0 of 2 (pid 1000) stopped: lost contact with another process of the run (Connection reset by peer)"


def test_a_rank_that_loses_its_peer_ends_quietly_and_leaves_its_line(tmp_path, monkeypatch, capsys):
    import ftune.training.distributed as distributed

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    monkeypatch.setattr(distributed, "start_process_group", lambda: None)
    with pytest.raises(SystemExit) as ended:
        with distributed.rank_process():
            raise RuntimeError("[/src/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:5: Connection reset by peer.")
    assert ended.value.code == distributed.PEER_LOST
    assert json.loads(error_file.read_text())["message"] == "lost contact with another process of the run (Read error [127.0.0.1]:5: Connection reset by peer.)"
    # Any other crash is this process's own: its traceback stays, and its line goes to the launcher.
    with pytest.raises(ValueError):
        with distributed.rank_process():
            raise ValueError("bad shape\nmore detail")
    assert json.loads(error_file.read_text())["message"] == "ValueError: bad shape"


def test_collective_timeout_is_set_for_every_multi_process_strategy(monkeypatch):
    from ftune.errors import FtuneError
    from ftune.recipe.distributed import DistributedConfig
    from ftune.training.distributed import COLLECTIVE_TIMEOUT_S, resolve_strategy

    assert resolve_strategy(DistributedConfig(), world=2, cuda=False).trainer_options["ddp_timeout"] == COLLECTIVE_TIMEOUT_S
    assert "ddp_timeout" not in resolve_strategy(DistributedConfig(), world=1, cuda=False).trainer_options
    monkeypatch.setenv("FTUNE_COLLECTIVE_TIMEOUT", "90")
    fsdp = resolve_strategy(DistributedConfig(strategy="fsdp"), world=2, cuda=False, wrap_classes=["LlamaDecoderLayer"])
    assert fsdp.trainer_options["ddp_timeout"] == 90
    monkeypatch.setenv("FTUNE_COLLECTIVE_TIMEOUT", "10m")
    with pytest.raises(FtuneError, match="FTUNE_COLLECTIVE_TIMEOUT='10m': expected a whole number of seconds"):
        resolve_strategy(DistributedConfig(), world=2, cuda=False)
