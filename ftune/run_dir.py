"""The run directory: the only contract between ``train`` and ``eval``/``merge``/``export``/``generate``.

Layout::

    RUN/recipe.yaml       resolved recipe (what ran, every default spelled out)
    RUN/manifest.json     versions, data fingerprint, seed, hardware, start/end times
    RUN/metrics.jsonl     one line per logged step
    RUN/summary.json      final figures; written last, so its presence means the run completed
    RUN/loss.png          loss curve
    RUN/model/            adapter (or full weights) + tokenizer, safetensors
    RUN/heldout.jsonl     the held-out rows eval and merge score on, so the run needs no training data
    RUN/labels.json       class names in id order (classification runs)
    RUN/adalora_ranks.json  final per-module ranks (AdaLoRA runs)
    RUN/checkpoints/      Trainer checkpoints that --resume continues from
    RUN/eval/             metrics.json + predictions.jsonl of ftune eval
    RUN/merged/           adapter folded into the base: a plain transformers model folder + parity.json
    RUN/export/           GGUF / safetensors exports of ftune export, each with its verification report
    RUN/tracking/         experiment trackers' local files (tensorboard/, mlflow/, wandb/) of the recipe's tracking section

This module owns every file name in a run and the one way ftune writes them: into a hidden
sibling, then renamed into place (``atomic_file`` / ``atomic_dir``), so a crash mid-save never
leaves something that looks complete. Loading a finished run re-validates its recipe without
checking that the training data still exists: the run carries what later stages need.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import yaml

from ftune import checksums
from ftune.disk import staged_failure
from ftune.errors import FtuneError
from ftune.recipe import Recipe, validate_recipe
from ftune.redaction import redact


@dataclass(frozen=True)
class RunDir:
    root: Path

    recipe = property(lambda self: self.root / RECIPE_FILE)
    manifest = property(lambda self: self.root / "manifest.json")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    summary = property(lambda self: self.root / "summary.json")
    loss_plot = property(lambda self: self.root / "loss.png")
    model = property(lambda self: self.root / "model")
    heldout = property(lambda self: self.root / "heldout.jsonl")
    labels = property(lambda self: self.root / "labels.json")
    adalora_ranks = property(lambda self: self.root / "adalora_ranks.json")
    checkpoints = property(lambda self: self.root / "checkpoints")
    eval_dir = property(lambda self: self.root / "eval")
    eval_metrics = property(lambda self: self.root / "eval" / "metrics.json")
    eval_predictions = property(lambda self: self.root / "eval" / "predictions.jsonl")
    merged = property(lambda self: self.root / "merged")
    export_dir = property(lambda self: self.root / "export")
    strategy = property(lambda self: self.root / "distributed.json")  # the processes and strategy that trained the run
    accelerate_config = property(lambda self: self.root / "accelerate.yaml")
    deepspeed_config = property(lambda self: self.root / "deepspeed.json")
    reward_functions = property(lambda self: self.root / "rewards")  # grpo: copies of the recipe's reward function files
    tracking = property(lambda self: self.root / "tracking")  # TensorBoard events, a local MLflow store, W&B offline runs

    def has_complete_weights(self) -> bool:
        """Training wrote a whole model (full, freeze, bitfit), not an adapter to apply to a base."""
        return (self.model / "config.json").is_file()

    def parity_report(self, merged: Path | None = None) -> Path:
        return (merged or self.merged) / PARITY_FILE

    def is_merged(self) -> bool:
        return self.parity_report().is_file()

    def is_complete(self) -> bool:
        return self.summary.is_file() and self.model.is_dir()

    def checkpoint_folders(self) -> list[Path]:
        """Every ``checkpoints/checkpoint-N`` folder, oldest step first, complete or not."""
        found = [p for p in self.checkpoints.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
        return sorted(found, key=checkpoint_step)

    def incomplete_checkpoints(self) -> list[Path]:
        """Checkpoints a crash cut short: the Trainer writes them in place, so only the marker tells."""
        return [p for p in self.checkpoint_folders() if not (p / CHECKPOINT_COMPLETE).is_file()]

    def last_checkpoint(self) -> Path | None:
        """The newest checkpoint whose every file was written and synced."""
        complete = [p for p in self.checkpoint_folders() if (p / CHECKPOINT_COMPLETE).is_file()]
        return complete[-1] if complete else None

    def is_empty(self) -> bool:
        """Nothing here but what a run writes as it starts (its recipe, the lock): a run refused before it trained
        (bad data, a recipe the model cannot take) leaves nothing to keep, so the fixed recipe starts without --overwrite."""
        return not self.root.exists() or not any(p.name not in (LOCK_FILE, RECIPE_FILE) for p in self.root.iterdir())


def checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[-1])


def mark_checkpoint_complete(checkpoint: Path) -> None:
    """Sync every file of a checkpoint the Trainer just wrote, then mark it complete (the marker goes last) with each
    file's size and checksum, which a resume checks before it trusts the checkpoint."""
    files = checksums.record(checkpoint, skip=(CHECKPOINT_COMPLETE,), sync=True)
    write_json_atomic(checkpoint / CHECKPOINT_COMPLETE, {"complete": True, "files": files})
    _sync_dir(checkpoint)


