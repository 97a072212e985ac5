"""What training.compile buys: the same recipe trained eager and with compiled decoder layers, side by side.

Both runs go through ``training.session.build_session``, the setup ``ftune train`` uses, in one process, one after the other,
on the same data order and starting weights. A callback times every optimizer step. Printed: the eager and compiled
steady step times (the median of the second half of the steps), the compile cost (the time the compiled run spent
beyond its steady pace, less the eager run's own warm-up, with a cold inductor cache), the speedup, the steps
after which compiling has paid for itself, and the largest difference between the two runs' per-step losses.
``--warm`` trains a third time, traced afresh by dynamo on the inductor cache the second run filled, as a user's next
run of the same recipe would, and prints that compile cost too. Dropout is set to 0 so the runs can be compared loss
for loss. Run it on an idle machine; its figures are ftune.training.compilation's COMPILE_FIGURES for the
precision it trained in.

Usage::

    python scripts/bench_compile.py [--recipe recipes/smollm2-135m/lora-quickstart.yaml] [--steps 24] [--warm]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def steady(times: list[float]) -> float:
    """The step time once warm: the median of the second half of the steps (compiling and recompiling are over)."""
    return statistics.median(times[len(times) // 2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/smollm2-135m/lora-quickstart.yaml")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warm", action="store_true", help="also measure a compiled run on a warm inductor cache")
    parser.add_argument("--verbose", action="store_true", help="print every step's time and loss")
    args = parser.parse_args()

    from transformers import TrainerCallback

    from ftune.recipe import load_recipe
    from ftune.run_dir import RunDir
    from ftune.runtime import quiet_libraries
    from ftune.training.session import build_session, prepare_hardware

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times, self.losses, self.started = [], [], 0.0

        def on_step_begin(self, train_args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, train_args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.started)

        def on_log(self, train_args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    quiet_libraries()
    # A cold inductor cache, as a user's first compiled run has: a warm one would hide most of the compile cost (--warm).
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="ftune-bench-inductor-")
    results = {}
    runs = ("eager", "compiled", "warm") if args.warm else ("eager", "compiled")
    for name in runs:
        compiled = name != "eager"
        with tempfile.TemporaryDirectory() as workdir:
            overrides = [f"training.max_steps={args.steps}", "training.save_steps=100000", "training.logging_steps=1",
                         f"training.compile={'true' if compiled else 'false'}", f"output_dir={workdir}/run"]
            recipe = load_recipe(args.recipe, overrides)
            if "dropout" in type(recipe.method).model_fields:  # equal losses need equal (no) dropout masks
                recipe = recipe.model_copy(update={"method": recipe.method.model_copy(update={"dropout": 0.0})})
            launch = prepare_hardware(recipe, echo=lambda *_: None)
            run = RunDir(Path(workdir) / "run")
            run.root.mkdir(parents=True)
            clock = StepClock()
            session = build_session(recipe, run, launch, echo=lambda *_: None, callbacks=(clock,))
            session.trainer.train()
            results[name] = clock

    eager, compiled = results["eager"], results["compiled"]
    eager_step, compiled_step = steady(eager.times), steady(compiled.times)

    def compile_cost(clock) -> float:
        """Whatever a compiled run spent beyond its steady pace, less the warm-up the eager run spent too."""
        return (sum(clock.times) - len(clock.times) * steady(clock.times)) - (sum(eager.times) - len(eager.times) * eager_step)

    cost = compile_cost(compiled)
    saving = eager_step - compiled_step
    loss_gap = max(abs(a - b) for a, b in zip(eager.losses, compiled.losses))
    print(f"{args.recipe}: {args.steps} steps, precision {launch.precision.mode}, dropout 0")
    print(f"eager step      {eager_step:8.2f} s   (steady; first {eager.times[0]:.1f} s)")
    print(f"compiled step   {compiled_step:8.2f} s   (steady; first {compiled.times[0]:.1f} s)")
    print(f"compile cost    {cost:8.1f} s   (cold cache)")
    if "warm" in results:
        print(f"compile cost    {compile_cost(results['warm']):8.1f} s   (warm cache; steady step {steady(results['warm'].times):.2f} s)")
    print(f"speedup         {eager_step / compiled_step:8.2f}x")
    print(f"pays after      {cost / saving:8.0f} steps" if saving > 0 else "pays after      never (no faster per step)")
    if args.verbose:
        for step, (a, b) in enumerate(zip(eager.times, compiled.times), 1):
            print(f"  step {step:3d}: eager {a:6.2f} s, compiled {b:6.2f} s")
        for step, (a, b) in enumerate(zip(eager.losses, compiled.losses), 1):
            print(f"  logged loss {step:3d}: eager {a:.4f}, compiled {b:.4f}")
    print(f"largest per-step loss difference {loss_gap:.2e} (eager final {eager.losses[-1]:.4f}, compiled {compiled.losses[-1]:.4f})")


if __name__ == "__main__":
    main()
