"""The one place a transformers Trainer is built, for every stage.

A stage (``training.stages``) says what differs: its Trainer class (transformers' own or a TRL one),
its arguments class and options, its datasets, collator and loss. Everything else is the same for all
of them and lives here: the arguments from the recipe, the callbacks (metrics, the experiment trackers of the
recipe's ``tracking`` section, checkpoint markers, for long rows the heap's freed pages handed back before each step,
the method's own), and the subclass stack, which reads from the inside out:

    stage class (Trainer, or TRL's DPOTrainer / ORPOTrainer / RewardTrainer with ftune's row handling)
      <- ExampleTokensTrainer  stages that batch examples: counts each example's tokens, not a packed row's
      <- CpuFsdp...            FSDP on CPU only: lets accelerate shard over gloo (``trainer_class_for``)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ftune.hardware import Precision
from ftune.resources import cheap_affinity_cpus, resolve_loader, return_freed_memory
from ftune.methods import method_callbacks
from ftune.recipe import Recipe
from ftune.run_dir import RunDir
from ftune.training.checkpoints import checkpoint_marker, is_main_process
from ftune.training.distributed import Strategy, write_strategy_files


@dataclass
class TrainerSpec:
    """What a stage trains with; ``build_trainer`` adds what every stage shares."""

    trainer_class: type
    train_dataset: Any
    eval_dataset: Any = None
    args_class: type | None = None  # a TrainingArguments subclass (TRL's configs); None: TrainingArguments
    options: dict = field(default_factory=dict)  # the stage's own arguments (beta, max_length, ...)
    collator: Callable | None = None
    loss_func: Callable | None = None
    counts_example_tokens: bool = False  # batches hold examples whose tokens tokens_seen should count
    trainer_options: dict = field(default_factory=dict)  # the stage Trainer's own keywords (ref_model)
    notes: tuple[str, ...] = ()  # printed before training: how the stage batches, what its loss is
    after_build: Callable[[Any], None] | None = None  # adjusts the built trainer (e.g. drops TRL's reference adapter copy)


def build_training_arguments(recipe: Recipe, run: RunDir, *, has_eval: bool, precision: Precision, strategy: Strategy,
                             args_class=None, **stage_options):
    """The Trainer's arguments; a stage passes its own arguments class (a TrainingArguments subclass) and options."""
    import torch
    from transformers import TrainingArguments

    train = recipe.training
    cuda = torch.cuda.is_available()
    loader = resolve_loader(cuda=cuda, cpus=cheap_affinity_cpus())
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
        report_to="none",  # the recipe's trackers are ftune's own callback (training.tracking), fed the metrics.jsonl lines
        disable_tqdm=True,
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=loader.workers,
        dataloader_pin_memory=loader.pin_memory,
        **strategy.trainer_options,
        **stage_options,
    )


def build_trainer(spec: TrainerSpec, model, tokenizer, recipe: Recipe, run: RunDir, *, precision: Precision, strategy: Strategy,
                  echo=print, callbacks: tuple = ()):
    """The stage's Trainer over ``model``, with the arguments, callbacks and subclasses every stage shares."""
    from transformers import PrinterCallback

    from ftune.training.progress import MetricsCallback
    from ftune.training.tracking import tracking_callback

    for note in spec.notes:
        echo(note)
    args = build_training_arguments(recipe, run, has_eval=spec.eval_dataset is not None, precision=precision, strategy=strategy,
                                    args_class=spec.args_class, **spec.options)
    tracking = tracking_callback(recipe, run)
    metrics = MetricsCallback(run.metrics, echo=echo, sinks=(tracking.log,) if tracking else ())
    stage_class = counting_example_tokens(spec.trainer_class) if spec.counts_example_tokens else spec.trainer_class
    trainer = trainer_class_for(stage_class, args)(
        model=model,
        args=args,
        train_dataset=spec.train_dataset,
        eval_dataset=spec.eval_dataset,
        processing_class=tokenizer,
        callbacks=[metrics, *([tracking] if tracking else []), checkpoint_marker(strategy.name),
                   *([freed_memory_returned()] if recipe.data.max_length >= TRIMMED_LENGTH else []),
                   *method_callbacks(model, recipe.method, run), *callbacks],
        **({"data_collator": spec.collator} if spec.collator is not None else {}),
        **({"compute_loss_func": spec.loss_func} if spec.loss_func is not None else {}),
        **spec.trainer_options,
    )
    trainer.remove_callback(PrinterCallback)
    if spec.after_build is not None:
        spec.after_build(trainer)
    return trainer


# Rows from this length on hand the heap's freed pages back before each step. Below it the trim saved little and cost
# time (quickstart, 128 tokens x 8: 1,666 against 1,759 MiB peak, 427 against 522 tokens/s: the next step page-faults
# the pages back in); at 4,096 tokens it saved ~1 GB of a 3.8 GB peak.
TRIMMED_LENGTH = 1024


def freed_memory_returned():
    """A Trainer callback that hands the C heap's free pages back before each step (``return_freed_memory``), so a
    step's peak does not sit on the previous step's leftovers."""
    from transformers import TrainerCallback

    class ReturnFreedMemory(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            return_freed_memory()

    return ReturnFreedMemory()


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


def trainer_class_for(trainer_class: type, args) -> type:
    """The Trainer class to build for ``args``: ``trainer_class``, or on CPU under FSDP a subclass that lets accelerate
    shard on CPU (accelerate only turns FSDP on for accelerator devices, while torch's FSDP2 runs on CPU over gloo)."""
    import os

    import torch

    from ftune.training.distributed import gathered_state_dict

    if torch.cuda.is_available() or not args.fsdp:
        return trainer_class

    class CpuFsdpTrainer(trainer_class):
        def create_accelerator_and_postprocess(self):
            from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

            super().create_accelerator_and_postprocess()
            state = self.accelerator.state
            plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            if state.mixed_precision != "no":
                plugin.set_mixed_precision(state.mixed_precision)
            state.distributed_type, state.fsdp_plugin = DistributedType.FSDP, plugin
            self.is_fsdp_enabled = True

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            import torch
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
            )

            # accelerate broadcasts rank 0's copy, and over gloo the other ranks leave that broadcast early and hang
            # the run; every rank reads the (CPU-sized) file itself instead.
            saved = torch.load(os.path.join(resume_from_checkpoint, "pytorch_model_fsdp.bin"), weights_only=True)
            set_model_state_dict(model or self.model_wrapped, saved, options=StateDictOptions(full_state_dict=True, strict=False))

        def save_model(self, output_dir=None, _internal_call=False):
            # accelerate gathers with cpu_offload=True, which on CPU hands back tensors whose storage FSDP has already freed.
            self._save(output_dir or self.args.output_dir, state_dict=gathered_state_dict(self.model))

    CpuFsdpTrainer.__name__ = CpuFsdpTrainer.__qualname__ = f"CpuFsdp{trainer_class.__name__}"
    return CpuFsdpTrainer
