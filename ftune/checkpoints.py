"""Checkpoints and resume: why an interrupted run loses nothing.

A checkpoint counts once every file in it is synced and its marker is written (the Trainer writes
checkpoints in place, so a folder alone proves nothing). Resuming picks the newest complete one,
restores instead of training when training had already finished, logs every step once, and
reports the training loss over the whole run. A failed write for lack of space or permission is
one line naming the path and what is needed.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from ftune.errors import FtuneError
from ftune.run_dir import RunDir, mark_checkpoint_complete, write_text_atomic


def is_main_process() -> bool:
    """Rank 0 of a torchrun/accelerate launch, or a single process: the one that writes the run directory."""
    return os.environ.get("RANK", "0") == "0"


def resume_point(run: RunDir, echo) -> Path | None:
    """The newest complete checkpoint; incomplete ones (a crash mid-save) are named and removed. None
    when the run was interrupted before its first complete checkpoint: it then starts from step 0."""
    for broken in run.incomplete_checkpoints():
        if is_main_process():
            echo(f"Skipping {broken.name}: it was not completely written (interrupted while saving); removing it")
            shutil.rmtree(broken, ignore_errors=True)
    checkpoint = run.last_checkpoint()
    if checkpoint is not None:
        check_same_process_count(checkpoint)
    echo(f"Resuming from {checkpoint.name}" if checkpoint else "No complete checkpoint yet; training from step 0")
    return checkpoint


def checkpoint_world_size(checkpoint: Path) -> int:
    """How many processes wrote ``checkpoint``: the Trainer saves one RNG state per rank (rng_state_R.pth), or a
    single rng_state.pth for one process."""
    return len(list(checkpoint.glob("rng_state_*.pth"))) or 1


def check_same_process_count(checkpoint: Path) -> None:
    """Refuse a resume on another process count: the Trainer finds its data position by skipping the batches each
    process's sampler has served, and a sampler split over another number of processes serves other rows, so the
    run would repeat some rows and never see others."""
    written = checkpoint_world_size(checkpoint)
    now = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if written != now:
        raise FtuneError(
            f"--resume: {checkpoint.name} was written by {written} process{'es' if written > 1 else ''}, this launch has {now}; "
            f"resume with the same count ({'--nproc ' + str(written) if written > 1 else 'a single process'}): each process's "
            "share of the data and its random state are tied to the process count"
        )


def train_or_restore(trainer, checkpoint: Path | None, echo) -> int:
    """Train (from ``checkpoint`` if given) and return the optimizer steps taken here; a checkpoint of a
    run whose training had finished is only restored, so a resume never trains past the last step."""
    from transformers import TrainerState

    if checkpoint is not None:
        state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
        if state.max_steps and state.global_step >= state.max_steps:
            echo(f"Training had finished at step {state.global_step}; completing the run's remaining stages")
            # The Trainer's own checkpoint loader (weights or adapter), as train(resume_from_checkpoint=) uses it.
            trainer._load_from_checkpoint(str(checkpoint))
            trainer.state = state
            return 0
        start = state.global_step
    else:
        start = 0
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
    return trainer.state.global_step - start


# Write failures a user fixes by freeing space or fixing permissions, not bugs.
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM}


@contextmanager
def disk_errors_explained(run: RunDir):
    """Turn a failed write (full disk, no permission) into one line naming the path, the free space and the need."""
    try:
        yield
    except OSError as err:
        if err.errno not in DISK_ERRORS:
            raise
        path = Path(err.filename) if err.filename else run.checkpoints
        existing = next(p for p in (path, *path.parents) if p.exists())
        free = shutil.disk_usage(existing).free
        raise FtuneError(
            f"cannot write {path}: {err.strerror or err}; {free / 2**20:,.0f} MiB free there, about {largest_save_mb(run):,.0f} MiB "
            "needed per checkpoint; free space (or fix permissions) and continue with ftune train --resume"
        ) from err


def largest_save_mb(run: RunDir) -> float:
    """Size of the biggest complete checkpoint so far (what the next save needs), or of the saved model."""
    sizes = [sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) for folder in [*run.checkpoint_folders(), run.model] if folder.is_dir()]
    return max(sizes, default=0) / 2**20


def checkpoint_marker():
    """A Trainer callback that marks each checkpoint complete once the Trainer has written all of it, and
    logs the loss at each checkpoint and at the end (what ``logged_train_loss`` needs)."""
    from transformers import TrainerCallback

    class MarkComplete(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            # A log line at every checkpoint and at the last step: the logged windows then cover every
            # step, and a resumed run's windows start exactly where the checkpoint's ended.
            if control.should_save or state.global_step >= state.max_steps:
                control.should_log = True

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                mark_checkpoint_complete(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    return MarkComplete()


def truncate_metrics(run: RunDir, *, step: int) -> None:
    """On resume, forget metric lines logged after the checkpoint so the curve has no duplicates."""
    if not run.metrics.is_file():
        return
    kept = [line for line in run.metrics.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    write_text_atomic(run.metrics, "".join(line + "\n" for line in kept))


def logged_train_loss(run: RunDir) -> float | None:
    """Mean training loss over the whole run, from the logged steps (each log averages the steps since the
    previous one), so a resumed run reports the same figure as an uninterrupted one."""
    total = steps = previous = 0
    records = [json.loads(line) for line in run.metrics.read_text().splitlines() if line] if run.metrics.is_file() else []
    for record in records:
        if "loss" in record:
            span = record["step"] - previous
            total, steps, previous = total + record["loss"] * span, steps + span, record["step"]
    return total / steps if steps else None


