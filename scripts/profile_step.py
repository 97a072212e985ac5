"""Where a training step's time goes: torch's profiler over a few ftune training steps, top operators by self time.

Builds the recipe's trainer exactly as ftune train does (data, model, method, collator, loss) and profiles its own
training loop for ``--steps`` optimizer steps after ``--warmup``; prints the operators with the most self time. Run
it on an idle machine.

Usage::

    python scripts/profile_step.py [--recipe recipes/smollm2-135m/lora-quickstart.yaml] [--steps 3] [--top 20]
                                   [--shapes]

``--shapes`` splits each operator by its input shapes (e.g. the base projections' GEMMs from the adapters').
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/smollm2-135m/lora-quickstart.yaml")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--shapes", action="store_true", help="one row per operator and input shapes")
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    from ftune.recipe import load_recipe
    from ftune.run_dir import RunDir
    from ftune.runtime import quiet_libraries
    from ftune.training.session import build_session, prepare_hardware

    class Window(TrainerCallback):
        """Profile the optimizer steps after the warm-up ones."""

        def __init__(self):
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.profiler = profile(activities=activities, record_shapes=args.shapes)

        def on_step_end(self, train_args, state, control, **kwargs):
            if state.global_step == args.warmup:
                self.profiler.__enter__()
            if state.global_step == args.warmup + args.steps:
                self.profiler.__exit__(None, None, None)

    quiet_libraries()
    with tempfile.TemporaryDirectory() as workdir:
        recipe = load_recipe(args.recipe, [f"training.max_steps={args.warmup + args.steps}", "training.save_steps=100000",
                                           f"output_dir={workdir}/run"])
        launch = prepare_hardware(recipe, echo=lambda *_: None)
        run = RunDir(Path(workdir) / "run")
        run.root.mkdir(parents=True)
        window = Window()
        session = build_session(recipe, run, launch, echo=lambda *_: None, callbacks=(window,))
        session.trainer.train()
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(f"{args.recipe}: {args.steps} profiled steps after {args.warmup}, precision {launch.precision.mode}")
    averages = window.profiler.key_averages(group_by_input_shape=args.shapes)
    print(averages.table(sort_by=sort, row_limit=args.top, max_name_column_width=48, max_shapes_column_width=60))


if __name__ == "__main__":
    main()
