"""Kill ``ftune train`` with SIGKILL and prove that ``--resume`` loses nothing.

    python scripts/fault_check.py RECIPE [--runs 10] [--set KEY=VALUE ...]

Trains RECIPE once without interruption (the reference), then ``--runs`` times: starts the same
recipe in a fresh output directory, SIGKILLs it at a random moment, and resumes it (sometimes
killing the resumed process too) until it completes. Each finished run is compared with the
reference: the per-step loss curve, the final model/adapter tensors and the summary's figures
must be identical. Prints ``N/N runs identical after K kills`` and exits 1 if any differs.

``--inject POINT`` instead runs ``ftune train`` in this process and SIGKILLs it at a deterministic
point: model_load, between_steps, mid_step, mid_checkpoint, after_last_step or final_eval (``--at STEP``
picks the step where that applies). The test suite installs the same faults in forked processes, and in
one rank of a multi-process launch through ``rank_fault_environment`` (a generated ``sitecustomize`` that
reads ``FTUNE_RANK_FAULT=POINT:STEP:RANK``).

``--nproc 2`` instead launches ``ftune train --nproc 2`` and SIGKILLs one random rank per killed launch,
mid-step (from outside, at a random moment of the training) or mid-save (inside a random coming checkpoint
save); each killed launch must end non-zero with one line naming that rank, no traceback and the run lock
released; the resumed run is compared with an uninterrupted two-process run as above.

``--disk-fault full_disk`` instead lowers the process's file-size limit (RLIMIT_FSIZE, a real EFBIG from
the kernel) at a random step to a random size below the largest checkpoint file, expects the one-line
error (exit 2, no traceback) and resumes without the limit; ``--disk-fault damaged_checkpoint`` kills a
run after its first checkpoints, truncates or corrupts a random file of the newest one, and expects the
resume to name that file and continue from the previous one. Both compare the result as above.
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
POINTS = ("model_load", "between_steps", "mid_step", "mid_checkpoint", "after_last_step", "final_eval", "file_size_limit")


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
    elif point == "mid_step":
        # Inside step ``step``, before its forward: the other processes of a multi-process run wait for this
        # one's gradients in the step's all-reduce.
        train_step = transformers.Trainer.training_step

        def step_or_die(self, *args, **kwargs):
            if self.state.global_step + 1 == step:
                die()
            return train_step(self, *args, **kwargs)

        transformers.Trainer.training_step = step_or_die
    elif point == "mid_checkpoint" and os.environ.get("RANK", "0") != "0":
        # A rank other than 0 writes only its RNG state into a checkpoint: die before it.
        save_rng = transformers.Trainer._save_rng_state

        def save_rng_or_die(self, output_dir):
            if Path(output_dir).name == f"checkpoint-{step}":
                die()
            return save_rng(self, output_dir)

        transformers.Trainer._save_rng_state = save_rng_or_die
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
    elif point == "file_size_limit":
        limit_file_size_at(step)
    else:
        raise SystemExit(f"unknown --inject point {point!r}; expected one of {', '.join(POINTS)}")


RANK_FAULT = "FTUNE_RANK_FAULT"  # POINT:STEP:RANK, read only by the sitecustomize module rank_fault_environment writes
RANK_FAULT_HOOK = """\
\"\"\"Written by scripts/fault_check.py: the process whose RANK is the last field of FTUNE_RANK_FAULT installs that fault.\"\"\"
import os

point, step, rank = os.environ.get("FTUNE_RANK_FAULT", "::").split(":")
if os.environ.get("RANK") == rank:
    import importlib.util
    import signal
    import time

    spec = importlib.util.spec_from_file_location("fault_check", {script!r})
    fault_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fault_check)

    def die_noted():
        with open({mark!r}, "w") as note:
            note.write(repr(time.time()))
        os.kill(os.getpid(), signal.SIGKILL)

    fault_check.die = die_noted
    fault_check.install_fault(point, int(step))
"""


def rank_fault_environment(point: str, step: int, rank: int, folder: Path) -> dict:
    """The environment under which the process of rank ``rank`` of ``ftune train --nproc N`` (or torchrun) SIGKILLs
    itself at ``point`` (as ``install_fault``) and writes the moment to ``folder/killed``: a ``sitecustomize`` module
    in ``folder``, put first on PYTHONPATH, installs the fault in that process alone, so ftune carries no test hook."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(RANK_FAULT_HOOK.format(script=str(Path(__file__).resolve()), mark=str(folder / "killed")))
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, RANK_FAULT: f"{point}:{step}:{rank}"}


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


