"""Cost as rows grow: tokens/s and peak memory of ftune's SFT step per row length, against ``ftune plan``'s estimate.

Each (length, gradient checkpointing) point trains a few steps in its own process (so each peak memory is its own)
through ``ftune.training.probe.run_probe``: the session ``ftune train`` builds, from the quickstart recipe (LoRA r16
all-linear, SmolLM2-135M-Instruct, autocast as the machine resolves it) with ``data.max_length`` set to the length.
The rows are generated to fill it: a prompt of about a quarter of the length and an answer that runs past the end
(truncation cuts it), so ~70% of a row's positions carry a target (the table prints the measured share). Peak
memory is the process's peak RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA; the plan is
``estimate_memory`` (what ``ftune plan`` calls) at the precision the run resolved. Past the table: a least-squares
line through the checkpointed peaks (MiB per 1k tokens, intercept) and the largest distance of a point from it.

Usage::

    python scripts/bench_lengths.py [--lengths 256,1024,2048,4096] [--steps 3] [--batch 1] [--model NAME]
                                    [--checkpointing on,off] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the time of day river stone light market paper window morning garden letter number table city road water "
         "history music family summer winter station report system answer question island mountain village").split()


def write_rows(path: Path, length: int, rows: int, seed: int = 0) -> None:
    """Alpaca rows whose prompt is ~length/4 words and whose answer alone is longer than ``length`` tokens."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as out:
        for _ in range(rows):
            prompt = " ".join(rng.choice(WORDS) for _ in range(max(8, length // 5)))
            answer = " ".join(rng.choice(WORDS) for _ in range(length + 16))
            out.write(json.dumps({"instruction": "Continue the text.", "input": prompt, "output": answer}) + "\n")


def run_point(args) -> dict:
    """One point, in this process: train ``args.steps`` steps and measure them."""
    from ftune.recipe import load_recipe
    from ftune.training.layout import read_model_config
    from ftune.training.plan import estimate_memory
    from ftune.training.probe import run_probe

    recipe = load_recipe(args.recipe, args.point_overrides)
    result = run_probe(recipe, args.steps, echo=lambda line: print(line, file=sys.stderr))
    from ftune.hardware import resolve_precision  # what prepare_hardware resolved inside the probe

    precision = resolve_precision(recipe.training.mixed_precision).mode
    plan = estimate_memory(recipe, read_model_config(recipe), device=result.device, precision=precision)
    return {"tokens_per_s": result.tokens_per_second, "peak_mib": result.peak_mib, "plan_mib": plan.total_mib,
            "precision": precision, "device": result.device, "answer_share": answer_share(recipe)}


def answer_share(recipe) -> float:
    """Share of the first training row's positions that carry a target, tokenized as ftune does."""
    from ftune.model import load_tokenizer
    from ftune.training.sft import build_sft_splits

    row = build_sft_splits(recipe, load_tokenizer(recipe.model)).train[0]
    labels = list(row["labels"])
    return sum(label != -100 for label in labels) / len(labels)


def overrides(args, length: int, checkpointing: bool, data: Path) -> list[str]:
    held_out = data.with_suffix(".eval.jsonl")
    sets = [f"data.max_length={length}", f"data.train={data}", f"data.eval={held_out}", f"training.batch_size={args.batch}",
            "training.gradient_accumulation_steps=1", f"training.gradient_checkpointing={str(checkpointing).lower()}",
            "training.save_steps=100000", "training.logging_steps=1000", f"training.max_steps={args.steps}"]
    if args.model:
        sets.append(f"model.name_or_path={args.model}")
    return sets + list(args.set)


def linear_fit(points: list[tuple[int, float]]) -> tuple[float, float, float]:
    """Slope (MiB per 1k tokens), intercept (MiB) and the largest |point - line| (MiB) of a least-squares line."""
    n = len(points)
    mean_x, mean_y = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / spread if spread else 0.0
    intercept = mean_y - slope * mean_x
    return slope * 1000, intercept, max(abs(y - (intercept + slope * x)) for x, y in points)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="256,1024,2048,4096")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--model", default=None, help="model.name_or_path (default: the recipe's, SmolLM2-135M-Instruct)")
    parser.add_argument("--recipe", default=str(ROOT / "recipes/smollm2-135m/lora-quickstart.yaml"))
    parser.add_argument("--checkpointing", default="on,off", help="on, off or on,off")
    parser.add_argument("--set", action="append", default=[], help="more recipe overrides, key=value")
    parser.add_argument("--point", help=argparse.SUPPRESS)  # internal: run one point, print its JSON
    args = parser.parse_args()
    if args.point:
        args.point_overrides = json.loads(args.point)
        print("POINT " + json.dumps(run_point(args)))
        return 0
    try:
        lengths = [int(part) for part in args.lengths.split(",")]
        modes = [{"on": True, "off": False}[part.strip()] for part in args.checkpointing.split(",")]
    except (ValueError, KeyError):
        print(f"error: --lengths takes integers (got {args.lengths!r}); --checkpointing takes on, off or on,off", file=sys.stderr)
        return 2
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-lengths-") as work:
        for length in lengths:
            data = Path(work) / f"rows-{length}.jsonl"
            write_rows(data, length, rows=args.batch * (args.steps + 1))
            write_rows(data.with_suffix(".eval.jsonl"), length, rows=2, seed=1)
            for checkpointing in modes:
                sets = overrides(args, length, checkpointing, data) + [f"output_dir={work}/run"]
                command = [sys.executable, __file__, "--steps", str(args.steps), "--recipe", args.recipe, "--point", json.dumps(sets)]
                done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
                line = next((row for row in done.stdout.splitlines() if row.startswith("POINT ")), None)
                if line is None:
                    print(f"error: length {length}, checkpointing {checkpointing} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
                    return 1
                results.append({"length": length, "checkpointing": checkpointing, **json.loads(line[6:])})
                print(f"done: {results[-1]}", file=sys.stderr, flush=True)
    first = results[0]
    print(f"\nBatch {args.batch}, {args.steps} steps, {first['device']}, autocast {first['precision']}, LoRA r16 all-linear\n")
    print("| length | checkpointing | answer share | tokens/s | peak MiB | plan MiB | plan error |")
    print("|---:|:---:|---:|---:|---:|---:|---:|")
    for r in results:
        error = 100 * (r["plan_mib"] - r["peak_mib"]) / r["peak_mib"]
        print(f"| {r['length']} | {'on' if r['checkpointing'] else 'off'} | {100 * r['answer_share']:.0f}% | {r['tokens_per_s']:,.0f} | "
              f"{r['peak_mib']:,.0f} | {r['plan_mib']:,.0f} | {error:+.1f}% |")
    checkpointed = [(r["length"], r["peak_mib"]) for r in results if r["checkpointing"]]
    if len(checkpointed) >= 2:
        slope, intercept, deviation = linear_fit(checkpointed)
        bend = max(checkpointed, key=lambda p: abs(p[1] - (intercept + slope * p[0] / 1000)))
        print(f"\nWith checkpointing, peak = {intercept:,.0f} MiB + {slope:,.1f} MiB per 1k tokens; largest deviation from the line "
              f"{deviation:,.0f} MiB ({100 * deviation / bend[1]:.1f}% of the peak), at length {bend[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
