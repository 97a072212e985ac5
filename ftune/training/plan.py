"""Plan stage: how much memory a recipe needs, before any weights load.

``estimate_memory`` reads only the model's ``config.json`` and counts parameters from the
architecture (``training.layout``: decoder LMs of the Llama family, BERT-style encoders), so ``ftune plan`` answers in
well under a second and ``ftune train`` can refuse a run that cannot fit. The activation
coefficients were calibrated against ``ftune.training.probe`` measurements of float32 CPU runs (full
fine-tuning, LoRA, QLoRA).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ftune.errors import FtuneError
from ftune.hardware import cheap_autocast_16bit
from ftune.resources import local_ranks
from ftune.recipe import Recipe, method_class
from ftune.recipe.schema import OPTIMIZERS
from ftune.training.base_dtype import expected_precision, holds_base_in_bf16
from ftune.training.chunked_loss import LOSS_CHUNK
from ftune.training.layout import build_layout, read_model_config, trainable_shapes

MIB = 2**20
# Saved activations per token and layer, in units of hidden (H), intermediate (I) and key/value
# width (KV), plus logits per token in units of the vocabulary: calibrated on float32 CPU probes.
ACTIVATIONS = {"decoder": (14, 5, 4), "encoder": (14, 4, 0)}
LOGIT_COPIES = 3  # logits, their log-softmax and its gradient are alive together in the loss backward
# Under 16-bit autocast the head's own 16-bit output and its gradient join the three float32 copies.
LOGIT_16BIT_COPIES = 2
# 16-bit autocast without checkpointing: layer activations measured 0.62x the float32 coefficients at 2 bytes
# (SmolLM2-135M, LoRA r16 all-linear, batch 1, 256 and 1024 tokens, bf16 on CPU, peak RSS). With checkpointing the
# saved layer inputs are the float32 residual stream of a float32 base, and with a frozen base the recomputed layer
# measured as in float32 too (256-2048 tokens; not measured for full fine-tuning, which keeps the 16-bit size).
AUTOCAST_LAYER_ACTIVATIONS = 0.62
# Past LOSS_CHUNK the model returns every layer's hidden states for the chunked loss: peak RSS then grew by about three
# float32 copies of them per token more than below the chunk (SmolLM2-135M, LoRA r16, bf16 frozen base on CPU, heap
# trimmed before each step; 1024 -> 4096 tokens: +1,156 MiB checkpointed, +3,517 MiB without; scripts/bench_lengths.py).
HIDDEN_STATES_COPIES = 3
# With a frozen base, peak activations measured 1.27x those of full fine-tuning (Llama, h512, LoRA
# all-linear r8, float32 CPU): the adapter paths keep their own inputs and outputs alive.
FROZEN_BASE_ACTIVATIONS = 1.27
# The process itself on CPU: ~410 MiB RSS once torch/transformers/peft are imported, ~120 MiB more
# for data, accelerate and the Trainer. GPU counters (max_memory_allocated) exclude all of it.
RUNTIME_MIB = {"cpu": 530, "cuda": 0}


@dataclass
class MemoryPlan:
    """Bytes per component (MiB in ``lines``), the totals, and what each optimizer step consumes."""

    parameters: int
    trainable: int
    approximate: bool
    weights_mib: float
    trainable_mib: float
    gradients_mib: float
    optimizer_mib: float
    activations_mib: float
    eval_mib: float
    runtime_mib: float
    tokens_per_step: int
    device: str
    notes: list[str] = field(default_factory=list)
    load_mib: float = 0.0  # the peak while the weights load and are cast (a bf16 frozen base on CPU), before training

    @property
    def total_mib(self) -> float:
        training = self.gradients_mib + self.activations_mib
        return max(self.weights_mib + self.trainable_mib + self.optimizer_mib + max(training, self.eval_mib) + self.runtime_mib,
                   self.load_mib)

    def as_dict(self) -> dict:
        return {**asdict(self), "total_mib": self.total_mib}


def estimate_memory(recipe: Recipe, config: dict, *, device: str = "cpu", precision: str | None = None) -> MemoryPlan:
    """The plan of ``recipe`` on ``device``; ``precision`` is the launch's autocast mode where it is known (``ftune train``),
    else what file probes suggest (``ftune plan``)."""
    layout = build_layout(config)
    train, quant = recipe.training, recipe.quantization
    weight_bytes = 4 if recipe.model.dtype in ("float32",) or (recipe.model.dtype == "auto" and device == "cpu") else 2
    bf16_base = False
    if quant.bits:
        # bitsandbytes packs the layer linears; embeddings, norms and the head keep weight_bytes.
        packed = quant.bits / 8 + (4 / 64 if quant.bits == 4 else 4 / layout.hidden)  # + absmax per 64-block / per row
        weights = layout.linear_params * packed + layout.other_params * 4  # prepare_model_for_kbit_training upcasts the rest
    elif bf16_base := weight_bytes == 4 and holds_base_in_bf16(recipe, precision or expected_precision(train.mixed_precision, device)):
        norms = layout.layers * layout.layer_norm_params  # stay float32 (training.base_dtype); the final norm is in other_params
        weights = (layout.total_params - norms) * 2 + norms * 4
    else:
        weights = layout.total_params * weight_bytes
    shapes, approximate = trainable_shapes(recipe, layout)
    if recipe.is_classification:
        labels = len(recipe.data.labels or ("a", "b"))
        shapes.append((labels, layout.hidden))
        if layout.kind == "encoder":
            shapes.append((labels, 1))  # BERT's classifier has a bias; a decoder's score head does not
    trainable = sum(a * b for a, b in shapes)
    in_weights = method_class(recipe.method.name).trains_base_weights
    master = 4  # trained tensors and their gradients stay float32 (peft upcasts adapters)
    if (state_bytes := OPTIMIZERS[train.optimizer]) is None:
        optimizer = sum((a + b if b > 1 else a) * 4 for a, b in shapes)  # factored second moment, no momentum
    else:
        optimizer = trainable * state_bytes
    tokens = train.batch_size * recipe.data.max_length
    autocast = cheap_autocast_16bit(train.mixed_precision, device) if precision is None else precision != "no"
    act_bytes = 2 if autocast else 4
    h, i, kv = ACTIVATIONS[layout.kind]
    stored_32bit = not quant.bits and weights == layout.total_params * 4  # the base's weights (and residual stream) float32
    # The loss upcasts logits to float32; past LOSS_CHUNK positions a row's head runs a chunk at a time
    # (training.chunked_loss), so at most batch x LOSS_CHUNK rows of logits are alive, whatever the length.
    copies = LOGIT_COPIES * 4 + (LOGIT_16BIT_COPIES * act_bytes if act_bytes == 2 else 0)
    logits = 0 if recipe.is_classification else copies * layout.vocab
    logit_rows = train.batch_size * min(recipe.data.max_length, LOSS_CHUNK)
    if train.gradient_checkpointing:
        saved = 4 if stored_32bit else act_bytes
        per_layer = (h * layout.hidden + i * layout.intermediate + kv * layout.kv_width) * (act_bytes if in_weights else saved)
        layers_term = layout.hidden * saved * layout.layers + per_layer  # layer inputs, plus one layer recomputed
    else:
        per_layer = (h * layout.hidden + i * layout.intermediate + kv * layout.kv_width) * act_bytes
        layers_term = per_layer * layout.layers * (AUTOCAST_LAYER_ACTIVATIONS if act_bytes == 2 else 1.0)
    layers_term *= 1.0 if in_weights else FROZEN_BASE_ACTIVATIONS
    if logits and recipe.data.max_length > LOSS_CHUNK:
        residual = 4 if stored_32bit or bf16_base else act_bytes  # a bf16 frozen base keeps the float32 residual stream
        layers_term += HIDDEN_STATES_COPIES * layout.hidden * residual * (layout.layers + 1)
    activations = tokens * layers_term + logit_rows * logits
    weight_copies = 0
    if act_bytes == 2 and stored_32bit:
        # A base stored in float32 under 16-bit autocast: each GEMM saves its 16-bit weight copy for the backward, whatever
        # the batch; all layers' copies without checkpointing, one layer's with it, and the head's (vocab x hidden) in both.
        layer_copies = layout.linear_params if not train.gradient_checkpointing else layout.linear_params // layout.layers
        weight_copies = (layer_copies + layout.vocab * layout.hidden) * act_bytes
    if quant.bits == 4 and device == "cpu":
        # bitsandbytes' CPU path dequantizes each 4-bit weight to float32 and autograd keeps that copy.
        activations += layout.linear_params * 4
    eval_act = tokens * 2 * layout.hidden * act_bytes + (logit_rows * 2 * layout.vocab * 4 if logits else 0)  # no graph kept
    notes = [f"trainable parameters of method '{recipe.method.name}' are approximate; --probe measures them"] if approximate else []
    load = 0.0
    if bf16_base:
        notes.append("weights: the frozen base is held in bf16 for bf16 autocast (norms float32)")
        if device == "cpu":  # the cast reads every float32 page of the checkpoint while writing the bf16 copies
            load = (layout.total_params * 4 + weights) / MIB + RUNTIME_MIB["cpu"]
    if act_bytes == 2:
        notes.append("activations under 16-bit autocast are calibrated on one model (SmolLM2-135M, LoRA, bf16 on CPU); --probe measures them")
    return MemoryPlan(
        parameters=layout.total_params,
        trainable=trainable,
        approximate=approximate,
        weights_mib=(weights + weight_copies) / MIB,
        trainable_mib=0.0 if in_weights else trainable * master / MIB,
        gradients_mib=trainable * master / MIB,
        optimizer_mib=optimizer / MIB,
        activations_mib=activations / MIB,
        eval_mib=eval_act / MIB,
        runtime_mib=RUNTIME_MIB["cpu" if device == "cpu" else "cuda"],
        tokens_per_step=tokens * train.gradient_accumulation_steps,
        device=device,
        notes=notes,
        load_mib=load,
    )


def format_plan(recipe: Recipe, plan: MemoryPlan) -> str:
    train = recipe.training
    rows = [
        ("weights", plan.weights_mib, f"{plan.parameters / 1e6:.1f}M parameters"
         + (f", {recipe.quantization.bits}-bit linears" if recipe.quantization.bits else "")),
        ("trainable params", plan.trainable_mib, f"{plan.trainable / 1e6:.3f}M ({100 * plan.trainable / plan.parameters:.2f}%)"
         + (", inside the weights" if not plan.trainable_mib else ", float32")),
        ("gradients", plan.gradients_mib, "float32"),
        ("optimizer states", plan.optimizer_mib, train.optimizer),
        ("activations", plan.activations_mib, f"batch {train.batch_size} x {recipe.data.max_length} tokens"
         + (", gradient checkpointing" if train.gradient_checkpointing else "")),
        ("eval batch", plan.eval_mib, "no gradients; not alive with the training activations"),
        ("runtime", plan.runtime_mib, "torch, transformers, data" if plan.runtime_mib else "not counted on GPUs"),
    ]
    lines = [f"Memory plan for {recipe.model.name_or_path} ({recipe.method.name}, {plan.device}):"]
    lines += [f"  {name:<17}{mib:>10.1f} MiB   {why}" for name, mib, why in rows]
    if plan.load_mib and plan.load_mib >= plan.total_mib:
        lines.append(f"  {'loading':<17}{plan.load_mib:>10.1f} MiB   the float32 checkpoint read while the bf16 base is cast: the peak")
    lines.append(f"  {'total (peak)':<17}{plan.total_mib:>10.1f} MiB")
    lines.append(f"Tokens per optimizer step: up to {plan.tokens_per_step:,} "
                 f"({train.batch_size} x {recipe.data.max_length} x {train.gradient_accumulation_steps} accumulation)")
    lines += [f"note: {note}" for note in plan.notes]
    return "\n".join(lines)


def plan_recipe(recipe: Recipe, *, device: str | None = None) -> MemoryPlan:
    from ftune.hardware import cheap_device

    return estimate_memory(recipe, read_model_config(recipe), device=device or cheap_device())


def cheapest_fix(recipe: Recipe, config: dict, *, device: str, free_mib: float, precision: str | None = None) -> str | None:
    """The first change that fits, in order of how little it changes the run (same result, same math, other model)."""
    train = recipe.training

    def fits(**changes) -> tuple[bool, float]:
        sections = {k: getattr(recipe, k).model_copy(update=v) for k, v in changes.items()}
        plan = estimate_memory(recipe.model_copy(update=sections), config, device=device, precision=precision)
        return plan.total_mib <= free_mib, plan.total_mib

    if not train.gradient_checkpointing and method_class(recipe.method.name).gradient_checkpointing:
        ok, mib = fits(training={"gradient_checkpointing": True})
        if ok:
            return f"--set training.gradient_checkpointing=true (~{mib:,.0f} MiB; same results, ~30% slower)"
    batch, accumulation = train.batch_size, train.gradient_accumulation_steps
    while batch > 1:
        batch, accumulation = batch // 2, accumulation * 2
        ok, mib = fits(training={"batch_size": batch, "gradient_accumulation_steps": accumulation})
        if ok:
            return (f"--set training.batch_size={batch} --set training.gradient_accumulation_steps={accumulation} "
                    f"(~{mib:,.0f} MiB; same examples per optimizer step)")
    if recipe.quantization.bits is None and 4 in method_class(recipe.method.name).quantized_base:
        ok, mib = fits(quantization={"bits": 4}, training={"gradient_checkpointing": method_class(recipe.method.name).gradient_checkpointing})
        if ok:
            return f"QLoRA: --set quantization.bits=4 --set training.gradient_checkpointing=true (~{mib:,.0f} MiB)"
    return None


def check_fits(recipe: Recipe, *, device: str, free_mib: float | None, precision: str | None = None, echo=print) -> MemoryPlan | None:
    """Refuse (FtuneError) a run whose plan exceeds the free memory, naming the cheapest fix; None if unknown."""
    if free_mib is None:
        return None
    try:
        config = read_model_config(recipe)
        plan = estimate_memory(recipe, config, device=device, precision=precision)
    except FtuneError as unknown:  # an architecture the planner cannot lay out must still train
        echo(f"memory plan: unavailable ({unknown})")
        return None
    if device == "cpu":
        free_mib /= local_ranks()  # local ranks share the host's memory
    echo(f"memory plan: ~{plan.total_mib:,.0f} MiB of {free_mib:,.0f} MiB free ({device})")
    if plan.total_mib <= free_mib:
        return plan
    fix = cheapest_fix(recipe, config, device=device, free_mib=free_mib, precision=precision)
    raise FtuneError(
        f"the run needs ~{plan.total_mib:,.0f} MiB but {free_mib:,.0f} MiB is free on {device} (see ftune plan); "
        + (f"cheapest fix: {fix}" if fix else "no single setting fits; use a smaller model or a larger machine")
        + "; --force trains anyway"
    )