def _sync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def run_lock(root: Path, *, echo=print) -> Iterator[None]:
    """Hold ``RUN/.ftune.lock`` (pid and host) while this process writes the run directory.

    A lock held by a live process is refused with its pid; one left by a process that is gone is
    taken over with a note. O_EXCL creation makes the check and the claim one step.
    """
    if root.exists() and not root.is_dir():
        raise FtuneError(f"output_dir: {root} exists and is not a directory")
    root.mkdir(parents=True, exist_ok=True)
    lock = root / LOCK_FILE
    me = f"{os.getpid()} {socket.gethostname()}"
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            holder = lock.read_text(encoding="utf-8").split() if lock.is_file() else []
            if holder == me.split():  # this process already holds it (export merging first)
                yield
                return
            if len(holder) == 2 and _holder_alive(int(holder[0]), holder[1]):
                raise FtuneError(
                    f"{root}: another ftune process (pid {holder[0]} on {holder[1]}) is writing this run directory; "
                    "wait for it to finish or stop it, or pick another output directory"
                ) from None
            echo(f"note: {root} was locked by a process that no longer runs (pid {' on '.join(holder) or 'unknown'}); taking over")
            lock.unlink(missing_ok=True)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(me + "\n")
    try:
        yield
    finally:
        if lock.is_file() and lock.read_text(encoding="utf-8").strip() == me:
            lock.unlink()


def _holder_alive(pid: int, host: str) -> bool:
    if host != socket.gethostname():
        return True  # another machine's process (shared storage): its liveness cannot be checked from here
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recipe_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def prepare_run_dir(recipe: Recipe, *, overwrite: bool, resume: bool, write: bool = True) -> RunDir:
    """Create the run directory, refusing to clobber an existing one unless asked.

    With ``write=False`` (non-zero ranks of a multi-process launch) nothing is checked or touched:
    rank 0 owns the directory, and its checks would race with its own writes if every rank ran them."""
    if overwrite and resume:
        raise FtuneError("--overwrite and --resume contradict each other; pick one")
    run = RunDir(Path(recipe.output_dir).expanduser().resolve())
    if not write:
        return run
    if run.root.exists() and not run.root.is_dir():
        raise FtuneError(f"output_dir: {run.root} exists and is not a directory")
    existing = not run.is_empty()
    if resume:
        if not existing:
            raise FtuneError(f"--resume: {run.root} holds no run to continue; run without --resume")
        if run.recipe.is_file() and run.recipe.read_text(encoding="utf-8") != redact(recipe_yaml(recipe)):
            raise FtuneError(
                f"--resume: the recipe differs from the one {run.root} was started with ({run.recipe}); "
                "resume with the same recipe, or use --overwrite to start over"
            )
    elif existing and not overwrite:
        raise FtuneError(
            f"output_dir: {run.root} is not empty; pass --overwrite to replace it, --resume to continue it, "
            "or choose another output_dir (--set output_dir=...)"
        )
    if existing and overwrite:
        for path in run.root.iterdir():
            if path.name != LOCK_FILE:  # held by this run
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    run.root.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run.recipe, recipe_yaml(recipe))
    return run


