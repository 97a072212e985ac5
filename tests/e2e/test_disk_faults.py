"""Real faults on a real ``ftune train``/``merge``/``export`` process: a write past the file-size limit (RLIMIT_FSIZE lowered
in the child, so the kernel answers EFBIG as on a full disk) is one line with exit 2, no traceback, no partial output,
and ``--resume`` then equals the uninterrupted run; a checkpoint file damaged after its marker is named and the previous
checkpoint used; and no secret planted in the environment reaches any file of the run directory or its output."""

from __future__ import annotations

import os
import shutil
import signal

import pytest

from tests.conftest import recipe_dict, write_recipe
from tests.e2e.forked import fault_check, run_ftune

STEPS = 6  # checkpoints at 2, 4, 6
LIMIT = 64 * 1024  # above the tiny adapter (~36 KB) and tokenizer, below optimizer.pt (~89 KB): torch.save's writer fails
SECRETS = {"HF_TOKEN": "hf_plantedHubToken0123456789", "WANDB_API_KEY": "planted-wandb-key-0123456789abcdef",
           "MLFLOW_TRACKING_PASSWORD": "planted-mlflow-password", "ACME_SERVICE_SECRET": "planted-acme-secret-value"}


@pytest.fixture(scope="module")
def recipe(tiny_llama_dir, alpaca_files, tmp_path_factory):
    root = tmp_path_factory.mktemp("disk-faults")
    train, held_out = alpaca_files
    recipe = recipe_dict(tiny_llama_dir, train, held_out, root / "unused", training={"max_steps": STEPS, "save_steps": 2, "save_total_limit": 2},
                         tracking={"report_to": ["tensorboard"]})  # a tracker's files are scanned for secrets too
    return write_recipe(root / "recipe.yaml", recipe)


@pytest.fixture(scope="module")
def reference(recipe, tmp_path_factory):
    """The uninterrupted run, trained with secrets planted in its environment: (run directory, its output)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    saved = {name: os.environ.get(name) for name in SECRETS}
    os.environ.update(SECRETS)
    try:
        done = run_ftune("train", str(recipe), "--set", f"output_dir={run}")
    finally:
        for name, value in saved.items():
            os.environ.pop(name) if value is None else os.environ.__setitem__(name, value)
    assert done.returncode == 0, done.stderr
    return run, done


def one_error_line(done) -> str:
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    return errors[0]


def test_no_planted_secret_reaches_the_run_directory(reference):
    run, done = reference
    files = [p for p in run.rglob("*") if p.is_file()]
    assert {"recipe.yaml", "manifest.json", "metrics.jsonl", "optimizer.pt", "training_args.bin", "trainer_state.json"} <= {p.name for p in files}
    assert any(p.name.startswith("events.out.tfevents") for p in files)  # TensorBoard's event files
    for name, value in SECRETS.items():
        assert value not in done.stdout + done.stderr, name
        leaked = [str(p.relative_to(run)) for p in files if value.encode() in p.read_bytes()]
        assert not leaked, f"{name} written into {leaked}"


def test_a_checkpoint_past_the_file_size_limit_is_one_line_and_resumes_exactly(recipe, reference, tmp_path, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setenv("FTUNE_FAULT_FILE_SIZE", str(LIMIT))
    failed = run_ftune("train", str(recipe), "--set", f"output_dir={run}", fault=("file_size_limit", 3))  # lowered after step 3
    line = one_error_line(failed)
    assert line.startswith(f"error: cannot write {run}/checkpoints/checkpoint-4/optimizer.pt: File too large;"), line
    assert "file-size limit (ulimit -f) 0.062 MiB" in line and "MiB free there" in line and "a checkpoint needs about" in line
    assert line.endswith("raise the file-size limit (ulimit -f) and continue with ftune train --resume")
    assert (run / "checkpoints" / "checkpoint-2" / "ftune-complete").is_file() and not (run / "checkpoints" / "checkpoint-4").exists()
    assert not (run / ".ftune.lock").exists() and not (run / "summary.json").exists()

    monkeypatch.delenv("FTUNE_FAULT_FILE_SIZE")
    resumed = run_ftune("train", str(recipe), "--set", f"output_dir={run}", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming from checkpoint-2" in resumed.stdout
    assert fault_check.identical(fault_check.outcome(reference[0]), fault_check.outcome(run)) == []


def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_resumed(recipe, reference, tmp_path):
    run = tmp_path / "run"
    died = run_ftune("train", str(recipe), "--set", f"output_dir={run}", fault=("between_steps", 5))
    assert died.returncode == -signal.SIGKILL, died.stderr
    optimizer = run / "checkpoints" / "checkpoint-4" / "optimizer.pt"
    size = optimizer.stat().st_size
    optimizer.write_bytes(optimizer.read_bytes()[: size // 2])  # cut short after the marker was written
    resumed = run_ftune("train", str(recipe), "--set", f"output_dir={run}", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"Skipping checkpoint-4: optimizer.pt is damaged ({size // 2:,} bytes, {size:,} when written)" in resumed.stdout
    assert "Resuming from checkpoint-2" in resumed.stdout
    assert fault_check.identical(fault_check.outcome(reference[0]), fault_check.outcome(run)) == []


def test_merge_and_gguf_export_past_the_file_size_limit_leave_nothing_half_written(reference, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(reference[0], run, ignore=shutil.ignore_patterns("checkpoints"))
    monkeypatch.setenv("FTUNE_FAULT_FILE_SIZE", str(LIMIT))  # the merged weights (~0.5 MB) cannot be written
    line = one_error_line(run_ftune("merge", str(run), fault=("file_size_limit", 0)))
    assert line.startswith(f"error: cannot write {run}/merged") and "File too large" in line and "the merged model needs about" in line, line
    assert sorted(p.name for p in run.iterdir() if "merged" in p.name) == []  # neither the folder nor its staging copy

    monkeypatch.delenv("FTUNE_FAULT_FILE_SIZE")
    assert run_ftune("merge", str(run)).returncode == 0
    out = tmp_path / "exports" / "model.gguf"
    monkeypatch.setenv("FTUNE_FAULT_FILE_SIZE", str(LIMIT))
    line = one_error_line(run_ftune("export", str(run), "--format", "gguf", "--quant", "f16", "--out", str(out), fault=("file_size_limit", 0)))
    assert line.startswith(f"error: cannot write {out}") and "File too large" in line and "the export needs up to" in line, line
    assert not out.parent.exists() or list(out.parent.iterdir()) == []  # no GGUF, Modelfile, report or staging file
    assert (run / "merged" / "parity.json").is_file()  # the merge before it stays
