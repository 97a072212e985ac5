"""The recipe's ``distributed:`` section made concrete for one launch: the Trainer's FSDP / DeepSpeed arguments and the
accelerate and DeepSpeed config files written into the run directory.

Nothing here shards anything itself: accelerate (FSDP2) and DeepSpeed do, configured through the Trainer's own
arguments. The files written beside the run describe exactly what was passed, so the run can be relaunched from the
run directory alone (``accelerate launch --config_file RUN/accelerate.yaml -m ftune train RUN/recipe.yaml``).

When one process fails the run ends: a collective waits at most ``collective_timeout_s`` for a process that neither
answers nor ends, and a process whose collective failed because another one is gone ends quietly with ``PEER_LOST``,
leaving one line for the launcher (``training.launch``), which names the process that failed first.
"""

from __future__ import annotations

import json
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from ftune.errors import FtuneError
from ftune.resources import local_ranks
from ftune.recipe.distributed import DistributedConfig, describe_strategy, resolved_strategy


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


TIMEOUT_VARIABLE = "FTUNE_COLLECTIVE_TIMEOUT"
# Long enough for rank 0 to write a large checkpoint while the others wait at the next collective, short enough that a
# process which stops answering (a frozen node) ends the run in minutes, not torch's 30; a process that ends is noticed
# at once (the launcher watches its children, and gloo and NCCL see the closed connections).
COLLECTIVE_TIMEOUT_S = 600
PEER_LOST = 3  # exit code of a process that stopped because another process of the run failed


def collective_timeout_s() -> int:
    """Seconds a collective waits for the other processes: ``FTUNE_COLLECTIVE_TIMEOUT``, else ``COLLECTIVE_TIMEOUT_S``."""
    raw = os.environ.get(TIMEOUT_VARIABLE, "").strip()
    if not raw:
        return COLLECTIVE_TIMEOUT_S
    if not raw.isdigit() or int(raw) < 1:
        raise FtuneError(f"{TIMEOUT_VARIABLE}={raw!r}: expected a whole number of seconds, e.g. 1800")
    return int(raw)


def wait_for_every_rank() -> None:
    """A barrier over the run's processes; nothing in a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def lost_peer(error: BaseException) -> bool:
    """Whether ``error`` is this process losing another one of the run: a closed connection or a timed-out collective
    (torch's distributed errors, and gloo's, which reach Python as a RuntimeError naming gloo's transport)."""
    import torch.distributed as dist

    text = str(error)
    return isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and ("gloo/" in text or "by peer" in text))


def record_for_launcher(message: str) -> None:
    """Leave this process's one-line failure where torch's elastic launcher reads it (its error file)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump({"message": message, "timestamp": int(time.time())}, handle)


def start_process_group() -> None:
    """Join this launch's CPU processes into one gloo group with ftune's collective timeout (the Trainer passes
    ``ddp_timeout`` on for CUDA and DeepSpeed only; accelerate then takes the group as it finds it)."""
    import datetime

    import torch
    import torch.distributed as dist

    if world_size() > 1 and not dist.is_initialized() and not torch.cuda.is_available():
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=collective_timeout_s()))


@contextmanager
def rank_process():
    """Around one process of a multi-process run: it joins the group with ftune's collective timeout; a failure caused
    by another process ending ends this one quietly with ``PEER_LOST`` (the launcher names the process that failed
    first, and a traceback per survivor would bury it); any other crash keeps its traceback and leaves its one line for
    the launcher. A user error prints its own line."""
    if world_size() <= 1:
        yield
        return
    try:
        start_process_group()
        yield
    except FtuneError:
        raise
    except Exception as error:
        # gloo opens its messages with the source line that raised them
        first_line = re.sub(r"^\[[^\]]*\]\s*", "", (str(error).strip().splitlines() or [""])[0])
        if lost_peer(error):
            record_for_launcher(f"lost contact with another process of the run ({first_line})")
            raise SystemExit(PEER_LOST) from None
        record_for_launcher(f"{type(error).__name__}: {first_line}")
        raise


@dataclass(frozen=True)
class Strategy:
    """How this launch's processes share the run."""

    name: str  # single, ddp, fsdp or deepspeed
    world_size: int
    description: str
    trainer_options: dict = field(default_factory=dict)  # TrainingArguments keywords
    deepspeed: dict | None = None  # the DeepSpeed config, when DeepSpeed runs


