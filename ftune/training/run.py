"""Train stage: recipe -> tokenizer, data, model, method -> transformers Trainer -> run directory.

``run_training`` reads as the table of contents of a run; each step is a named function. The
Trainer owns the loop; ftune adds callbacks for progress, metrics and method-specific hooks.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ftune import __version__
from ftune.training.checkpoints import (
    checkpoint_marker, disk_errors_explained, is_main_process, logged_train_loss, resume_accumulation, resume_point, train_or_restore, truncate_metrics,
)
from ftune.training.compilation import compile_callback
from ftune.data import build_collator, build_datasets, data_fingerprint, describe_splits
from ftune.training.distributed import trainer_class_for, whole_weights
from ftune.errors import FtuneError
from ftune.training.kernels import choose_kernels
from ftune.hardware import (
    Precision, Threads, apply_tf32, apply_threads, cheap_affinity_cpus, free_memory_mib, resolve_loader, resolve_precision,
    resolve_tf32, resolve_threads,
)
from ftune.methods import apply_method, count_parameters, method_callbacks, save_method_artifact
from ftune.methods.peft_family import adapted_modules, moe_routers
from ftune.model import load_base_model, load_tokenizer, resolve_model_source
from ftune.training.plan import check_fits
from ftune.recipe import Recipe
from ftune.recipe.stages import PREFERENCE_STAGES, PRETRAIN
from ftune.recipe.tasks import CAUSAL_LM
from ftune.run_dir import (
    RunDir, atomic_dir, checkpoint_step, prepare_run_dir, run_lineage, run_lock, save_label_names, write_json_atomic, write_jsonl_atomic,
)
from ftune.runtime import quiet_libraries


def train_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def seed_everything(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)


def run_training(recipe: Recipe, *, overwrite: bool = False, resume: bool = False, force: bool = False, echo=print) -> RunDir:
    """Train as ``recipe`` says; rank 0 holds the run directory's lock throughout."""
    main = is_main_process()
    echo = echo if main else (lambda *_: None)
    launch = prepare_hardware(recipe, echo=echo)  # before any loading: a refusal costs nothing
    if not force:
        check_fits(recipe, device=train_device(), free_mib=free_memory_mib(train_device()), echo=echo)
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
    checkpoint = resume_point(run, echo) if resume else None
    if checkpoint is not None:
        recipe = keep_rows_per_step(recipe, checkpoint, echo=echo)
    if resume and is_main_process():
        truncate_metrics(run, step=checkpoint_step(checkpoint) if checkpoint else 0)  # forget steps logged after it
    session = build_session(recipe, run, precision=launch.precision, echo=echo)
    trainer = session.trainer
    clock = time.perf_counter()
    with disk_errors_explained(run):
        trained_here = train_or_restore(trainer, checkpoint, echo)
        wall = time.perf_counter() - clock
        eval_metrics = trainer.evaluate() if session.splits.eval else {}
        with whole_weights(trainer):
            if not trainer.is_world_process_zero():
                return run
            save_artifacts(trainer.model, session.tokenizer, recipe, run)
        summary = build_summary(run, eval_metrics, trainer, wall, trained_here, session.trainable, session.total)
        save_loss_plot(run)
        write_json_atomic(run.manifest, build_manifest(recipe, started, launch=launch, model=trainer.model))
        write_json_atomic(run.summary, summary)  # last: its presence marks the run complete
    echo(f"train loss {summary['train_loss']:.4f}, eval loss {summary.get('eval_loss', float('nan')):.4f}, "
         f"{summary['tokens_per_second']:.0f} tokens/s, {summary['wall_time_s']:.1f} s")
    return run


