"""Train stage: recipe -> session (tokenizer, data, model, method, Trainer) -> trained run directory.

``run_training`` reads as the table of contents of a run; each step is a named function. The Trainer owns
the loop (``training.trainer`` builds it, ``training.stages`` says what differs per stage); this module owns
the run around it: the lock, resuming, the artifacts, and the summary that marks the run complete.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

from ftune.disk import report_file_size_limit
from ftune.errors import FtuneError
from ftune.resources import free_memory_mib
from ftune.methods import save_method_artifact
from ftune.model import load_tokenizer
from ftune.recipe import Recipe
from ftune.recipe.stages import PRETRAIN, SFT
from ftune.run_dir import RunDir, atomic_dir, checkpoint_step, prepare_run_dir, run_lock, write_json_atomic
from ftune.runtime import quiet_libraries
from ftune.training.checkpoints import (
    disk_errors_explained, is_main_process, resume_accumulation, resume_point, train_or_restore, truncate_metrics,
)
from ftune.training.distributed import whole_weights
from ftune.training.plan import check_fits
from ftune.training.report import build_manifest, build_summary, save_loss_plot
from ftune.training.session import Launch, build_session, prepare_hardware
from ftune.training.tracking import finish_tracking


def run_training(recipe: Recipe, *, overwrite: bool = False, resume: bool = False, force: bool = False, echo=print) -> RunDir:
    """Train as ``recipe`` says; rank 0 holds the run directory's lock throughout."""
    main = is_main_process()
    echo = echo if main else (lambda *_: None)
    report_file_size_limit()
    launch = prepare_hardware(recipe, echo=echo)  # before any loading: a refusal costs nothing
    if not force:
        device = "cuda" if launch.cuda else "cpu"
        check_fits(recipe, device=device, free_mib=free_memory_mib(device), precision=launch.precision.mode, echo=echo)
    quiet_libraries()
    root = Path(recipe.output_dir).expanduser().resolve()
    with run_lock(root, echo=echo) if main else nullcontext():
        run = train_into(recipe, launch, overwrite=overwrite, resume=resume, echo=echo)
    close_processes()
    return run


def close_processes() -> None:
    """End a multi-process run together: the other ranks wait until rank 0 has written the run directory, then the
    process group is closed, so no rank exits with its communication threads still running (a C++ abort over gloo)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def train_into(recipe: Recipe, launch: Launch, *, overwrite: bool, resume: bool, echo) -> RunDir:
    started = datetime.now(timezone.utc)
    run = prepare_run_dir(recipe, overwrite=overwrite, resume=resume, write=is_main_process())
    with disk_errors_explained(run):  # from here on the way on after a failed write is --resume
        return train_prepared(run, recipe, launch, started, resume=resume, echo=echo)


def train_prepared(run: RunDir, recipe: Recipe, launch: Launch, started: datetime, *, resume: bool, echo) -> RunDir:
    checkpoint = resume_point(run, echo) if resume else None
    if checkpoint is not None:
        recipe = keep_rows_per_step(recipe, checkpoint, launch, echo=echo)
    if resume and is_main_process():
        truncate_metrics(run, step=checkpoint_step(checkpoint) if checkpoint else 0)  # forget steps logged after it
    session = build_session(recipe, run, launch, echo=echo)
    trainer = session.trainer
    clock = time.perf_counter()
    trained_here = train_or_restore(trainer, checkpoint, echo)
    wall = time.perf_counter() - clock
    eval_metrics = trainer.evaluate() if trainer.eval_dataset is not None else {}
    with whole_weights(trainer):
        if not trainer.is_world_process_zero():
            return run
        save_artifacts(trainer.model, session.tokenizer, recipe, run)
    summary = build_summary(run, eval_metrics, trainer, wall, trained_here, session.trainable, session.total)
    save_loss_plot(run)
    write_json_atomic(run.manifest, build_manifest(recipe, started, launch=launch, model=trainer.model))
    write_json_atomic(run.summary, summary)  # last: its presence marks the run complete
    finish_tracking(trainer)  # the trackers get the complete run's files
    echo(f"train loss {summary['train_loss']:.4f}, eval loss {summary.get('eval_loss', float('nan')):.4f}, "
         f"{summary['tokens_per_second']:.0f} tokens/s, {summary['wall_time_s']:.1f} s")
    return run


def keep_rows_per_step(recipe: Recipe, checkpoint: Path, launch: Launch, *, echo) -> Recipe:
    """The recipe to resume ``checkpoint`` with on this launch's process count: the same rows per optimizer step, by
    gradient accumulation, so the loss curve and the data position continue where they were."""
    from ftune.recipe.distributed import resolved_strategy

    world = launch.world_size
    accumulation = resume_accumulation(checkpoint, recipe, world_size=world, strategy=resolved_strategy(recipe.distributed.strategy, world))
    if accumulation == recipe.training.gradient_accumulation_steps:
        return recipe
    echo(f"resuming on {world} process{'es' if world > 1 else ''}: gradient_accumulation_steps {recipe.training.gradient_accumulation_steps} "
         f"-> {accumulation}, so each optimizer step still takes {accumulation * world * recipe.training.batch_size} rows as the checkpoint's did")
    return recipe.model_copy(update={"training": recipe.training.model_copy(update={"gradient_accumulation_steps": accumulation})})


def save_artifacts(model, tokenizer, recipe: Recipe, run: RunDir) -> None:
    with atomic_dir(run.model) as staging:
        save_method_artifact(model, recipe.method.name, staging)
        tokenizer.save_pretrained(staging)


def run_preprocess(recipe: Recipe, *, echo=print):
    """Fill the data cache for ``recipe`` (what ``ftune preprocess`` runs); loads the tokenizer only."""
    from ftune.data import build_datasets, describe_splits

    quiet_libraries()
    if not recipe.data.cache:
        raise FtuneError("data.cache: false, so there is no cache to fill; set data.cache: true (the default)")
    if recipe.stage not in (SFT, PRETRAIN):
        raise FtuneError(f"stage: {recipe.stage} tokenizes its rows when training starts and keeps no data cache; ftune preprocess "
                         "fills the cache of stage: sft and pretrain, so run ftune train directly")
    splits = build_datasets(recipe.data, load_tokenizer(recipe.model), recipe.task)
    echo(describe_splits(splits))
    return splits