def strategy_name(section: DistributedConfig, world: int) -> str:
    """single, ddp, fsdp or deepspeed: what ``world`` processes run for the recipe's strategy."""
    return resolved_strategy(section.strategy, world)


def resolve_strategy(section: DistributedConfig, *, world: int | None = None, cuda: bool, wrap_classes: list[str] | None = None,
                     precision: str = "no", gradient_checkpointing: bool = False) -> Strategy:
    """The strategy for ``world`` processes: auto is ddp on several and a plain process on one; a sharding strategy on one
    process has nothing to shard, so it trains as a plain process (and says so)."""
    world = world_size() if world is None else world
    name = strategy_name(section, world)
    if name == "single":
        requested = section.strategy
        note = "" if requested in ("auto", "ddp") else f" (distributed.strategy: {requested} has nothing to shard over one process)"
        return Strategy("single", world, "single process" + note)
    description = describe_strategy(section.model_copy(update={"strategy": name}))
    timeout = {"ddp_timeout": collective_timeout_s()}
    if name == "ddp":
        return Strategy(name, world, description, timeout)
    if name == "fsdp":
        return Strategy(name, world, description, {**timeout, "fsdp": True, "fsdp_config": fsdp_config(section, wrap_classes, gradient_checkpointing)})
    if not cuda:
        raise FtuneError("distributed.strategy: deepspeed needs CUDA GPUs and this machine has none; use strategy: fsdp "
                         "(runs on CPU with the gloo backend) or ddp")
    config = deepspeed_config(section, precision=precision)
    return Strategy(name, world, description, {**timeout, "deepspeed": config}, deepspeed=config)


def fsdp_config(section: DistributedConfig, wrap_classes: list[str] | None, gradient_checkpointing: bool) -> dict:
    """transformers' ``fsdp_config`` for FSDP2: one unit per decoder layer, full state dicts gathered on save."""
    fsdp = section.fsdp
    wrap = wrap_classes if fsdp.wrap == "auto" else list(fsdp.wrap)
    if not wrap:
        raise FtuneError("distributed.fsdp.wrap: auto found no decoder layer class on this model (no _no_split_modules); "
                         "name the class of its repeated layer, e.g. wrap: [LlamaDecoderLayer]")
    return {
        "version": 2,
        "reshard_after_forward": fsdp.sharding == "full",
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_layer_cls_to_wrap": wrap,
        "cpu_offload": fsdp.cpu_offload,
        # Saves gather the whole state dict on rank 0: a normal folder that merge, eval and export read as they are.
        "state_dict_type": "FULL_STATE_DICT",
        "activation_checkpointing": gradient_checkpointing,
        "cpu_ram_efficient_loading": False,
    }


