"""Probe: train a few real steps of a recipe and measure step time, throughput and peak memory.

``ftune plan --probe N`` runs them through ``training.session``, the same setup ``ftune train``
uses, in a scratch run directory that is deleted afterwards, and projects the whole run's wall time
from the measured pace. The plan's estimate is printed beside the measurement so the two can be
compared (``tests/e2e/test_plan_probe.py`` holds them within 15%).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ftune.training.plan import MemoryPlan
from ftune.recipe import Recipe


@dataclass
class ProbeResult:
    steps: int
    step_time_s: float
    tokens_per_second: float
    peak_mib: float
    baseline_mib: float
    trainable: int
    total_steps: int
    projected_s: float
    device: str


def run_probe(recipe: Recipe, steps: int, *, echo=print) -> ProbeResult:
    """Train ``steps`` optimizer steps with the recipe's settings in a scratch run directory and measure them."""
    import tempfile
    import time

    from transformers import TrainerCallback

    from ftune.resources import current_rss_mib
    from ftune.recipe.tracking import TrackingConfig
    from ftune.run_dir import prepare_run_dir
    from ftune.runtime import quiet_libraries
    from ftune.training.report import peak_memory_mb
    from ftune.training.session import build_session, prepare_hardware

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.tokens, self._start = [], [], 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self._start)
            self.tokens.append(state.num_input_tokens_seen)
            control.should_save = False  # a probe keeps nothing

    launch = prepare_hardware(recipe, echo=echo)
    quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="ftune-probe-") as scratch:
        training = recipe.training.model_copy(update={"max_steps": steps, "eval_steps": None})
        probe = recipe.model_copy(update={"training": training, "output_dir": scratch, "tracking": TrackingConfig()})  # reports nowhere
        run = prepare_run_dir(probe, overwrite=True, resume=False)
        baseline = current_rss_mib()
        timer = StepTimer()
        session = build_session(probe, run, launch, echo=echo, callbacks=(timer,))
        session.trainer.train()
        peak = peak_memory_mb()
        rows = len(session.splits.train)
    # The first step pays for kernel selection and allocator warm-up; the rest are the run's pace.
    timed = timer.times[1:] or timer.times
    tokens = (timer.tokens[-1] - timer.tokens[0]) if len(timer.tokens) > 1 else timer.tokens[-1]
    step_time = sum(timed) / len(timed)
    train = recipe.training
    per_epoch = max(1, math.ceil(rows / train.batch_size) // train.gradient_accumulation_steps)
    total_steps = train.max_steps or math.ceil(per_epoch * train.epochs)
    return ProbeResult(
        steps=len(timer.times),
        step_time_s=step_time,
        tokens_per_second=tokens / sum(timed) if sum(timed) else 0.0,
        peak_mib=peak,
        baseline_mib=baseline,
        trainable=session.trainable,
        total_steps=total_steps,
        projected_s=total_steps * step_time,
        device="cuda" if launch.cuda else "cpu",
    )


def format_probe(result: ProbeResult, plan: MemoryPlan) -> str:
    what = "peak allocated (torch.cuda)" if result.device == "cuda" else "peak RSS"
    return "\n".join([
        f"Probe: {result.steps} steps, {result.step_time_s:.3f} s/step, {result.tokens_per_second:,.0f} tokens/s",
        f"  {what}: {result.peak_mib:,.1f} MiB measured vs {plan.total_mib:,.1f} MiB planned "
        f"(plan = {100 * plan.total_mib / result.peak_mib:.0f}% of measured); process before loading: {result.baseline_mib:,.1f} MiB",
        f"  trainable parameters: {result.trainable:,} measured vs {plan.trainable:,} planned",
        f"  projected: {result.total_steps:,} steps x {result.step_time_s:.3f} s = {format_duration(result.projected_s)} "
        "(training only; evaluation and saving add to it)",
    ])


def format_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
