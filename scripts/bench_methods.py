"""Compare fine-tuning methods: trainable share on the tiny test Llama and on SmolLM2-135M, and
seconds per optimizer step on SmolLM2-135M (fp32, batch 4 x 128 tokens, AdamW, mean of the steps
after one warm-up step); or, with --train, a fair run of each: every method trained through
``ftune train`` on the quickstart task for the same steps and batch, then ``ftune eval`` on the same
held-out rows. Prints a Markdown table; run it on an otherwise idle machine.

Usage::

    python scripts/bench_methods.py                      # every method (~10 min on 2 CPU cores)
    python scripts/bench_methods.py --only lora,prefix   # a subset
    python scripts/bench_methods.py --tiny-only          # trainable shares on the tiny model (seconds)
    python scripts/bench_methods.py --train              # train + eval every method (QLoRA only with --only qlora)
    python scripts/bench_methods.py --train --only lora,mam --steps 2 --eval-rows 4   # a smoke run

--train: each row is the method at its defaults plus the knobs its label names (the CASES section), at
the learning rate of the method's shipped recipe (recipes/smollm2-135m/), all else from
lora-quickstart.yaml (batch 8, cosine, bf16 autocast where fast); one subprocess per method. Step-1
and final loss come from RUN/metrics.jsonl (logged every step), trainable share and s/step (the
training loop's wall time over its steps) from RUN/summary.json, exact match and eval seconds from
RUN/eval/metrics.json. The untuned base is scored once, on the first method's run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes" / "smollm2-135m"
QUICKSTART = RECIPES / "lora-quickstart.yaml"
# (row label, method section, quantization bits, shipped recipe whose learning rate --train uses): each method with
# the knobs its row reports; every other key is the method's default.
CASES = [
    ("full", {"name": "full"}, None, "full.yaml"),
    ("freeze (top 1 layer)", {"name": "freeze", "trainable_layers": 1}, None, "freeze.yaml"),
    ("bitfit", {"name": "bitfit"}, None, "lora-quickstart.yaml"),
    ("lora r16 all-linear", {"name": "lora", "r": 16}, None, "lora-quickstart.yaml"),
    ("dora r16 (lora + dora)", {"name": "lora", "r": 16, "use_dora": True}, None, "lora-quickstart.yaml"),
    ("pissa r16 (lora init)", {"name": "lora", "r": 16, "init": "pissa"}, None, "pissa.yaml"),
    ("qlora r16 (4-bit nf4)", {"name": "lora", "r": 16}, 4, "qlora.yaml"),
    ("adalora 12->8", {"name": "adalora"}, None, "adalora.yaml"),
    ("ia3", {"name": "ia3"}, None, "ia3.yaml"),
    ("loha r8", {"name": "loha"}, None, "loha.yaml"),
    ("lokr r8", {"name": "lokr"}, None, "lokr.yaml"),
    ("oft block 32", {"name": "oft"}, None, "oft.yaml"),
    ("boft block 4", {"name": "boft"}, None, "boft.yaml"),
    ("vera r256", {"name": "vera"}, None, "vera.yaml"),
    ("prefix 20 tokens (through the MLP, gated)", {"name": "prefix"}, None, "prefix.yaml"),
    ("prefix 20 tokens, init tokens", {"name": "prefix", "init": "tokens"}, None, "prefix.yaml"),
    ("prompt 20 tokens", {"name": "prompt"}, None, "prompt.yaml"),
    ("ptuning 20 tokens (mlp)", {"name": "ptuning"}, None, "ptuning.yaml"),
    ("ptuning_v2 20 tokens (init tokens)", {"name": "ptuning_v2"}, None, "ptuning_v2.yaml"),
    ("ptuning_v2 20 tokens, init gated", {"name": "ptuning_v2", "init": "gated"}, None, "ptuning_v2.yaml"),
    ("adapter rf16", {"name": "adapter"}, None, "adapter.yaml"),
    ("adapter parallel rf16", {"name": "adapter", "style": "parallel"}, None, "adapter-parallel.yaml"),
    ("mam", {"name": "mam"}, None, "mam.yaml"),
    ("unipelt", {"name": "unipelt"}, None, "unipelt.yaml"),
]
# Left out of a plain --train (run them with --only): QLoRA's 4-bit matmuls on CPU take several times LoRA's step, so
# the whole table would not fit its budget (30 min on 2 cores), and fewer steps for it would not compare.
TRAIN_ON_REQUEST = {"qlora"}
BATCH, SEQ = 4, 128
SCRATCH: list = []  # the run folders callbacks may write to (AdaLoRA's ranks)


def build_tiny():
    """The tests' tiny Llama (hidden 64, 2 layers, vocab 768, tied embeddings), in memory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=768, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def load_smollm2(bits=None):
    from ftune.model import load_base_model
    from ftune.recipe.schema import ModelConfig, QuantizationConfig

    return load_base_model(ModelConfig(dtype="float32"), QuantizationConfig(bits=bits))