def keep_rows_per_step(recipe: Recipe, checkpoint: Path, *, echo) -> Recipe:
    """The recipe to resume ``checkpoint`` with on this launch's process count: the same rows per optimizer step, by
    gradient accumulation, so the loss curve and the data position continue where they were."""
    from ftune.training.distributed import strategy_name, world_size

    world = world_size()
    accumulation = resume_accumulation(checkpoint, recipe, world_size=world, strategy=strategy_name(recipe.distributed, world))
    if accumulation == recipe.training.gradient_accumulation_steps:
        return recipe
    echo(f"resuming on {world} process{'es' if world > 1 else ''}: gradient_accumulation_steps {recipe.training.gradient_accumulation_steps} "
         f"-> {accumulation}, so each optimizer step still takes {accumulation * world * recipe.training.batch_size} rows as the checkpoint's did")
    return recipe.model_copy(update={"training": recipe.training.model_copy(update={"gradient_accumulation_steps": accumulation})})


@dataclass(frozen=True)
class Launch:
    """The hardware decisions of a run, made once before anything loads."""

    precision: Precision
    threads: Threads
    tf32: bool


def prepare_hardware(recipe: Recipe, *, echo=print) -> Launch:
    """Resolve and apply precision, threads and TF32, saying what was chosen and why."""
    from ftune.training.launch import describe_world

    if (world := describe_world(recipe.distributed)) is not None:
        echo(world)
    precision = resolve_precision(recipe.training.mixed_precision)
    echo(precision.describe(recipe.training.mixed_precision))
    if precision.warning:
        echo(f"warning: {precision.warning}")
    threads = resolve_threads(recipe.training.threads)
    apply_threads(threads)
    echo(f"threads: {threads.count} ({threads.reason})")
    tf32 = resolve_tf32()
    apply_tf32(tf32)
    if tf32:
        echo("tf32: on for float32 matmuls (Ampere+ GPU)")
    return Launch(precision, threads, tf32)


@dataclass
class Session:
    """Everything a run trains with, built but not started: what ``ftune train`` and ``ftune plan --probe`` share."""

    trainer: Any
    tokenizer: Any
    splits: Any
    trainable: int
    total: int


def build_session(recipe: Recipe, run: RunDir, *, precision: Precision, echo=print, callbacks: tuple = ()) -> Session:
    tokenizer = load_tokenizer(recipe.model)
    preference = recipe.stage in PREFERENCE_STAGES
    if preference:
        from ftune.training.preference import build_pair_splits, build_preference_trainer, describe_pairs

        splits = build_pair_splits(recipe, tokenizer)
        echo(describe_pairs(splits))
    elif recipe.stage == PRETRAIN:
        from ftune.training.pretrain import build_block_splits, describe_blocks

        splits = build_block_splits(recipe, tokenizer)
        echo(describe_blocks(splits))
    else:
        splits = build_datasets(recipe.data, tokenizer, recipe.task)
        echo(describe_splits(splits))
    if is_main_process():
        save_run_data(run, splits)
    seed_everything(recipe.training.seed)  # new heads and adapter weights are drawn from it
    base = load_base_model(recipe.model, recipe.quantization, task=recipe.task, labels=splits.label_names)
    if (note := keep_router_loss(base)) is not None:
        echo(note)
    routers = {name.rsplit(".", 1)[-1] + ".weight" for name in moe_routers(base)}  # before a method wraps them
    model = apply_method(base, recipe.method, recipe.task)
    trainable, total = count_parameters(model)
    echo(f"Method {recipe.method.name}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.4f}%)")
    if adapted := adapted_modules(model):
        echo(f"  adapted: {', '.join(adapted)}")
        if routers := routers & set(adapted):
            echo(f"  note: {', '.join(sorted(routers))} is the mixture-of-experts router: adapting it changes which experts "
                 "each token reaches (all-linear leaves it alone)")
    echo(f"attention: {base.config._attn_implementation}")
    kernels = choose_kernels(model, recipe, cuda=train_device() == "cuda")
    echo(f"kernels: {'liger' if kernels.liger else 'none'} ({kernels.reason})")
    if (compiling := compile_callback(model, recipe, precision=precision.mode, liger=kernels.liger, echo=echo)) is not None:
        callbacks = (*callbacks, compiling)
    if preference:
        trainer = build_preference_trainer(model, tokenizer, splits, recipe, run, precision=precision, echo=echo, callbacks=callbacks)
    else:
        trainer = build_trainer(model, tokenizer, splits, recipe, run, precision=precision, echo=echo, callbacks=callbacks,
                                liger=kernels.liger)
    return Session(trainer, tokenizer, splits, trainable, total)