PARITY_FILE = "parity.json"
_UMASK = os.umask(0o022)
os.umask(_UMASK)
CHECKPOINT_COMPLETE = "ftune-complete"  # written last into a checkpoint folder
LOCK_FILE = ".ftune.lock"
RECIPE_FILE = "recipe.yaml"


def verification_report(output: Path) -> Path:
    """Where ``ftune export`` writes the check of the file or folder ``output``."""
    return output.with_name(output.name + ".verify.json")


@contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a hidden path beside ``target`` to write; it replaces ``target`` (synced) only if the block finishes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(prefix=f".{target.name}-", dir=target.parent)
    os.close(fd)
    staging = Path(staging)
    os.chmod(staging, 0o666 & ~_UMASK)  # mkstemp makes it private; a run's files are as readable as any other
    try:
        yield staging
        with open(staging, "rb") as written:
            os.fsync(written.fileno())
        os.replace(staging, target)
    except Exception as err:  # out of room: DiskFull, measured while the partial file is still there
        raise staged_failure(err, staging, target) or err
    finally:
        staging.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` atomically, with the values of secret-looking environment variables masked (ftune.redaction)."""
    with atomic_file(path) as staging:
        staging.write_text(redact(text), encoding="utf-8")


def write_json_atomic(path: Path, data: dict | list) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, ensure_ascii=False) + "\n")


def write_jsonl_atomic(path: Path, rows: list) -> None:
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a staging directory that replaces ``target`` only if the block finishes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    os.chmod(staging, 0o777 & ~_UMASK)  # mkdtemp makes it private
    try:
        yield staging
    except BaseException as err:
        full = staged_failure(err, staging, target) if isinstance(err, Exception) else None
        shutil.rmtree(staging, ignore_errors=True)
        raise full or err
    retired = None
    if target.exists():
        retired = target.with_name(f".{target.name}-old-{os.getpid()}")
        os.replace(target, retired)
    os.replace(staging, target)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


def load_run(path: str | Path) -> tuple[RunDir, Recipe]:
    """Open a finished run directory and its recipe, with errors that say what is missing."""
    run = RunDir(Path(path).expanduser().resolve())
    if not run.root.is_dir():
        raise FtuneError(f"{path}: no such run directory")
    if not run.recipe.is_file():
        raise FtuneError(f"{path}: not a run directory (no recipe.yaml); pass the output_dir of an ftune train run")
    if not run.is_complete():
        raise FtuneError(f"{path}: the run did not finish (no summary.json or model/); finish it with ftune train --resume")
    raw = yaml.safe_load(run.recipe.read_text(encoding="utf-8"))
    return run, validate_recipe(raw, source=str(run.recipe), finished_run=True)


def save_label_names(run: RunDir, label_names: list[str] | None) -> None:
    """``RUN/labels.json``: class names in id order, for id2label at eval/merge/export time."""
    if label_names is not None:
        write_json_atomic(run.labels, list(label_names))


def run_labels(run: RunDir) -> list[str] | None:
    """Class names of a classification run, in label-id order; None for other runs."""
    if not run.labels.is_file():
        return None
    return [str(name) for name in json.loads(run.labels.read_text(encoding="utf-8"))]


def run_lineage(name_or_path: str) -> list[dict]:
    """The runs a model source descends from, oldest first (empty unless it is an ftune run directory)."""
    path = Path(name_or_path).expanduser()
    run = RunDir(path)
    if not (path.is_dir() and run.summary.is_file() and run.recipe.is_file()):
        return []
    manifest = json.loads(run.manifest.read_text(encoding="utf-8")) if run.manifest.is_file() else {}
    stage = (yaml.safe_load(run.recipe.read_text(encoding="utf-8")) or {}).get("stage", "sft")
    return [*manifest.get("lineage", []), {"run": str(path.resolve()), "stage": stage, "model_source": manifest.get("model_source")}]