def limit_file_size_at(step: int) -> None:
    """From the end of ``step`` (at once when ``step`` <= 0), cap this process's files at $FTUNE_FAULT_FILE_SIZE bytes:
    every write past it fails with EFBIG, as on a full disk, whatever the writer (torch.save, safetensors, Python)."""
    import resource

    import transformers

    import ftune.training.session as session

    limit = int(os.environ.get("FTUNE_FAULT_FILE_SIZE", 64 * 1024))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill, whatever ftune itself sets

    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    if step <= 0:
        lower()
        return
    build = session.build_trainer

    class Limit(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                lower()

    def with_limit(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.add_callback(Limit())
        return trainer

    session.build_trainer = with_limit


def disk_fault_command(recipe: Path, output_dir: Path, overrides: list[str], point: str, step: int) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), str(recipe), "--inject", point, "--at", str(step),
            *[a for item in [f"output_dir={output_dir}", *overrides] for a in ("--set", item)]]


def logged_steps(run: Path) -> int:
    return max(json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines())


def full_disk_run(recipe: Path, run_dir: Path, overrides: list[str], rng: random.Random, reference_dir: Path) -> list[str]:
    """Fail a write with EFBIG from a random step on, check the one line, resume without the limit; problems found."""
    largest = max(p.stat().st_size for p in (reference_dir / "checkpoints").rglob("*") if p.is_file())
    step, limit = rng.randint(1, logged_steps(reference_dir)), rng.randint(4096, largest - 1)
    failed = subprocess.run(disk_fault_command(recipe, run_dir, overrides, "file_size_limit", step), cwd=ROOT, text=True,
                            capture_output=True, env={**os.environ, "FTUNE_FAULT_FILE_SIZE": str(limit)})
    lines = [line for line in failed.stderr.splitlines() if line.startswith("error:")]  # libraries may log warnings too
    print(f"  file-size limit {limit} bytes from step {step}: exit {failed.returncode}, {lines[-1] if lines else 'no error line'}", flush=True)
    if failed.returncode != 2 or len(lines) != 1 or "Traceback" in failed.stderr or not lines[0].startswith("error: cannot write") \
            or "--resume" not in lines[0]:
        return [f"expected exit 2 and one error line, got exit {failed.returncode}: {failed.stderr[-2000:]}"]
    if any(not (p / "ftune-complete").is_file() for p in (run_dir / "checkpoints").glob("checkpoint-*")):
        return ["a partial checkpoint was left behind"]
    return resumed(recipe, run_dir, overrides, reference_dir)


def damaged_checkpoint_run(recipe: Path, run_dir: Path, overrides: list[str], rng: random.Random, reference_dir: Path) -> list[str]:
    """Kill a run after a few checkpoints, truncate or corrupt a file of the newest one, resume; problems found."""
    newest = max((reference_dir / "checkpoints").glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[-1]))
    first_save = json.loads(newest.read_text())["save_steps"]  # killed after it, so there is a checkpoint to damage
    subprocess.run(disk_fault_command(recipe, run_dir, overrides, "between_steps", rng.randint(first_save + 1, logged_steps(reference_dir))),
                   cwd=ROOT, capture_output=True)
    complete = sorted((p for p in (run_dir / "checkpoints").glob("checkpoint-*") if (p / "ftune-complete").is_file()),
                      key=lambda p: int(p.name.split("-")[-1]))
    if not complete:
        print("  killed before the first checkpoint; nothing to damage", flush=True)
        return resumed(recipe, run_dir, overrides, reference_dir)
    newest = complete[-1]
    victim = rng.choice(sorted(p for p in newest.rglob("*") if p.is_file() and p.name != "ftune-complete"))
    data = bytearray(victim.read_bytes())
    if rng.random() < 0.5 or not data:
        data, how = data[: rng.randrange(len(data))] if data else bytearray(b"x"), "truncated"
    else:
        data[rng.randrange(len(data))] ^= 0xFF
        how = "corrupted"
    victim.write_bytes(bytes(data))
    name = victim.relative_to(newest).as_posix()
    print(f"  {how} {newest.name}/{name}", flush=True)
    return resumed(recipe, run_dir, overrides, reference_dir, expect=f"Skipping {newest.name}: {name} is damaged")


