"""Train stage: recipe -> tokenizer, data, model, method -> transformers Trainer -> run directory.

``run_training`` reads as the table of contents of a run; each step is a named function. The
Trainer owns the loop; ftune adds callbacks for progress, metrics and method-specific hooks.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import resource
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from datetime import datetime, timezone
from pathlib import Path

from ftune import __version__
from ftune.data import build_collator, build_datasets, data_fingerprint, describe_splits
from ftune.methods import apply_method, count_parameters, method_callbacks, save_method_artifact
from ftune.model import load_base_model, load_tokenizer, resolve_model_source
from ftune.recipe import Recipe
from ftune.errors import FtuneError
from ftune.run_dir import (
    RunDir, atomic_dir, checkpoint_step, mark_checkpoint_complete, prepare_run_dir, run_lock, save_label_names,
    write_json_atomic, write_jsonl_atomic, write_text_atomic,
)
from ftune.runtime import quiet_libraries


def is_main_process() -> bool:
    """Rank 0 of a torchrun/accelerate launch, or a single process: the one that writes the run directory."""
    return os.environ.get("RANK", "0") == "0"


def seed_everything(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)


def run_training(recipe: Recipe, *, overwrite: bool = False, resume: bool = False, echo=print) -> RunDir:
    """Train as ``recipe`` says; rank 0 holds the run directory's lock throughout."""
    quiet_libraries()
    main = is_main_process()
    root = Path(recipe.output_dir).expanduser().resolve()
    with run_lock(root, echo=echo) if main else nullcontext():
        return train_into(recipe, overwrite=overwrite, resume=resume, echo=echo if main else (lambda *_: None))


def train_into(recipe: Recipe, *, overwrite: bool, resume: bool, echo) -> RunDir:
    started = datetime.now(timezone.utc)
    run = prepare_run_dir(recipe, overwrite=overwrite, resume=resume, write=is_main_process())
    checkpoint = resume_point(run, echo) if resume else None
    if resume and is_main_process():
        truncate_metrics(run, step=checkpoint_step(checkpoint) if checkpoint else 0)  # forget steps logged after it
    tokenizer = load_tokenizer(recipe.model)
    splits = build_datasets(recipe.data, tokenizer, recipe.task)
    echo(describe_splits(splits))
    if is_main_process():
        save_run_data(run, splits)
    seed_everything(recipe.training.seed)  # new heads and adapter weights are drawn from it
    base = load_base_model(recipe.model, recipe.quantization, task=recipe.task, labels=splits.label_names)
    model = apply_method(base, recipe.method, recipe.task)
    trainable, total = count_parameters(model)
    echo(f"Method {recipe.method.name}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.4f}%)")
    trainer = build_trainer(model, tokenizer, splits, recipe, run, echo=echo)
    clock = time.perf_counter()
    with disk_errors_explained(run):
        trained_here = train_or_restore(trainer, checkpoint, echo)
        wall = time.perf_counter() - clock
        eval_metrics = trainer.evaluate() if splits.eval else {}
        if not trainer.is_world_process_zero():
            return run
        save_artifacts(trainer.model, tokenizer, recipe, run)
        summary = build_summary(run, eval_metrics, trainer, wall, trained_here, trainable, total)
        save_loss_plot(run)
        write_json_atomic(run.manifest, build_manifest(recipe, started))
        write_json_atomic(run.summary, summary)  # last: its presence marks the run complete
    echo(f"train loss {summary['train_loss']:.4f}, eval loss {summary.get('eval_loss', float('nan')):.4f}, "
         f"{summary['tokens_per_second']:.0f} tokens/s, {summary['wall_time_s']:.1f} s")
    return run


def resume_point(run: RunDir, echo) -> Path | None:
    """The newest complete checkpoint; incomplete ones (a crash mid-save) are named and removed. None
    when the run was interrupted before its first complete checkpoint: it then starts from step 0."""
    for broken in run.incomplete_checkpoints():
        if is_main_process():
            echo(f"Skipping {broken.name}: it was not completely written (interrupted while saving); removing it")
            shutil.rmtree(broken, ignore_errors=True)
    checkpoint = run.last_checkpoint()
    echo(f"Resuming from {checkpoint.name}" if checkpoint else "No complete checkpoint yet; training from step 0")
    return checkpoint


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


