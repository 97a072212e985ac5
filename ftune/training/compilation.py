"""torch.compile for training steps: the decoder layers, compiled in place, when the run is long enough to pay.

Regional compilation: every decoder layer runs the same code, so dynamo traces one layer and the
other layers reuse its graph (their weights are graph inputs), and compiling a 30-layer model costs
about what one layer costs. The embedding, the LM head and the loss stay eager; they are one matmul
each and change shape with the labelled positions of every batch.

Shapes: sizes are symbolic from the first batch (``dynamic=True``), so packed rows of any length and
padded batches of any width run the graph the first batch of their layout compiled; left to guess,
dynamo would compile the first sizes, then recompile symbolic at the next size (measured: 29 s more).
``tests/unit/test_compilation.py`` counts the compilations over ragged batches.

Only the training forward is compiled. Evaluation (no gradients, eval mode) runs the eager layers:
compiling it would be a second, separate compilation for a few batches.

``training.compile: auto`` runs the first steps eager, measures them, and compiles when the
remaining steps save more than compiling costs. The compile cost and the speedup come from
``scripts/bench_compile.py`` (SmolLM2-135M, LoRA r16 all-linear), measured in each precision on a
machine that trains in it: compiling buys much less in float32, where the GEMMs already dominate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class CompileFigures:
    """What compiling costs once and then saves per step, as scripts/bench_compile.py measured it."""

    cost_s: float
    speedup: float
    measured_on: str


# scripts/bench_compile.py, 24 steps, cold inductor cache; the cost is what the compiled run spent beyond its steady
# pace (one compilation, at step 1). Two runs each. bf16 (with transformers' masked sdpa): 57.3 s and 1.19x, 49.4 s
# and 1.23x. float32 with ftune.packed_attention's sdpa, which runs eager between the compiled pieces of each layer:
# 75.7 s and 1.12x, 53.2 s and 0.92x (the machine's speed drifted by a quarter between the runs; with masked sdpa the
# figures were 37.8 s and 1.08x, 60.0 s and 1.06x). A warm cache (the next run of the same recipe) cost 0 s and 9.4 s in
# float32 (--warm); auto assumes the cold cost, so it never compiles a run that cannot pay for its first compilation.
# fp16 (GPUs without bf16) is not measured: bf16's figures.
COMPILE_FIGURES = {
    "bf16": CompileFigures(55.0, 1.2, "2-core AVX512-BF16 CPU, bf16"),
    "no": CompileFigures(64.0, 1.02, "2-core AVX2 CPU, float32"),
}
# torch.compile's backend; the tests count compilations with a backend of their own.
BACKEND: Any = "inductor"
# Eager steps timed before auto decides; the first step (allocator and thread-pool warm-up) is not counted.
PROBE_STEPS = 3


def compile_blocker(model) -> str | None:
    """Why the decoder layers of ``model`` cannot be compiled, or None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = decoder_layers(model)
    if not layers:
        return f"{type(base).__name__} names no repeated decoder layer (_no_split_modules) to compile"
    if any("forward" in vars(layer) for layer in layers):  # the shared graph runs the class's forward
        return f"{type(layers[0]).__name__} has a forward replaced on the instance"
    return None


def decoder_layers(model) -> list:
    from ftune.training.distributed import decoder_layer_classes

    classes = set(decoder_layer_classes(model))
    return [module for module in model.modules() if type(module).__name__ in classes]


def compile_decoder_layers(model, *, backend: Any = "inductor") -> int:
    """Compile each decoder layer's training forward in place; returns how many layers were compiled.

    One compiled function takes the layer as an argument, so dynamo guards on the layer's class and
    structure, not on which layer it is, and every layer runs the graph the first one compiled."""
    import torch

    def run_layer(layer, *args, **kwargs):
        return type(layer).forward(layer, *args, **kwargs)

    # dynamo caches graphs per code object, and run_layer's is the same for every run in this process: an earlier
    # run's graphs would count against the recompile limit and push this run's layers back to eager.
    torch._dynamo.reset()
    compiled = torch.compile(run_layer, backend=backend, dynamic=True)
    layers = decoder_layers(model)
    for layer in layers:
        if getattr(layer, "_ftune_eager_forward", None) is not None:
            continue  # already compiled (a resumed or re-entered run)

        def forward(*args, _layer=layer, **kwargs):
            if _layer.training and torch.is_grad_enabled():
                return compiled(_layer, *args, **kwargs)
            return _layer._ftune_eager_forward(*args, **kwargs)

        layer._ftune_eager_forward = layer.forward
        layer.forward = forward
    return len(layers)


