"""Kill ``ftune train`` with SIGKILL and prove that ``--resume`` loses nothing.

    python scripts/fault_check.py RECIPE [--runs 10] [--set KEY=VALUE ...]

Trains RECIPE once without interruption (the reference), then ``--runs`` times: starts the same
recipe in a fresh output directory, SIGKILLs it at a random moment, and resumes it (sometimes
killing the resumed process too) until it completes. Each finished run is compared with the
reference: the per-step loss curve, the final model/adapter tensors and the summary's figures
must be identical. Prints ``N/N runs identical after K kills`` and exits 1 if any differs.

``--inject POINT`` instead runs ``ftune train`` in this process and SIGKILLs it at a deterministic
point: model_load, between_steps, mid_checkpoint, after_last_step or final_eval (``--at STEP`` picks
the step where that applies). The test suite installs the same faults in forked processes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's ftune, also when another one is installed
COMPARED = ("train_loss", "eval_loss", "steps", "epochs", "tokens_seen", "trainable_params", "total_params")
POINTS = ("model_load", "between_steps", "mid_checkpoint", "after_last_step", "final_eval")


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install_fault(point: str, step: int) -> None:
    """Patch ftune/transformers so this process SIGKILLs itself at ``point``."""
    import transformers

    import ftune.training.session as session

    if point == "model_load":
        session.load_base_model = lambda *args, **kwargs: die()
    elif point in ("between_steps", "after_last_step"):
        build = session.build_trainer

        class Kill(transformers.TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if point == "between_steps" and state.global_step == step:
                    die()

            def on_train_end(self, args, state, control, **kwargs):
                if point == "after_last_step":
                    die()

        def with_kill(*args, **kwargs):
            trainer = build(*args, **kwargs)
            trainer.add_callback(Kill())
            return trainer

        session.build_trainer = with_kill
    elif point == "mid_checkpoint":
        # The Trainer writes trainer_state.json after the weights and optimizer: dying right
        # before it leaves a checkpoint folder that looks plausible but cannot be resumed.
        save = transformers.TrainerState.save_to_json

        def save_then_maybe_die(self, json_path):
            if Path(json_path).parent.name == f"checkpoint-{step}":
                die()
            return save(self, json_path)

        transformers.TrainerState.save_to_json = save_then_maybe_die
    elif point == "final_eval":
        transformers.Trainer.evaluate = lambda self, *args, **kwargs: die()
    else:
        raise SystemExit(f"unknown --inject point {point!r}; expected one of {', '.join(POINTS)}")


def train_command(recipe: Path, output_dir: Path, overrides: list[str], *, resume: bool) -> list[str]:
    command = [sys.executable, "-m", "ftune", "train", str(recipe), "--set", f"output_dir={output_dir}"]
    for item in overrides:
        command += ["--set", item]
    return command + (["--resume"] if resume else [])


def outcome(run: Path) -> dict:
    """What must be identical between an interrupted and an uninterrupted run."""
    from safetensors.torch import load_file

    curve = {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r}
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    summary = json.loads((run / "summary.json").read_text())
    tensors = {}
    for file in sorted((run / "model").glob("*.safetensors")):
        tensors.update({f"{file.name}:{k}": v for k, v in load_file(file).items()})
    return {"curve": curve, "steps_logged_once": len(steps) == len(set(steps)), "summary": {k: summary.get(k) for k in COMPARED}, "tensors": tensors}


def identical(a: dict, b: dict) -> list[str]:
    """Differences between two outcomes, one line each (empty when identical)."""
    import torch

    problems = []
    if a["curve"] != b["curve"]:
        problems.append(f"loss curves differ: {a['curve']} vs {b['curve']}")
    if not b["steps_logged_once"]:
        problems.append("metrics.jsonl logs a step more than once")
    if a["summary"] != b["summary"]:
        problems.append(f"summaries differ: {a['summary']} vs {b['summary']}")
    if a["tensors"].keys() != b["tensors"].keys() or any(not torch.equal(a["tensors"][k], b["tensors"][k]) for k in a["tensors"]):
        problems.append("final weights differ")
    return problems


def run_until_complete(recipe: Path, output_dir: Path, overrides: list[str], rng: random.Random, horizon: float, max_kills: int) -> int:
    """Start, kill at random moments, resume until done; returns the number of kills."""
    kills, resume = 0, False
    while True:
        process = subprocess.Popen(train_command(recipe, output_dir, overrides, resume=resume), cwd=ROOT,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        # Within the first 80% of an uninterrupted run's time, so a kill lands before the run can finish.
        kill_at = rng.uniform(0.5, 0.8 * horizon) if kills < max_kills and (kills == 0 or rng.random() < 0.5) else None
        try:
            process.wait(timeout=kill_at)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
            kills += 1
            resume = (output_dir / "recipe.yaml").is_file()
            continue
        if process.returncode != 0:
            raise SystemExit(f"ftune train failed after {kills} kills: {process.stderr.read().strip()}")
        return kills


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--runs", type=int, default=10, help="interrupted runs to compare with the reference")
    parser.add_argument("--max-kills", type=int, default=3, help="most kills per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override, as ftune train --set")
    parser.add_argument("--inject", choices=POINTS, help="run ftune train here and die at this point")
    parser.add_argument("--at", type=int, default=1, help="step for between_steps / mid_checkpoint")
    parser.add_argument("--resume", action="store_true", help="with --inject: pass --resume")
    args = parser.parse_args(argv)

    if args.inject:
        install_fault(args.inject, args.at)
        from ftune.cli import main as cli

        sys.argv = ["ftune", "train", str(args.recipe), *[a for item in args.overrides for a in ("--set", item)], *(["--resume"] if args.resume else [])]
        cli()
        return 0

    rng = random.Random(args.seed)
    scratch = Path(tempfile.mkdtemp(prefix="ftune-fault-check-"))
    try:
        clock = time.perf_counter()
        reference_dir = scratch / "reference"
        subprocess.run(train_command(args.recipe, reference_dir, args.overrides, resume=False), cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        horizon = time.perf_counter() - clock
        reference = outcome(reference_dir)
        same, kills = 0, 0
        for index in range(args.runs):
            run_dir = scratch / f"run-{index}"
            run_kills = run_until_complete(args.recipe, run_dir, args.overrides, rng, horizon, args.max_kills)
            kills += run_kills
            problems = identical(reference, outcome(run_dir))
            same += not problems
            print(f"run {index}: {'identical' if not problems else 'DIFFERENT'} after {run_kills} kill(s)", flush=True)
            for problem in problems:
                print(f"run {index}: {problem}", file=sys.stderr)
            shutil.rmtree(run_dir, ignore_errors=True)
        print(f"{same}/{args.runs} runs identical after {kills} kills")
        return 0 if same == args.runs else 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