def prepare(base, section: dict):
    """(model, Trainer-style callbacks) or the reason the method does not apply to this model."""
    from ftune.errors import FtuneError
    from ftune.methods import apply_method, method_callbacks
    from ftune.recipe.methods import method_class

    config = method_class(section["name"]).model_validate(section)
    try:
        model = apply_method(base, config, "causal_lm")
    except FtuneError as exc:
        return None, [], str(exc).removeprefix("method: ").split(";")[0].split(" (")[0]
    from ftune.run_dir import RunDir

    SCRATCH.append(tempfile.TemporaryDirectory(prefix="ftune-bench-"))  # removed when the script ends
    return model, method_callbacks(model, config, RunDir(Path(SCRATCH[-1].name))), None


def share(model) -> float:
    from ftune.methods import count_parameters

    trainable, total = count_parameters(model)
    return 100 * trainable / total


def seconds_per_step(model, callbacks, steps: int) -> float:
    import torch

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(100, model.config.vocab_size, (BATCH, SEQ), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    state = SimpleNamespace(max_steps=1000, global_step=0)
    for callback in callbacks:
        callback.on_train_begin(None, state, None)
    model.train()
    times = []
    for step in range(steps + 1):  # step 0 warms up (allocations, lazy init)
        state.global_step = step
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        for callback in callbacks:
            callback.on_optimizer_step(None, state, None)
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return sum(times[1:]) / steps


def row_key(case) -> str:
    """What --only matches: the label's first word (the method name, or dora, pissa, qlora for LoRA's variants)."""
    return case[0].split()[0]


def selected(wanted: set[str], *, train: bool) -> list:
    if wanted:
        return [c for c in CASES if row_key(c) in wanted]
    return [c for c in CASES if not (train and row_key(c) in TRAIN_ON_REQUEST)]


def train_recipe(case, workdir: Path) -> Path:
    """The quickstart recipe with this row's method (and quantization) section, data paths made absolute."""
    import yaml

    label, section, bits, source = case
    raw = yaml.safe_load(QUICKSTART.read_text())
    raw["method"] = dict(section)
    if bits:
        raw["quantization"] = yaml.safe_load((RECIPES / source).read_text()).get("quantization") or {"bits": bits}
    for split in ("train", "eval"):
        raw["data"][split] = str(REPO / raw["data"][split])
    path = workdir / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def learning_rate(case) -> float:
    import yaml

    return float(yaml.safe_load((RECIPES / case[3]).read_text())["training"]["learning_rate"])


def run_cli(args: list[str]) -> str | None:
    """One ftune command in this process, as the console script runs it; None, or the error it stopped with."""
    import contextlib
    import io

    from ftune.cli import main

    errors, argv = io.StringIO(), sys.argv
    sys.argv = ["ftune", *args]  # main() is the console script: its environment settings, then the command
    try:
        with contextlib.redirect_stderr(errors):
            main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    except Exception as exc:  # a crash: the row says so, the other rows still run
        return f"failed: {exc.__class__.__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    finally:
        sys.argv = argv
    if code:
        said = [line for line in errors.getvalue().splitlines() if line.startswith("error: ")]
        return said[0].removeprefix("error: ") if said else f"exit {code}"
    return None


def train_one(case, args) -> dict:
    """Child process: ``ftune train`` then ``ftune eval`` on one row; the figures read back from the run directory."""
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    run = workdir / "run"
    sets = [f"training.max_steps={args.steps}", f"training.batch_size={args.batch}", f"training.learning_rate={learning_rate(case)}",
            "training.logging_steps=1", "training.save_steps=100000", f"output_dir={run}"]
    problem = run_cli(["train", str(train_recipe(case, workdir)), *sum((["--set", item] for item in sets), [])])
    if problem:
        return {"skip": problem}
    summary = json.loads((run / "summary.json").read_text())
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    result = {"share": 100 * summary["trainable_share"], "step_time": summary["wall_time_s"] / summary["steps"],
              "first_loss": losses[0], "final_loss": sum(losses[-5:]) / len(losses[-5:])}
    limit = ["--max-samples", str(args.eval_rows)]
    problem = run_cli(["eval", str(run), *limit])
    if problem:
        return {**result, "skip": f"eval {problem}"}
    scored = json.loads((run / "eval" / "metrics.json").read_text())
    result.update(exact_match=scored["tuned"]["exact_match"], eval_time=scored["wall_time_s"], rows=scored["tuned"].get("samples"))
    if args.base:  # the base once: its time is this second eval's less the tuned model's
        if not (problem := run_cli(["eval", str(run), *limit, "--base"])):
            both = json.loads((run / "eval" / "metrics.json").read_text())
            result.update(base_exact_match=both["base"]["exact_match"], base_eval_time=both["wall_time_s"] - scored["wall_time_s"])
    return result


def train_table(args) -> None:
    """Parent: one child process per row, then the table."""
    cases = selected(set(filter(None, args.only.split(","))), train=True)
    started = time.perf_counter()
    print(f"--train: {QUICKSTART.relative_to(REPO)}, {args.steps} steps x batch {args.batch}, learning rate of each method's "
          f"shipped recipe, {args.eval_rows} held-out rows; load average at start {os.getloadavg()[0]:.2f}", flush=True)
    rows, base = [], None
    with tempfile.TemporaryDirectory(prefix="ftune-bench-") as scratch:
        for index, case in enumerate(cases):
            workdir = Path(args.workdir or scratch) / f"{index:02d}-{row_key(case)}"
            child = [sys.executable, __file__, "--one", str(CASES.index(case)), "--workdir", str(workdir), "--steps", str(args.steps),
                     "--batch", str(args.batch), "--eval-rows", str(args.eval_rows), *(["--base"] if base is None else [])]
            output = subprocess.run(child, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            line = next((line for line in output.stdout.splitlines() if line.startswith("RESULT ")), None)
            result = json.loads(line[len("RESULT "):]) if line else {"skip": "failed: " + (output.stderr.strip().splitlines() or ["?"])[-1][:160]}
            if "base_exact_match" in result:
                base = (result["base_exact_match"], result["base_eval_time"])
            elif base is None and "exact_match" in result:
                base = (float("nan"), float("nan"))  # the base eval failed; do not retry it on every row
            rows.append((case, result, os.getloadavg()[0]))
            print(f"  {case[0]}: {result.get('skip') or 'done'} ({time.perf_counter() - started:.0f} s so far)", file=sys.stderr, flush=True)
            if not args.workdir:
                shutil.rmtree(workdir, ignore_errors=True)  # a full fine-tune's run holds the whole model
    base_em = base[0] if base else float("nan")
    print(f"untuned base: exact match {base_em:.3f}" + (f", eval {base[1]:.1f} s" if base else ""))
    print("| method | learning rate | trainable % | step-1 loss | final loss (last 5 steps) | exact match base -> tuned | s/step | "
          "eval s | load |")
    print("| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |")
    for case, result, load in rows:
        lr = f"{learning_rate(case):g}"
        if "share" not in result:
            reason = result["skip"]
            reason = reason if reason.startswith("failed") else "n/a: " + reason.removeprefix("method: ").split(";")[0]
            print(f"| {case[0]} | {lr} | {reason} | | | | | | {load:.1f} |")
            continue
        match = f"{base_em:.3f} -> {result['exact_match']:.3f}" if "exact_match" in result else result.get("skip", "-")
        eval_time = f"{result['eval_time']:.1f}" if "eval_time" in result else "-"
        print(f"| {case[0]} | {lr} | {result['share']:.4f} | {result['first_loss']:.3f} | {result['final_loss']:.3f} | {match} | "
              f"{result['step_time']:.2f} | {eval_time} | {load:.1f} |")
    print(f"total {time.perf_counter() - started:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated rows by the first word of their label (e.g. lora,dora,prefix,qlora)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps after the warm-up step (default 3); with --train, "
                        "optimizer steps of every run (default 30)")
    parser.add_argument("--tiny-only", action="store_true", help="skip SmolLM2 (shares on the tiny model only)")
    parser.add_argument("--train", action="store_true", help="train and evaluate every method on the quickstart task")
    parser.add_argument("--batch", type=int, default=8, help="--train: examples per optimizer step")
    parser.add_argument("--eval-rows", type=int, default=48, help="--train: held-out rows ftune eval scores (the first N)")
    parser.add_argument("--workdir", help="--train: keep the run directories here (default: a temporary folder, removed)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a --train child: the CASES index
    parser.add_argument("--base", action="store_true", help=argparse.SUPPRESS)  # the child also scores the untuned base
    args = parser.parse_args()

    if args.one is not None:  # nothing heavy imported before ftune's own entry point sets its environment
        print("RESULT " + json.dumps(train_one(CASES[args.one], args)), flush=True)
        return
    if args.train:
        args.steps = 30 if args.steps is None else args.steps
        train_table(args)
        return
    args.steps = 3 if args.steps is None else args.steps

    import torch

    from ftune.recipe.methods import method_class
    from ftune.runtime import quiet_libraries

    quiet_libraries()
    cases = selected(set(filter(None, args.only.split(","))), train=False)
    print(f"torch threads: {torch.get_num_threads()}, load average at start: {os.getloadavg()[0]:.2f}", flush=True)
    # The load column is the 1-minute load average after the row: timings taken beside other jobs
    # on a 2-core machine inflate several-fold, so only rows measured at a load near 1 compare.
    print("| method | tiny Llama trainable % | SmolLM2-135M trainable % | s/step SmolLM2 (fp32, 4x128) | mergeable | load |")
    print("| --- | ---: | ---: | ---: | --- | ---: |")
    for label, section, bits, _ in cases:
        # The tiny model is built in memory, unquantized: 4-bit weights count unpacked, so the share is the same.
        tiny_model, _, tiny_skip = prepare(build_tiny(), section)
        tiny = f"n/a: {tiny_skip}" if tiny_skip else f"{share(tiny_model):.4f}"
        small = speed = "-"
        if not args.tiny_only:
            model, callbacks, skip = prepare(load_smollm2(bits), section)
            if skip:
                small = speed = f"n/a: {skip}"
            else:
                small = f"{share(model):.4f}"
                speed = f"{seconds_per_step(model, callbacks, args.steps):.2f}"
            del model, callbacks
            gc.collect()
        mergeable = "yes" if method_class(section["name"]).mergeable else "no"
        print(f"| {label} | {tiny} | {small} | {speed} | {mergeable} | {os.getloadavg()[0]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
