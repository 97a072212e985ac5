"""LoRA and AdaLoRA through peft, with the two pieces of bookkeeping peft leaves to the caller.

PiSSA/OLoRA initialise the adapter from the base weights and subtract it from them, so the trained
adapter only reproduces the model on that *modified* base. ``apply_lora`` keeps the adapter as
initialised; ``save_peft`` converts the trained one against it into a plain LoRA for the original base.

AdaLoRA prunes ranks during training only if ``update_and_allocate`` runs after every optimizer
step, between ``optimizer.step()`` and ``zero_grad()``: the Trainer's ``on_optimizer_step`` hook is
exactly that point. Its schedule needs the run's step count, which the Trainer knows at train begin.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path

from ftune.errors import FtuneError
from ftune.methods.heads import task_head_names
from ftune.methods.lora_forward import use_addmm_forward
from ftune.methods.peft_family import INITIAL_ADAPTER_ATTR, PEFT_TASK_TYPES, check_target_modules, targets, wrap_with_peft
from ftune.recipe.methods import CONVERTED_INITS



def apply_lora(model, config, task: str):
    from peft import LoraConfig

    if config.modules_to_save:
        check_target_modules(model, config.modules_to_save, "method.modules_to_save")
    peft_config = LoraConfig(
        task_type=PEFT_TASK_TYPES[task],
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=targets(config),
        bias=config.bias,
        modules_to_save=list(dict.fromkeys([*config.modules_to_save, *task_head_names(model, task)])) or None,
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
        init_lora_weights=True if config.init == "default" else config.init,  # peft's name for B=0
    )
    wrapped = wrap_with_peft(model, peft_config, "lora")
    use_addmm_forward(wrapped)
    if config.init in CONVERTED_INITS:
        keep_initial_adapter(wrapped)
    return wrapped


def keep_initial_adapter(model) -> Path:
    """Save the untrained adapter aside (deleted with the model); ``save_peft`` converts against it.

    Re-applying gives the same adapter (exact SVD/QR of the same weights), so a resumed run keeps
    an identical copy without reading one from the first run.
    """
    directory = Path(tempfile.mkdtemp(prefix="ftune-initial-adapter-"))
    weakref.finalize(model, shutil.rmtree, directory, True)
    model.save_pretrained(directory, safe_serialization=True)
    setattr(model, INITIAL_ADAPTER_ATTR, directory)
    return directory


def apply_adalora(model, config, task: str):
    from peft import AdaLoraConfig

    peft_config = AdaLoraConfig(
        task_type=PEFT_TASK_TYPES[task],
        init_r=config.init_r,
        target_r=config.target_r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=targets(config),
        tinit=config.tinit,
        tfinal=config.tfinal,
        deltaT=config.deltaT,
        beta1=config.beta1,
        beta2=config.beta2,
        orth_reg_weight=config.orth_reg_weight,
        # A placeholder that passes peft's own check; schedule_adalora sets the run's real step count.
        total_step=config.tinit + config.tfinal + 1,
        modules_to_save=task_head_names(model, task) or None,
    )
    return wrap_with_peft(model, peft_config, "adalora")


def schedule_adalora(model, total_steps: int) -> None:
    """Spread the rank budget over ``total_steps`` optimizer steps."""
    config = model.peft_config[model.active_adapter]
    if config.tinit + config.tfinal >= total_steps:
        raise FtuneError(
            f"method.tinit + method.tfinal ({config.tinit} + {config.tfinal}) leave no step of rank allocation in this "
            f"run's {total_steps} optimizer steps; lower them or train longer (training.max_steps / epochs)"
        )
    model.base_model.rankallocator.set_total_step(total_steps)


def allocate_adalora(model, step: int) -> None:
    """One allocation step: call after ``optimizer.step()`` and before ``zero_grad()`` (it reads the gradients)."""
    model.base_model.update_and_allocate(step)


def adalora_ranks(model) -> dict[str, int]:
    """Current rank of every adapted module (init_r until the first allocation)."""
    adapter = model.active_adapter
    config = model.peft_config[adapter]
    # Keys are parameter names inside the wrapped transformers model; saved configs drop the adapter name.
    pattern = config.rank_pattern or {}
    ranks = {}
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_E") and adapter in module.lora_E:
            mask = pattern.get(f"{name}.lora_E.{adapter}", pattern.get(f"{name}.lora_E"))
            ranks[name] = int(sum(mask)) if mask is not None else config.init_r
    return ranks


def adalora_callbacks(model, config, run) -> list:
    """The Trainer callback that runs AdaLoRA's allocation and records the final ranks in the run directory."""
    from transformers import TrainerCallback

    from ftune.run_dir import write_json_atomic

    class AdaloraAllocation(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            schedule_adalora(model, state.max_steps)

        def on_optimizer_step(self, args, state, control, **kwargs):
            # global_step still counts the steps before this one: peft's 0-based step index.
            allocate_adalora(model, state.global_step)

        def on_train_end(self, args, state, control, **kwargs):
            ranks = adalora_ranks(model)
            write_json_atomic(run.adalora_ranks, {
                "init_r": config.init_r, "target_r": config.target_r,
                "total_rank": sum(ranks.values()), "initial_total_rank": config.init_r * len(ranks), "ranks": ranks,
            })

    return [AdaloraAllocation()]