@dataclass(frozen=True)
class CompileDecision:
    compile: bool
    reason: str


def decide(*, step_time_s: float, remaining_steps: int, precision: str = "bf16") -> CompileDecision:
    """Auto: compile when the remaining steps, sped up, save more than compiling costs (figures for ``precision``,
    the autocast mode: bf16, fp16 or no)."""
    measured = COMPILE_FIGURES.get(precision, COMPILE_FIGURES["bf16"])
    saving = remaining_steps * step_time_s * (1 - 1 / measured.speedup)
    figures = (f"{remaining_steps} steps left at {step_time_s:.2f} s/step would save ~{saving:.0f} s at {measured.speedup:g}x, "
               f"compiling costs ~{measured.cost_s:.0f} s; figures from a {measured.measured_on}")
    return CompileDecision(saving > measured.cost_s, figures)


def compile_callback(model, recipe, *, precision: str = "bf16", liger: bool = False, echo=print):
    """The Trainer callback that compiles ``model``'s decoder layers as ``training.compile`` says, or None when nothing
    will be compiled. ``precision``: the autocast mode the run trains in (auto's figures depend on it). ``liger``:
    Liger's kernels will patch the layers (training.kernels: auto chose them)."""
    from transformers import TrainerCallback

    from ftune.errors import FtuneError

    setting = recipe.training.compile
    if setting is False:
        return None
    liger_note = "training.kernels: auto chose Liger's Triton kernels, which run inside the layers (not measured compiled)"
    if blocker := recipe.compile_blocker or (liger_note if liger else None) or compile_blocker(model):
        if setting is True:
            raise FtuneError(f"training.compile: true, but {blocker}; set training.compile: auto or false")
        echo(f"compile: off (auto: {blocker})")
        return None
    if recipe.stage == "grpo" and setting is not True:
        # The figures above time whole SFT steps. A grpo step spends most of its time sampling completions, which runs
        # the eager layers (no gradients), so only its training forward would speed up: auto cannot tell that it pays.
        echo("compile: off (auto: a grpo step is mostly sampling, which runs the eager layers; training.compile: true "
             "compiles its training forward)")
        return None

    class CompileWhenItPays(TrainerCallback):
        def __init__(self) -> None:
            self.started: float | None = None
            self.times: list[float] = []
            self.decided = False
            self.compiled = False

        def compile(self, reason: str) -> None:
            count = compile_decoder_layers(model, backend=BACKEND)
            self.compiled = self.decided = True
            echo(f"compile: on ({reason}); {count} decoder layers, the next step compiles them")

        def on_train_begin(self, args, state, control, **kwargs):
            if setting is True:
                self.compile("training.compile: true")
            elif state.max_steps - state.global_step <= PROBE_STEPS + 1:
                self.decided = True
                echo(f"compile: off (auto: {state.max_steps - state.global_step} steps to train, too few to pay for compiling)")

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self.decided or self.started is None:
                return
            self.times.append(time.perf_counter() - self.started)
            if len(self.times) < PROBE_STEPS + 1:
                return
            step_time = sum(self.times[1:]) / PROBE_STEPS
            decision = decide(step_time_s=step_time, remaining_steps=state.max_steps - state.global_step, precision=precision)
            if decision.compile:
                self.compile(f"auto: {decision.reason}")
            else:
                self.decided = True
                echo(f"compile: off (auto: {decision.reason})")

    return CompileWhenItPays()
