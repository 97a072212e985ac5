"""scripts/gpu_check.sh --dry-run lists every GPU check it would run (without a GPU, exit 0); scripts/bench_train.py
accepts the options it passes and skips a variant this machine cannot run in one line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def dry_run(**env) -> list[str]:
    out = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=REPO, capture_output=True, text=True, timeout=60,
                         env={**os.environ, **env})
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_dry_run_lists_every_check():
    lines = dry_run()
    commands = [line.split("] ", 1)[1] for line in lines if line.startswith("[")]
    assert any("-m pytest -m gpu" in c for c in commands)
    bench = [c for c in commands if "scripts/bench_train.py" in c]
    # ftune vs the plain Trainer vs TRL packed, on both datasets
    assert any("--dataset both" in c and all(run in c.split("--runs ")[1].split()[0] for run in "abcd") for c in bench)
    assert any("--liger" in c for c in bench)
    assert {"sdpa", "flash_attention_2"} <= {c.split("--attn ")[1].split()[0] for c in bench if "--attn " in c}
    assert any("scripts/bench_lengths.py --lengths 4096" in c for c in commands)
    assert lines[-1] == "report: gpu_check.md"


def test_report_goes_under_out_and_steps_follow_env(tmp_path):
    lines = dry_run(OUT=str(tmp_path), STEPS="3")
    assert lines[-1] == f"report: {tmp_path}/gpu_check.md"
    assert all("--steps 3" in line for line in lines if "bench_train.py" in line)


def test_unknown_option_is_one_line_exit_2():
    out = subprocess.run(["bash", "scripts/gpu_check.sh", "--fast"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "--fast" in out.stderr


def bench(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/bench_train.py", *argv], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})


def test_bench_train_help_shows_the_options_gpu_check_passes():
    out = bench("--help")
    assert out.returncode == 0
    for option in ("--runs", "--liger", "--attn", "--dataset", "--steps"):
        assert option in out.stdout


@pytest.mark.parametrize("variant, named", [(["--liger"], "--liger"), (["--attn", "flash_attention_2"], "flash_attention_2")])
def test_bench_train_skips_a_variant_without_its_kernels_in_one_line(variant, named):
    out = bench("--dataset", "quickstart", "--runs", "c", *variant)  # no GPU here, so neither can run
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines() == [out.stdout.strip()] and out.stdout.startswith("skipped") and named in out.stdout
    assert "Traceback" not in out.stderr


def test_bench_train_refuses_unknown_runs():
    out = bench("--runs", "az")
    assert out.returncode == 2 and "--runs" in out.stderr and "Traceback" not in out.stderr