def keep_router_loss(model) -> str | None:
    """Mixture-of-experts models add their load-balancing loss to the LM loss only when asked to return router logits;
    without it the router is free to send every token to the same experts. The weight is the model's own
    ``router_aux_loss_coef`` (0.001 for Mixtral and Qwen3-MoE), as the architecture was trained with."""
    config = model.config
    coefficient = getattr(config, "router_aux_loss_coef", 0.0) or 0.0
    if not hasattr(config, "output_router_logits") or coefficient <= 0:
        return None
    config.output_router_logits = True
    return f"mixture of experts: training loss = LM loss + {coefficient:g} x router load-balancing loss (router_aux_loss_coef)"


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


def build_training_arguments(recipe: Recipe, run: RunDir, *, has_eval: bool, precision: Precision, model=None, args_class=None,
                             **stage_options):
    """The Trainer's arguments; a stage passes its own arguments class (a TrainingArguments subclass) and options.
    ``model`` (the one being trained) is what FSDP's units are found in."""
    import torch
    from transformers import TrainingArguments

    from ftune.training.distributed import decoder_layer_classes, resolve_strategy, write_strategy_files

    train = recipe.training
    cuda = torch.cuda.is_available()
    loader = resolve_loader(cuda=cuda, cpus=cheap_affinity_cpus())
    strategy = resolve_strategy(recipe.distributed, cuda=cuda, wrap_classes=decoder_layer_classes(model) if model is not None else None,
                                precision=precision.mode, gradient_checkpointing=train.gradient_checkpointing)
    # FSDP checkpoints activations itself (its fsdp_config), without the Trainer's extra all-gather in backward.
    checkpointing = train.gradient_checkpointing and strategy.name != "fsdp"
    if is_main_process():
        write_strategy_files(run, strategy, cuda=cuda)
    return (args_class or TrainingArguments)(
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
        bf16=precision.mode == "bf16",
        fp16=precision.mode == "fp16",
        gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        logging_steps=train.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_eval and train.eval_steps else "no",
        eval_steps=train.eval_steps,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        seed=train.seed,
        data_seed=train.seed,
        use_cpu=not cuda,
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=loader.workers,
        dataloader_pin_memory=loader.pin_memory,
        **strategy.trainer_options,
        **stage_options,
    )


