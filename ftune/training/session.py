"""A training session: everything a run trains with, built but not started.

``ftune train`` (``training.run``), ``ftune plan --probe`` (``training.probe``) and the benchmark scripts
build the same session, so what they measure is what a run does. The hardware decisions (precision,
threads, TF32, the distributed strategy) are made once, in ``prepare_hardware``, and carried from there;
nothing below re-derives them. The stage row (``training.stages``) supplies the data and the Trainer spec;
the rest is the same for every stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftune.hardware import Precision, apply_tf32, resolve_precision, resolve_tf32
from ftune.resources import Threads, apply_threads, resolve_threads
from ftune.model import load_base_model, load_tokenizer
from ftune.recipe import Recipe
from ftune.run_dir import RunDir, save_label_names, write_jsonl_atomic, write_text_atomic
from ftune.training.checkpoints import is_main_process
from ftune.training.distributed import Strategy, decoder_layer_classes, resolve_strategy, world_size
from ftune.training.stages import STAGES
from ftune.training.trainer import build_trainer


@dataclass(frozen=True)
class Launch:
    """The hardware decisions of a run, made once before anything loads."""

    precision: Precision
    threads: Threads
    tf32: bool
    cuda: bool
    world_size: int


def train_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


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
    return Launch(precision, threads, tf32, cuda=train_device() == "cuda", world_size=world_size())


@dataclass
class Session:
    """What ``ftune train`` and ``ftune plan --probe`` share: the built Trainer and what it was built from."""

    trainer: Any
    tokenizer: Any
    splits: Any
    trainable: int
    total: int
    launch: Launch
    strategy: Strategy


def build_session(recipe: Recipe, run: RunDir, launch: Launch, *, echo=print, callbacks: tuple = ()) -> Session:
    from transformers import set_seed

    from ftune.methods import apply_method, count_parameters
    from ftune.training.base_dtype import hold_frozen_base_in_bf16, holds_base_in_bf16
    from ftune.training.compilation import compile_callback
    from ftune.training.kernels import choose_kernels

    stage = STAGES[recipe.stage]
    tokenizer = load_tokenizer(recipe.model)
    splits = stage.build_splits(recipe, tokenizer)
    echo(stage.describe(splits))
    if is_main_process():
        save_run_data(run, splits)
    set_seed(recipe.training.seed)  # new heads and adapter weights are drawn from it
    base = load_base_model(recipe.model, recipe.quantization, task=recipe.task, labels=splits.label_names)
    if (note := keep_router_loss(base)) is not None:
        echo(note)
    routers = moe_router_weights(base)  # before a method wraps them
    model = apply_method(base, recipe.method, recipe.task)
    trainable, total = count_parameters(model)
    echo(f"Method {recipe.method.name}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.4f}%)")
    describe_adapted(model, routers, echo)
    echo(f"attention: {base.config._attn_implementation}")
    kernels = choose_kernels(model, recipe, cuda=launch.cuda)
    echo(f"kernels: {'liger' if kernels.liger else 'none'} ({kernels.reason})")
    if (compiling := compile_callback(model, recipe, precision=launch.precision.mode, liger=kernels.liger, echo=echo)) is not None:
        callbacks = (*callbacks, compiling)
    strategy = resolve_strategy(recipe.distributed, world=launch.world_size, cuda=launch.cuda, wrap_classes=decoder_layer_classes(model),
                                precision=launch.precision.mode, gradient_checkpointing=recipe.training.gradient_checkpointing)
    spec = stage.spec(model, tokenizer, splits, recipe, liger=kernels.liger)  # may run the model in float32 (packed attention's check)
    # Not under Liger: its fused head computes gradients against the head's weight in its own kernels (unverified in bf16).
    if not kernels.liger and holds_base_in_bf16(recipe, launch.precision.mode) and hold_frozen_base_in_bf16(model):
        echo("frozen base dtype: bfloat16 (cast once for bf16 autocast; trained tensors and optimizer state stay float32)")
    trainer = build_trainer(spec, model, tokenizer, recipe, run, precision=launch.precision, strategy=strategy, echo=echo,
                            callbacks=callbacks)
    return Session(trainer, tokenizer, splits, trainable, total, launch, strategy)


def moe_router_weights(model) -> set[str]:
    from ftune.methods.peft_family import moe_routers

    return {name.rsplit(".", 1)[-1] + ".weight" for name in moe_routers(model)}


def describe_adapted(model, routers: set[str], echo) -> None:
    from ftune.methods.peft_family import adapted_modules

    if adapted := adapted_modules(model):
        echo(f"  adapted: {', '.join(adapted)}")
        if routers := routers & set(adapted):
            echo(f"  note: {', '.join(sorted(routers))} is the mixture-of-experts router: adapting it changes which experts "
                 "each token reaches (all-linear leaves it alone)")


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
    """What later stages need of the data, so the run directory works without it: class names, held-out rows, and
    grpo's reward functions."""
    save_label_names(run, splits.label_names)
    write_jsonl_atomic(run.heldout, splits.heldout)
    for source in getattr(splits, "reward_files", ()):  # grpo: the reward functions eval calls, kept with the run
        run.reward_functions.mkdir(exist_ok=True)
        write_text_atomic(run.reward_functions / Path(source).name, Path(source).read_text(encoding="utf-8"))
