"""Strategies that need CUDA: DeepSpeed ZeRO 2 and 3 (and FSDP on GPUs) on two processes match one process, save
whole folders that merge, and refuse another process count on resume. Run on a machine with two GPUs and deepspeed
installed: scripts/test.sh -m gpu"""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest

from ftune.errors import FtuneError
from ftune.recipe import load_recipe
from ftune.run_dir import RunDir
from ftune.training.run import run_training
from tests.conftest import invoke_ok
from tests.e2e.test_distributed import FP32, assert_same_curve, quiet, recipe_for, step_losses, train_on_two_processes


def two_gpus() -> bool:
    import torch

    return torch.cuda.device_count() >= 2


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not two_gpus(), reason="needs two CUDA GPUs"),
]
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed (pip install deepspeed)")


@pytest.mark.parametrize(
    "distributed",
    [
        pytest.param({"strategy": "deepspeed", "deepspeed": {"zero_stage": 2}}, marks=needs_deepspeed, id="zero2"),
        pytest.param({"strategy": "deepspeed", "deepspeed": {"zero_stage": 3}}, marks=needs_deepspeed, id="zero3"),
        pytest.param({"strategy": "fsdp"}, id="fsdp"),
    ],
)
def test_sharded_strategy_on_two_gpus_matches_one_and_its_run_directory_merges(tmp_path, tiny_llama_dir, alpaca_files, distributed):
    one = run_training(load_recipe(recipe_for(tmp_path, tiny_llama_dir, alpaca_files, "one", training={**FP32, "batch_size": 4})), echo=quiet)
    path = recipe_for(tmp_path, tiny_llama_dir, alpaca_files, "two", training={**FP32, "batch_size": 2}, distributed=distributed)
    train_on_two_processes(path)
    two = RunDir(tmp_path / "two")
    assert_same_curve(step_losses(two), step_losses(one))
    if distributed["strategy"] == "deepspeed":
        assert json.loads(two.deepspeed_config.read_text())["zero_optimization"]["stage"] == distributed["deepspeed"]["zero_stage"]
    invoke_ok("merge", two.root)
    assert json.loads(two.parity_report().read_text())["passed"]
    if distributed["strategy"] == "deepspeed":
        shutil.rmtree(two.checkpoints / "checkpoint-4")
        two.summary.unlink()
        with pytest.raises(FtuneError, match="DeepSpeed partitions the optimizer state per process"):
            run_training(load_recipe(path), resume=True, echo=quiet)