def build_trainer(model, tokenizer, splits, recipe: Recipe, run: RunDir, *, precision: Precision, echo=print, callbacks: tuple = (),
                  liger: bool = False):
    from transformers import PrinterCallback, Trainer

    from ftune.training.progress import MetricsCallback

    if recipe.stage == PRETRAIN:
        from ftune.training.pretrain import pretrain_batching

        batching = pretrain_batching(model)
    else:
        batching = build_collator(model, tokenizer, task=recipe.task, packing=recipe.data.packing)
    echo(batching.note)
    collator, loss_func = batching.collator, None
    if liger and recipe.task == CAUSAL_LM:
        echo("Loss: Liger's fused linear cross-entropy (the logits are never materialised)")
    elif recipe.task == CAUSAL_LM and recipe.stage != PRETRAIN:  # pretraining labels every token: nothing to skip
        from ftune.training.label_positions import keeps_labelled_positions, labelled_positions_blocker, loss_at_labelled_positions

        if (blocker := labelled_positions_blocker(model, recipe.method.name)) is None:
            config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
            coefficient = getattr(config, "router_aux_loss_coef", 0.0) if getattr(config, "output_router_logits", False) else 0.0
            collator, loss_func = keeps_labelled_positions(collator), loss_at_labelled_positions(coefficient)
            echo("Loss: LM head and cross-entropy at the labelled positions only")
        else:
            echo(f"Loss: LM head at every position ({blocker})")
    args = build_training_arguments(recipe, run, has_eval=bool(splits.eval), precision=precision, model=model, use_liger_kernel=liger)
    trainer = trainer_class_for(counting_example_tokens(Trainer), args)(
        model=model,
        args=args,
        train_dataset=splits.train,
        eval_dataset=splits.eval or None,
        data_collator=collator,
        compute_loss_func=loss_func,
        processing_class=tokenizer,
        callbacks=[MetricsCallback(run.metrics, echo=echo), checkpoint_marker(), *method_callbacks(model, recipe.method, run), *callbacks],
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


def counting_example_tokens(trainer_class: type) -> type:
    """``trainer_class`` counting the tokens of the examples in each batch (``tokens_seen``: the data's tokens, padding
    left out and a shared prefix counted in every example that opens with it) and the positions the model computed
    (``computed_tokens``: padding in, a shared prefix once). The Trainer's own count reads a packed row's length."""

    class ExampleTokensTrainer(trainer_class):
        computed_tokens = 0

        def _track_num_input_tokens(self, inputs):
            import torch

            from ftune.packed_attention import example_tokens

            ids = inputs["input_ids"]
            if "attention_mask" in inputs:
                examples = int(inputs["attention_mask"].sum())
            elif "position_ids" in inputs:
                examples = sum(example_tokens(row) for row in inputs["position_ids"].tolist())
            else:
                examples = ids.numel()
            counts = self.accelerator.gather(torch.tensor([examples, ids.numel()], device=self.args.device)).view(-1, 2).sum(0)
            self.state.num_input_tokens_seen += int(counts[0])
            self.computed_tokens += int(counts[1])

    ExampleTokensTrainer.__name__ = ExampleTokensTrainer.__qualname__ = trainer_class.__name__
    return ExampleTokensTrainer


def save_artifacts(model, tokenizer, recipe: Recipe, run: RunDir) -> None:
    with atomic_dir(run.model) as staging:
        save_method_artifact(model, recipe.method.name, staging)
        tokenizer.save_pretrained(staging)


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    from ftune.hardware import peak_rss_mib

    return peak_rss_mib()


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
        "computed_tokens_per_second": getattr(trainer, "computed_tokens", 0) / wall if wall else 0.0,
        "wall_time_s": wall,
        "peak_memory_mb": peak_memory_mb(),
        "trainable_params": trainable,
        "total_params": total,
        "trainable_share": trainable / total,
    }
    if "eval_loss" in eval_metrics:
        summary["eval_loss"] = eval_metrics["eval_loss"]
    if "eval_rewards/accuracies" in eval_metrics:  # preference stages: share of held-out pairs ranked right
        summary["eval_preference_accuracy"] = eval_metrics["eval_rewards/accuracies"]
    return summary


def build_manifest(recipe: Recipe, started: datetime, *, launch: Launch, model=None) -> dict:
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
        "stage": recipe.stage,
        "lineage": run_lineage(recipe.model.name_or_path),  # earlier runs this one continues from, oldest first
        "data_fingerprint": data_fingerprint(recipe.data),
        "seed": recipe.training.seed,
        "mixed_precision": {
            "requested": recipe.training.mixed_precision,
            "used": launch.precision.mode,
            "reason": launch.precision.reason,
            "warning": launch.precision.warning,
        },
        "hardware": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "threads": {"used": launch.threads.count, "reason": launch.threads.reason},
            "attention": getattr(getattr(model, "config", None), "_attn_implementation", None),
            "tf32": launch.tf32,
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
