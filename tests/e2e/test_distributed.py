"""Several processes on CPU (gloo), started by ``ftune train --nproc`` or by ``torchrun``: the same recipe gives the
same training as one process, under DDP and FSDP, and a checkpoint of two processes continues on one. fp32 and a
fixed data order, so equal means equal to rounding (tests/tolerances.py): the processes sum their gradients in
another order than one process does."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from ftune.errors import FtuneError
from ftune.recipe import load_recipe
from ftune.run_dir import RunDir
from ftune.training.run import run_training
from tests.conftest import invoke_ok, recipe_dict, write_recipe
from tests.tolerances import approx, assert_same_updates, forward_steps

FP32 = {"mixed_precision": "no", "max_steps": 4, "save_steps": 2, "logging_steps": 1}
# Each of the 4 optimizer steps: a forward and a backward of the 2-layer model, and the update.
STAGES = 4 * (forward_steps(2, backward=True) + 1)


def step_losses(run: RunDir) -> list[float]:
    return [record["loss"] for record in map(json.loads, run.metrics.read_text().splitlines()) if "loss" in record]


def step_lrs(run: RunDir) -> list[float]:
    return [record["learning_rate"] for record in map(json.loads, run.metrics.read_text().splitlines()) if "loss" in record]


def assert_same_curve(losses: list[float], reference: list[float]) -> None:
    assert len(losses) == len(reference) == 4
    assert losses == approx(reference, steps=STAGES)


def recipe_for(tmp_path, tiny_llama_dir, alpaca_files, name: str, **sections):
    train, eval_file = alpaca_files
    return write_recipe(tmp_path / f"{name}.yaml", recipe_dict(tiny_llama_dir, train, eval_file, tmp_path / name, **sections))


def two_process_command(recipe_path, launcher: str = "nproc") -> list[str]:
    """``ftune train --nproc 2``, or the same ranks started by ``torchrun``: both go through torch.distributed.run."""
    if launcher == "nproc":
        return [sys.executable, "-m", "ftune", "train", str(recipe_path), "--nproc", "2"]
    return [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "-m", "ftune", "train", str(recipe_path)]


def train_on_two_processes(recipe_path, launcher: str = "nproc") -> subprocess.CompletedProcess:
    result = subprocess.run(two_process_command(recipe_path, launcher), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Run directory:") == 1  # rank 0 alone writes and reports the run directory
    return result


def assert_each_rank_checkpointed_its_rng(run: RunDir) -> None:
    assert sorted(p.name for p in run.last_checkpoint().glob("rng_state_*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]


def quiet(*_):
    pass


def test_ddp_on_two_processes_matches_one_process_and_accumulation_and_resumes_on_one(tmp_path, tiny_llama_dir, alpaca_files):
    one = run_training(load_recipe(recipe_for(tmp_path, tiny_llama_dir, alpaca_files, "one", training={**FP32, "batch_size": 4})), echo=quiet)
    accumulated = run_training(load_recipe(recipe_for(tmp_path, tiny_llama_dir, alpaca_files, "accumulated",
                                                      training={**FP32, "batch_size": 2, "gradient_accumulation_steps": 2})), echo=quiet)
    two_path = recipe_for(tmp_path, tiny_llama_dir, alpaca_files, "two", training={**FP32, "batch_size": 2})
    started = train_on_two_processes(two_path)
    assert started.stdout.startswith("processes: world size 2 (2 on this machine), strategy ddp (a whole model per process")
    two = RunDir(tmp_path / "two")
    assert two.is_complete() and json.loads(two.summary.read_text())["steps"] == 4
    assert_each_rank_checkpointed_its_rng(two)
    assert_same_curve(step_losses(accumulated), step_losses(one))
    assert_same_curve(step_losses(two), step_losses(one))
    assert json.loads(two.strategy.read_text())["strategy"] == "ddp"
    uninterrupted = load_file(two.model / "adapter_model.safetensors")

    # The launcher passes the ranks' errors on: the run directory is taken now; a second node needs an address.
    launch = two_process_command(two_path)
    again = subprocess.run(launch, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "pass --overwrite to replace it" in again.stderr
    lonely = subprocess.run([*launch, "--nnodes", "2", "--node-rank", "1"], capture_output=True, text=True, timeout=60)
    assert lonely.returncode == 2 and "--nnodes > 1 needs --master-addr" in lonely.stderr

    # Interrupted after its step-2 checkpoint, the two-process run continues on one process.
    shutil.rmtree(two.checkpoints / "checkpoint-4")
    two.summary.unlink()
    lines = []
    run_training(load_recipe(two_path), resume=True, echo=lines.append)
    assert "resuming on 1 process: gradient_accumulation_steps 1 -> 2, so each optimizer step still takes 4 rows as the checkpoint's did" in lines
    assert_same_curve(step_losses(two), step_losses(one))
    resumed = load_file(two.model / "adapter_model.safetensors")
    # Steps 3 and 4 ran as one process accumulating two micro-batches instead of two processes averaging theirs.
    assert_same_updates(resumed, uninterrupted, lrs=step_lrs(one), steps=STAGES)


def test_fsdp_on_two_processes_matches_one_process_merges_evaluates_and_resumes(tmp_path, tiny_llama_dir, alpaca_files):
    one = run_training(load_recipe(recipe_for(tmp_path, tiny_llama_dir, alpaca_files, "one", training={**FP32, "batch_size": 4})), echo=quiet)
    fsdp_path = recipe_for(tmp_path, tiny_llama_dir, alpaca_files, "fsdp", training={**FP32, "batch_size": 2}, distributed={"strategy": "fsdp"})
    started = train_on_two_processes(fsdp_path)
    assert started.stdout.startswith("processes: world size 2 (2 on this machine), strategy fsdp (full shard, one unit per the model's decoder layer)")
    fsdp = RunDir(tmp_path / "fsdp")
    assert_same_curve(step_losses(fsdp), step_losses(one))
    assert (fsdp.checkpoints / "checkpoint-2" / "pytorch_model_fsdp.bin").is_file()  # the FSDP optimizer/model format
    written = json.loads(fsdp.strategy.read_text())
    assert written["trainer_options"]["fsdp_config"]["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]
    assert "distributed_type: FSDP" in fsdp.accelerate_config.read_text()
    adapter, single = load_file(fsdp.model / "adapter_model.safetensors"), load_file(one.model / "adapter_model.safetensors")
    assert_same_updates(adapter, single, lrs=step_lrs(one), steps=STAGES)

    invoke_ok("merge", fsdp.root)
    assert json.loads(fsdp.parity_report().read_text())["passed"]
    invoke_ok("eval", fsdp.root)
    assert json.loads(fsdp.eval_metrics.read_text())["tuned"]["samples"] == 8

    # One process is not FSDP, and cannot read FSDP's optimizer state: refused before anything loads.
    shutil.rmtree(fsdp.checkpoints / "checkpoint-4")
    fsdp.summary.unlink()
    with pytest.raises(FtuneError, match="written under fsdp by 2 processes and this launch runs single; .* --nproc 2 or more"):
        run_training(load_recipe(fsdp_path), resume=True, echo=quiet)
    uninterrupted = adapter
    result = subprocess.run([sys.executable, "-m", "ftune", "train", str(fsdp_path), "--nproc", "2", "--resume"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resuming from checkpoint-2" in result.stdout
    assert_same_curve(step_losses(fsdp), step_losses(one))
    resumed = load_file(fsdp.model / "adapter_model.safetensors")
    assert max((resumed[k] - uninterrupted[k]).abs().max().item() for k in resumed) < 1e-6


def test_full_fine_tuning_under_fsdp_launched_by_torchrun_saves_the_whole_model_as_one_process_trains_it(tmp_path, tiny_llama_dir, alpaca_files):
    full = {"name": "full"}
    training = {**FP32, "learning_rate": 1e-3}
    one = run_training(load_recipe(recipe_for(tmp_path, tiny_llama_dir, alpaca_files, "one", method=full,
                                              training={**training, "batch_size": 4})), echo=quiet)
    train_on_two_processes(recipe_for(tmp_path, tiny_llama_dir, alpaca_files, "fsdp", method=full,
                                      training={**training, "batch_size": 2}, distributed={"strategy": "fsdp"}), launcher="torchrun")
    fsdp = RunDir(tmp_path / "fsdp")
    assert fsdp.is_complete()
    assert_each_rank_checkpointed_its_rng(fsdp)
    assert_same_curve(step_losses(fsdp), step_losses(one))
    sharded, single = load_file(fsdp.model / "model.safetensors"), load_file(one.model / "model.safetensors")
    assert sharded.keys() == single.keys()
    assert_same_updates(sharded, single, lrs=step_lrs(one), steps=STAGES)
    base = load_file(tiny_llama_dir / "model.safetensors")
    assert any(not sharded[k].equal(base[k]) for k in base)  # trained, not the base saved back