def save_run_data(run: RunDir, splits) -> None:
    """What later stages need of the data, so the run directory works without it: class names and held-out rows."""
    save_label_names(run, splits.label_names)
    write_jsonl_atomic(run.heldout, splits.heldout)


def run_preprocess(recipe: Recipe, *, echo=print):
    """Fill the data cache for ``recipe`` (what ``ftune preprocess`` runs); loads the tokenizer only."""
    quiet_libraries()
    if not recipe.data.cache:
        raise FtuneError("data.cache: false, so there is no cache to fill; set data.cache: true (the default)")
    splits = build_datasets(recipe.data, load_tokenizer(recipe.model), recipe.task)
    echo(describe_splits(splits))
    return splits


def build_training_arguments(recipe: Recipe, run: RunDir, *, has_eval: bool):
    import torch
    from transformers import TrainingArguments

    train = recipe.training
    return TrainingArguments(
        output_dir=str(run.checkpoints),
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        num_train_epochs=train.epochs,
        max_steps=train.max_steps or -1,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_ratio,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        optim=train.optimizer,
        bf16=train.mixed_precision == "bf16",
        fp16=train.mixed_precision == "fp16",
        gradient_checkpointing=train.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if train.gradient_checkpointing else None,
        logging_steps=train.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_eval and train.eval_steps else "no",
        eval_steps=train.eval_steps,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        seed=train.seed,
        data_seed=train.seed,
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
    )


def build_trainer(model, tokenizer, splits, recipe: Recipe, run: RunDir, *, echo=print):
    from transformers import PrinterCallback, Trainer

    from ftune.progress import MetricsCallback

    batching = build_collator(model, tokenizer, task=recipe.task, packing=recipe.data.packing)
    echo(batching.note)
    trainer = Trainer(
        model=model,
        args=build_training_arguments(recipe, run, has_eval=bool(splits.eval)),
        train_dataset=splits.train,
        eval_dataset=splits.eval or None,
        data_collator=batching.collator,
        processing_class=tokenizer,
        callbacks=[MetricsCallback(run.metrics, echo=echo), checkpoint_marker(), *method_callbacks(model, recipe.method, run)],
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


def checkpoint_marker():
    """A Trainer callback that marks each checkpoint complete once the Trainer has written all of it."""
    from transformers import TrainerCallback

    class MarkComplete(TrainerCallback):
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


def save_artifacts(model, tokenizer, recipe: Recipe, run: RunDir) -> None:
    with atomic_dir(run.model) as staging:
        save_method_artifact(model, recipe.method.name, staging)
        tokenizer.save_pretrained(staging)


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


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


def build_summary(run: RunDir, eval_metrics: dict, trainer, wall: float, trained_here: int, trainable: int, total: int) -> dict:
    """Final figures; speed and wall time are those of the steps trained by this process."""
    state = trainer.state
    tokens = state.num_input_tokens_seen
    per_step = tokens / max(state.global_step, 1)
    summary = {
        "train_loss": logged_train_loss(run),
        "steps": state.global_step,
        "epochs": state.epoch,
        "tokens_seen": tokens,
        "tokens_per_second": per_step * trained_here / wall if wall and trained_here else 0.0,
        "wall_time_s": wall,
        "peak_memory_mb": peak_memory_mb(),
        "trainable_params": trainable,
        "total_params": total,
        "trainable_share": trainable / total,
    }
    if "eval_loss" in eval_metrics:
        summary["eval_loss"] = eval_metrics["eval_loss"]
    return summary


def build_manifest(recipe: Recipe, started: datetime) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {
        "ftune": __version__,
        "versions": {name: installed(name) for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets")},
        "python": platform.python_version(),
        "model_source": resolve_model_source(recipe.model).location,
        "data_fingerprint": data_fingerprint(recipe.data),
        "seed": recipe.training.seed,
        "hardware": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        },
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "started_at": started.isoformat(),
        "finished_at": datetime.now(timezone.utc).isoformat(),
    }


def save_loss_plot(run: RunDir) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in run.metrics.read_text().splitlines() if line] if run.metrics.is_file() else []
    figure, axis = plt.subplots(figsize=(6, 4))
    for key, label in (("loss", "train"), ("eval_loss", "eval")):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            axis.plot(*zip(*points), marker="o" if label == "eval" else None, label=label)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss")
    axis.legend()
    figure.tight_layout()
    figure.savefig(run.loss_plot, dpi=100)
    plt.close(figure)
