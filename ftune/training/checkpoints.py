"""Checkpoints and resume: why an interrupted run loses nothing.

A checkpoint counts once every file in it is synced and its marker is written (the Trainer writes
checkpoints in place, so a folder alone proves nothing). Resuming picks the newest complete one,
restores instead of training when training had already finished, logs every step once, and
reports the training loss over the whole run. Each checkpoint's marker records its files' sizes and
checksums, and a resume skips a checkpoint damaged since it was written. A failed write for lack of
space (a full disk, a quota, the file-size limit) or permission is one line naming the path and what
is needed.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ftune import checksums
from ftune.disk import explained, mib, written_bytes
from ftune.errors import FtuneError
from ftune.recipe.distributed import resolved_strategy
from ftune.run_dir import CHECKPOINT_COMPLETE, RunDir, mark_checkpoint_complete, write_json_atomic, write_text_atomic


def is_main_process() -> bool:
    """Rank 0 of a torchrun/accelerate launch, or a single process: the one that writes the run directory."""
    return os.environ.get("RANK", "0") == "0"


def resume_point(run: RunDir, echo) -> Path | None:
    """The newest complete checkpoint whose files are as they were written; incomplete ones (a crash mid-save) and
    damaged ones (a file truncated or changed since) are named and removed. None when the run was interrupted before
    its first sound checkpoint: it then starts from step 0."""
    for broken in run.incomplete_checkpoints():
        if is_main_process():
            echo(f"Skipping {broken.name}: it was not completely written (interrupted while saving); removing it")
            shutil.rmtree(broken, ignore_errors=True)
    checkpoint = None
    for candidate in reversed([p for p in run.checkpoint_folders() if (p / CHECKPOINT_COMPLETE).is_file()]):
        damage = checkpoint_damage(candidate)
        if damage is None:
            checkpoint = candidate
            break
        if is_main_process():
            echo(f"Skipping {candidate.name}: {damage}; removing it and resuming from the previous complete checkpoint")
            shutil.rmtree(candidate, ignore_errors=True)
    echo(f"Resuming from {checkpoint.name}" if checkpoint else "No complete checkpoint yet; training from step 0")
    return checkpoint


def checkpoint_damage(checkpoint: Path) -> str | None:
    """The first file of a complete checkpoint that differs from what its marker recorded, named; None if none does."""
    marker = checkpoint / CHECKPOINT_COMPLETE
    if marker.read_text(encoding="utf-8", errors="replace").strip() == "complete":
        return None  # marked before markers recorded their files: nothing to check against
    recorded = checksums.read_record(marker)
    return f"{CHECKPOINT_COMPLETE} is damaged" if recorded is None else checksums.damage(checkpoint, recorded)


PROCESSES_FILE = "ftune-processes.json"  # in each checkpoint: how many processes wrote it, how they split a step


@dataclass(frozen=True)
class Processes:
    """How the processes that wrote a checkpoint split an optimizer step."""

    world_size: int
    batch_size: int  # per process and forward pass
    accumulation: int
    strategy: str  # single, ddp, fsdp or deepspeed

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_size * self.accumulation


def record_processes(checkpoint: Path, args, strategy: str) -> None:
    write_json_atomic(checkpoint / PROCESSES_FILE, {"world_size": args.world_size, "batch_size": args.per_device_train_batch_size,
                                                    "accumulation": args.gradient_accumulation_steps, "strategy": strategy})


def checkpoint_processes(checkpoint: Path, recipe) -> Processes:
    """What wrote ``checkpoint``; for a checkpoint without the record, read from its files (one RNG state per rank)."""
    record = checkpoint / PROCESSES_FILE
    if record.is_file():
        return Processes(**json.loads(record.read_text()))
    world = len(list(checkpoint.glob("rng_state_*.pth"))) or 1
    written = "fsdp" if any(checkpoint.glob("pytorch_model_fsdp*")) else "deepspeed" if any(checkpoint.glob("global_step*")) else "auto"
    strategy = resolved_strategy(written, world)
    return Processes(world, recipe.training.batch_size, recipe.training.gradient_accumulation_steps, strategy)


def resume_accumulation(checkpoint: Path, recipe, *, world_size: int, strategy: str) -> int:
    """The gradient accumulation that resumes ``checkpoint`` on ``world_size`` processes at the same data position:
    every optimizer step must take as many rows as before, because the Trainer finds its position by skipping the
    batches each process's sampler served, and the processes' shares interleave one global order. A checkpoint the
    new launch cannot read (another strategy's optimizer format, ZeRO's per-rank partitions) is refused with the reason."""
    written = checkpoint_processes(checkpoint, recipe)
    batch = recipe.training.batch_size
    if written.world_size == world_size and batch == written.batch_size:
        return written.accumulation
    processes = f"{written.world_size} process{'es' if written.world_size > 1 else ''}"
    if written.strategy == "deepspeed" or strategy == "deepspeed":
        raise FtuneError(f"--resume: {checkpoint.name} was written by {processes} and DeepSpeed partitions the optimizer state per "
                         f"process; resume on the same count (--nproc {written.world_size})")
    if (written.strategy == "fsdp") != (strategy == "fsdp"):
        need = "--nproc 2 or more with distributed.strategy: fsdp" if written.strategy == "fsdp" else f"{written.strategy} as it was written"
        raise FtuneError(f"--resume: {checkpoint.name} was written under {written.strategy} by {processes} and this launch runs "
                         f"{strategy}; the optimizer state is stored in the strategy's own format, so resume with {need}")
    per_step = batch * world_size
    if written.global_batch % per_step:
        fits = [n for n in range(1, written.global_batch + 1) if written.global_batch % (batch * n) == 0]
        raise FtuneError(f"--resume: {checkpoint.name} took {written.global_batch} rows per optimizer step ({processes} x batch "
                         f"{written.batch_size} x accumulation {written.accumulation}); {world_size} processes x batch {batch} cannot "
                         f"make that up; resume with --nproc in {fits} or change training.batch_size")
    return written.global_batch // per_step


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


@contextmanager
def disk_errors_explained(run: RunDir):
    """Turn a write that failed for lack of room (full disk, quota, file-size limit) or permission into one line naming
    the path, the room there and what a checkpoint needs; the checkpoint it cut short is removed, the previous stays."""
    def partial() -> Path:
        return (run.incomplete_checkpoints() or [run.checkpoints])[-1]

    def remove_partial() -> None:
        if is_main_process():
            for broken in run.incomplete_checkpoints():
                shutil.rmtree(broken, ignore_errors=True)

    with explained(partial, needs=lambda: checkpoint_need(run), then="continue with ftune train --resume", cleanup=remove_partial):
        yield


def checkpoint_need(run: RunDir) -> str:
    """What the next save needs: the size of the biggest complete checkpoint (or the saved model) and its biggest file."""
    folders = [p for p in [run.last_checkpoint(), run.model] if p is not None and p.is_dir()]
    sizes = [[f.stat().st_size for f in folder.rglob("*") if f.is_file()] for folder in folders]
    if not any(sizes):
        return f"a checkpoint needs more than the {mib(written_bytes(run.checkpoints))} it had written"
    return f"a checkpoint needs about {mib(max(map(sum, sizes)))} (its largest file {mib(max(max(s, default=0) for s in sizes))})"


def checkpoint_marker(strategy: str):
    """A Trainer callback that marks each checkpoint complete once the Trainer has written all of it (with how
    ``strategy``'s processes split a step), and logs the loss at each checkpoint and at the end (what
    ``logged_train_loss`` needs)."""
    from transformers import TrainerCallback

    class MarkComplete(TrainerCallback):
        checked = False  # whether this process's first save has been checked
        def on_step_end(self, args, state, control, **kwargs):
            # A log line at every checkpoint and at the last step: the logged windows then cover every
            # step, and a resumed run's windows start exactly where the checkpoint's ended.
            if control.should_save or state.global_step >= state.max_steps:
                control.should_log = True

        def on_save(self, args, state, control, model=None, **kwargs):
            from ftune.training.distributed import wait_for_every_rank

            wait_for_every_rank()  # each process has written its part (its RNG state) before rank 0 marks the checkpoint
            if state.is_world_process_zero:
                checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                record_processes(checkpoint, args, strategy)
                if not self.checked and model is not None:  # the first save of this process: is it loadable and whole?
                    check_saved_weights(checkpoint, model)
                    self.checked = True
                mark_checkpoint_complete(checkpoint)

    return MarkComplete()


# Wrapper and adapter-name parts that a save leaves out of a parameter's name.
NAME_NOISE = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.", "module.")


def saved_name(name: str) -> str:
    for noise in NAME_NOISE:
        name = name.replace(noise, "")
    # peft drops its adapter name and the modules_to_save infix of a wrapped copy (a classifier head, MAM's adapters).
    name = name.replace(".default.", ".").replace(".default", "").replace(".modules_to_save.", ".")
    # DoRA's magnitude is a module's weight in the model and one tensor named after the module in the save.
    name = name.replace(".lora_magnitude_vector.weight", ".lora_magnitude_vector")
    return name.removeprefix("base_model.model.")


def check_saved_weights(checkpoint: Path, model, *, compared: int = 4) -> None:
    """Fail at the first checkpoint, not at the end, when a save came out empty or partial: every trainable tensor
    must be in the checkpoint's safetensors files with its whole shape, and the first ``compared`` must hold this
    process's values. Under FSDP or ZeRO-3 rank 0 holds the first slice of each tensor, which is compared in place."""
    from safetensors import safe_open

    files = sorted(checkpoint.glob("*.safetensors"))
    saved = {}
    for file in files:
        handle = safe_open(str(file), framework="pt")
        saved.update({saved_name(key): (handle, key) for key in handle.keys()})
    trainable = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    # peft saves a prompt encoder as the virtual tokens it produces, under one name.
    prompt = [name for name, _ in trainable if "prompt_encoder." in name]
    trainable = [(name, param) for name, param in trainable if name not in prompt]
    missing = [name for name, _ in trainable if saved_name(name) not in saved] + (["prompt_embeddings"] if prompt and "prompt_embeddings" not in saved else [])
    if not files or missing:
        raise FtuneError(
            f"the first checkpoint ({checkpoint}) is {'empty' if not files else 'partial'}: "
            f"{len(missing)} of {len(trainable)} trainable tensors missing (e.g. {saved_name((missing or [trainable[0][0]])[0])}); "
            "the strategy's save did not gather the weights, so training stopped here instead of at the end"
        )
    # AdaLoRA saves each matrix cut to the rank its budget left, not as the model holds it.
    pruned_on_save = any(type(config).__name__ == "AdaLoraConfig" for config in getattr(model, "peft_config", {}).values())
    for name, param in trainable[: 0 if pruned_on_save else compared]:
        handle, key = saved[saved_name(name)]
        on_disk = handle.get_tensor(key)
        whole_shape = tuple(getattr(param, "ds_shape", None) or param.shape)  # ZeRO-3 keeps the whole shape aside
        local = local_slice(param).flatten()
        start = min(local.numel(), on_disk.numel())  # ZeRO-3 pads the last partition
        if tuple(on_disk.shape) != whole_shape or not on_disk.flatten()[:start].float().equal(local[:start].float()):
            raise FtuneError(f"the first checkpoint ({checkpoint}) does not hold the trained values of {saved_name(name)} "
                             f"(saved shape {tuple(on_disk.shape)}, model {whole_shape}); the save is not loadable as trained")


def local_slice(param):
    """This process's values of ``param``, from its start: all of it, or rank 0's shard under FSDP / ZeRO-3."""
    if hasattr(param, "to_local"):  # FSDP2 DTensor sharded along dim 0: rank 0 holds the first rows
        return param.to_local().detach().cpu()
    if hasattr(param, "ds_tensor"):  # ZeRO-3 keeps a flat partition; rank 0's is the start of the flat tensor
        return param.ds_tensor.detach().cpu()
    return param.detach().cpu()


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