def deepspeed_config(section: DistributedConfig, *, precision: str) -> dict:
    """A DeepSpeed config whose batch, accumulation, clipping and precision come from the Trainer ("auto")."""
    ds = section.deepspeed
    zero: dict = {"stage": ds.zero_stage, "overlap_comm": True, "contiguous_gradients": True}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if ds.zero_stage == 3:
        # Gather the 16-bit weights on save so the saved folder is a normal one, not ZeRO shards.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "zero_optimization": zero,
    }
    if ds.offload_optimizer:
        # DeepSpeed refuses a Trainer-built optimizer under ZeRO-Offload; named here, it steps with its CPU AdamW, and
        # the Trainer fills each "auto" from the recipe's training section (the lr schedule stays the Trainer's).
        config["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}}
    return config


def decoder_layer_classes(model) -> list[str]:
    """The class names FSDP makes one unit each: the repeated layer transformers never splits across devices."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return sorted(set(getattr(base, "_no_split_modules", None) or []))


def write_strategy_files(run, strategy: Strategy, *, cuda: bool) -> None:
    """What the run's processes did, in the run directory: ``distributed.json`` (strategy, process count, the Trainer's
    options), ``accelerate.yaml`` to relaunch it the same way, and ``deepspeed.json`` when DeepSpeed ran."""
    import yaml

    from ftune.run_dir import write_json_atomic, write_text_atomic

    write_json_atomic(run.strategy, {"strategy": strategy.name, "world_size": strategy.world_size, "description": strategy.description,
                                     "trainer_options": strategy.trainer_options})
    if strategy.name != "single":
        write_text_atomic(run.accelerate_config, yaml.safe_dump(accelerate_launch_config(strategy, cuda=cuda), sort_keys=False))
    if strategy.deepspeed is not None:
        write_json_atomic(run.deepspeed_config, strategy.deepspeed)


def accelerate_launch_config(strategy: Strategy, *, cuda: bool) -> dict:
    """An ``accelerate launch --config_file`` config for the same strategy and process count."""
    per_machine = local_ranks(default=strategy.world_size)
    config = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": {"ddp": "MULTI_GPU" if cuda else "MULTI_CPU", "fsdp": "FSDP", "deepspeed": "DEEPSPEED"}[strategy.name],
        "num_processes": strategy.world_size,
        "num_machines": max(1, strategy.world_size // per_machine),
        "machine_rank": 0,
        "main_training_function": "main",
        "rdzv_backend": "static",
        "same_network": True,
        "use_cpu": not cuda,
    }
    if strategy.name == "fsdp":
        options = strategy.trainer_options["fsdp_config"]
        config["fsdp_config"] = {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": options["auto_wrap_policy"],
            "fsdp_transformer_layer_cls_to_wrap": ",".join(options["transformer_layer_cls_to_wrap"]),
            "fsdp_reshard_after_forward": options["reshard_after_forward"],
            "fsdp_offload_params": options["cpu_offload"],
            "fsdp_state_dict_type": options["state_dict_type"],
            "fsdp_activation_checkpointing": options["activation_checkpointing"],
            "fsdp_cpu_ram_efficient_loading": False,
        }
    if strategy.name == "deepspeed":
        config["deepspeed_config"] = {"deepspeed_config_file": "deepspeed.json"}
    return config


@contextmanager
def whole_weights(trainer):
    """Inside: on rank 0, the trained model holds its whole weights as plain tensors, so the method's own save writes
    a normal folder; every rank must enter (gathering is collective). Outside FSDP and ZeRO-3 it does nothing."""
    model = trainer.model
    if getattr(trainer, "is_fsdp_enabled", False):
        full = gathered_state_dict(model)
        if trainer.is_world_process_zero():
            replace_with_whole(model, full)
        yield
    elif getattr(trainer, "is_deepspeed_enabled", False) and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            yield
    else:
        yield


def gathered_state_dict(model) -> dict:
    """The whole state dict of an FSDP model on every rank (collective), each tensor copied out before FSDP reshards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    return {name: tensor.detach().clone() for name, tensor in full.items()}


def replace_with_whole(model, full: dict) -> None:
    """Swap each sharded parameter and buffer of ``model`` for its gathered tensor; tied weights stay one tensor."""
    import torch

    replaced: dict[int, torch.nn.Parameter] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if id(param) not in replaced:
            whole = full.get(name)
            if whole is None:
                continue  # a duplicate name of a tied weight the state dict lists once; set through its first name
            replaced[id(param)] = torch.nn.Parameter(whole, requires_grad=param.requires_grad)
        owner._parameters[leaf] = replaced[id(param)]
    for name, buffer in model.named_buffers(remove_duplicate=False):
        if name in full:
            owner_name, _, leaf = name.rpartition(".")
            model.get_submodule(owner_name)._buffers[leaf] = full[name]