def resumed(recipe: Path, run_dir: Path, overrides: list[str], reference_dir: Path, *, expect: str | None = None) -> list[str]:
    done = subprocess.run(train_command(recipe, run_dir, overrides, resume=True), cwd=ROOT, text=True, capture_output=True)
    if done.returncode != 0:
        return [f"--resume failed: {done.stderr[-2000:]}"]
    if expect is not None and expect not in done.stdout:
        return [f"--resume did not say {expect!r}: {done.stdout[-2000:]}"]
    return identical(outcome(reference_dir), outcome(run_dir))


DISK_FAULTS = {"full_disk": full_disk_run, "damaged_checkpoint": damaged_checkpoint_run}


def disk_fault_check(args) -> int:
    """``--runs`` runs of ``args.disk_fault``, each in a fresh output directory and compared with an uninterrupted run."""
    rng = random.Random(args.seed)
    scratch = Path(tempfile.mkdtemp(prefix="ftune-fault-check-"))
    try:
        reference_dir = scratch / "reference"
        subprocess.run(train_command(args.recipe, reference_dir, args.overrides, resume=False), cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        same = 0
        for index in range(args.runs):
            run_dir = scratch / f"run-{index}"
            print(f"run {index}: {args.disk_fault}", flush=True)
            problems = DISK_FAULTS[args.disk_fault](args.recipe, run_dir, args.overrides, rng, reference_dir)
            same += report_run(index, problems, "after resuming")
            shutil.rmtree(run_dir, ignore_errors=True)
        print(f"{same}/{args.runs} {args.disk_fault} runs resumed identically")
        return 0 if same == args.runs else 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def report_run(index: int, problems: list[str], how: str) -> bool:
    """Print whether run ``index`` ended identical to the reference (and why not); True when it did."""
    print(f"run {index}: {'identical' if not problems else 'DIFFERENT'} {how}", flush=True)
    for problem in problems:
        print(f"run {index}: {problem}", file=sys.stderr)
    return not problems


def rank_pids(launcher: int) -> dict[int, int]:
    """The processes ``launcher`` started, by their RANK (read from /proc)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != launcher:
                continue
            environ = (stat.parent / "environ").read_bytes().decode(errors="replace").split("\0")
            found[int(dict(item.split("=", 1) for item in environ if "=" in item)["RANK"])] = int(stat.parent.name)
        except (OSError, KeyError, ValueError, IndexError):
            continue
    return found


def progress(run_dir: Path, reference_dir: Path) -> tuple[int, int, list[int]]:
    """(step of ``run_dir``'s last complete checkpoint, the reference's last step, the checkpoint steps still to save)."""
    state = json.loads(next((reference_dir / "checkpoints").glob("checkpoint-*/trainer_state.json")).read_text())
    saves = {*range(state["save_steps"], state["max_steps"] + 1, state["save_steps"]), state["max_steps"]}
    done = max((int(p.parent.name.split("-")[-1]) for p in run_dir.glob("checkpoints/checkpoint-*/ftune-complete")), default=0)
    return done, state["max_steps"], sorted(step for step in saves if step > done)


def training_begun(run_dir: Path, since: float, done: int) -> bool:
    """Whether a launch started at ``since`` has logged a step past the checkpoint it resumed (``done``)."""
    metrics = run_dir / "metrics.jsonl"
    try:
        return metrics.stat().st_mtime >= since and any(json.loads(line).get("step", 0) > done for line in metrics.read_text().splitlines() if line)
    except (OSError, ValueError):
        return False


def rank_kill_launch(args, run_dir: Path, rng: random.Random, span: float, scratch: Path, kills: int) -> dict:
    """One ``ftune train --nproc`` launch (``--resume`` once the run exists) in which a random rank may be SIGKILLed:
    ``step`` from outside at a random moment after its training has begun (``span``: the reference's seconds from its
    first step to its end), ``save`` inside a random coming checkpoint save. Returns the kind (None: not killed), the
    rank, the seconds from the kill to the launch's end, and the problems seen: a killed launch must end non-zero with
    one line naming that rank, no traceback, no lock left. ``kills``: the run's kills so far (the first launch is killed)."""
    kind = rng.choice(("step", "save")) if kills < args.max_kills and (kills == 0 or rng.random() < 0.5) else None
    rank, (done, last, saves) = rng.randrange(args.nproc), progress(run_dir, args.reference_dir)
    kind = "step" if kind == "save" and not saves else kind
    hook = scratch / f"hook-{time.time_ns()}"
    env = rank_fault_environment("mid_checkpoint", rng.choice(saves), rank, hook) if kind == "save" else dict(os.environ)
    command = train_command(args.recipe, run_dir, args.overrides, resume=(run_dir / "recipe.yaml").is_file()) + ["--nproc", str(args.nproc)]
    delay, begun, killed_at = rng.uniform(0, 0.9 * span * (last - done) / last), None, None
    with tempfile.TemporaryFile("w+") as stderr:
        started = time.time()
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        while process.poll() is None:
            if kind == "step" and killed_at is None:
                begun = begun or (time.time() if training_begun(run_dir, started, done) else None)
                if begun and time.time() - begun >= delay and rank in (pids := rank_pids(process.pid)):
                    os.kill(pids[rank], signal.SIGKILL)
                    killed_at = time.time()
            time.sleep(0.02)
        ended = time.time()
        stderr.seek(0)
        text = stderr.read()
    killed_at = float((hook / "killed").read_text()) if (hook / "killed").is_file() else killed_at
    if killed_at is None:
        return {"kind": None, "problems": [] if process.returncode == 0 else [f"failed without a kill: {text[-2000:]}"]}
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    problems = [] if process.returncode else ["exit 0 after a kill"]
    if len(errors) != 1 or not errors[0].startswith(f"error: rank {rank} of {args.nproc} ") or "SIGKILL" not in errors[0]:
        problems.append(f"expected one line naming rank {rank}, got {errors}")
    problems += ["a traceback was printed"] * ("Traceback" in text) + ["the run lock was left"] * (run_dir / ".ftune.lock").exists()
    return {"kind": kind, "rank": rank, "exit_s": ended - killed_at, "problems": problems}


def rank_kill_check(args) -> int:
    """``--runs`` runs of ``--nproc`` processes with ranks SIGKILLed mid-step and mid-save, resumed until complete, each
    compared with an uninterrupted launch of the same processes."""
    rng = random.Random(args.seed)
    scratch = Path(tempfile.mkdtemp(prefix="ftune-fault-check-"))
    try:
        args.reference_dir = scratch / "reference"
        started = time.time()
        process = subprocess.Popen(train_command(args.recipe, args.reference_dir, args.overrides, resume=False) + ["--nproc", str(args.nproc)],
                                   cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not (args.reference_dir / "metrics.jsonl").is_file() and process.poll() is None:
            time.sleep(0.02)
        training = time.time() - started
        if process.wait() != 0:
            raise SystemExit("the uninterrupted launch failed")
        span, reference = time.time() - started - training, outcome(args.reference_dir)
        counts, exits, same, clean = {"step": 0, "save": 0}, [], 0, 0
        for index in range(args.runs):
            run_dir, problems, kinds = scratch / f"run-{index}", [], []
            while True:
                launch = rank_kill_launch(args, run_dir, rng, span, scratch, len(kinds))
                problems += launch["problems"]
                if launch["kind"] is None:
                    break
                counts[launch["kind"]] += 1
                exits.append(launch["exit_s"])
                clean += not launch["problems"]
                kinds.append(f"{launch['kind']} on rank {launch['rank']}, ended {launch['exit_s']:.1f} s later")
            problems += identical(reference, outcome(run_dir)) if (run_dir / "summary.json").is_file() else ["never completed"]
            same += report_run(index, problems, f"after {len(kinds)} kill(s): {'; '.join(kinds)}")
            shutil.rmtree(run_dir, ignore_errors=True)
        kills = sum(counts.values())
        print(f"{same}/{args.runs} runs of {args.nproc} processes identical after {kills} kills ({counts['step']} mid-step, "
              f"{counts['save']} mid-save); {clean}/{kills} killed launches ended with one line naming the rank, "
              f"no traceback and the lock released; slowest end after a kill {max(exits, default=0):.1f} s")
        return 0 if same == args.runs and clean == kills else 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


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
    parser.add_argument("--disk-fault", choices=tuple(DISK_FAULTS), help="full_disk or damaged_checkpoint runs instead of SIGKILLs")
    parser.add_argument("--nproc", type=int, default=1, help="with 2 or more: launch that many processes and SIGKILL one rank")
    args = parser.parse_args(argv)

    if args.inject:
        install_fault(args.inject, args.at)
        from ftune.cli import main as cli

        sys.argv = ["ftune", "train", str(args.recipe), *[a for item in args.overrides for a in ("--set", item)], *(["--resume"] if args.resume else [])]
        cli()
        return 0
    if args.disk_fault:
        return disk_fault_check(args)
    if args.nproc > 1:
        return rank_kill_check(args)

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
            same += report_run(index, problems, f"after {run_kills} kill(s)")
            shutil.rmtree(run_dir, ignore_errors=True)
        print(f"{same}/{args.runs} runs identical after {kills} kills")
        return 0 if same == args.runs else 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
