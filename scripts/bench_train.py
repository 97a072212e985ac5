"""ftune train against the plain transformers Trainer + peft and TRL's SFTTrainer, side by side, in one invocation.

Five runs on the same model, rows, LoRA settings, precision, batch, learning rate and optimizer steps, each in its own
process (so each peak memory is its own):

  a. the tutorial script: transformers Trainer + peft, rows padded to max_length
  b. the same with dynamic padding (DataCollatorForSeq2Seq)
  c. ftune train
  d. TRL SFTTrainer, packing=True (best-fit decreasing packing, padding-free, completion-only loss)
  e. TRL SFTTrainer, packing=False (dynamic padding, completion-only loss)

a and b train on ftune's own tokenized rows (same tokens, same answer-only labels), so only the batching and the
loss differ. d and e get the same conversations as prompt/completion messages, which TRL tokenizes with the same chat
template and trains on the completion only. A TRL packed batch holds ``batch`` sequences of up to max_length tokens,
each packing several rows, so d sees more rows in the same steps (its own semantics; compare tokens/s). Every run's
held-out loss is computed the same way afterwards (mean over answer tokens of the eval rows).

Datasets (``--dataset``, default both): quickstart (data/quickstart: one instruction shared by every row, ~70 tokens,
the recipe's max_length 128) and longtail (data/longtail: prompts that share only the system prompt, long-tailed
lengths up to ~940 tokens, max_length 1024). One table per dataset.

Real tokens are the examples' own (padding left out; a prompt prefix ftune computes once per batch still counts in
every example). Computed tokens are the positions each model ran: padding in, a shared prefix once (padding-free
packing: computed = real). The machine's GEMM peak in the dtype used is measured first, in this invocation; achieved
FLOP/s counts 4 x parameters per computed token for LoRA (forward, backward through the activations) and 6 x for full
fine-tuning, the LM head's share only at the positions it ran: every one in a and b, the labelled ones in c (estimated
from the share of labelled positions in the training rows), d and e (TRL's fused LM head). Run it on an idle machine.

Variants (``--liger``: Liger kernels in every run, else none in any; ``--attn``: the attention kernel of every run,
flash_attention_2 with bfloat16 weights) that this machine cannot run are skipped with one line.

Usage::

    python scripts/bench_train.py [--dataset quickstart|longtail|both] [--runs abcde] [--steps 20] [--liger]
                                  [--attn auto|sdpa|flash_attention_2] [--recipe recipes/smollm2-135m/lora-quickstart.yaml]
                                  [--model NAME] [--data TRAIN.jsonl] [--method lora|full] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = {"a": "Trainer, padded to max_length", "b": "Trainer, dynamic padding", "c": "ftune train",
        "d": "TRL SFTTrainer, packing=True", "e": "TRL SFTTrainer, packing=False"}
DATASETS = {
    "quickstart": [],  # the recipe's own data and max_length
    "longtail": ["data.train=data/longtail/train.jsonl", "data.eval=data/longtail/eval.jsonl", "data.max_length=1024"],
}


def overrides(args) -> list[str]:
    # Without --liger every run goes without: ftune's kernels: auto would take Liger on CUDA where the others do not.
    # Flash attention has no float32 path, so --attn flash_attention_2 loads bfloat16 weights (pair it with
    # --set model.dtype=bfloat16 on sdpa). A user's --set comes last and wins.
    sets = [*DATASETS.get(args.dataset, []), f"training.max_steps={args.steps}", "training.save_steps=100000",
            "training.logging_steps=5", f"output_dir={args.workdir}/ftune-run", f"training.kernels={'liger' if args.liger else 'none'}"]
    if args.attn:
        sets.append(f"model.attn_implementation={args.attn}")
    if args.attn == "flash_attention_2":
        sets.append("model.dtype=bfloat16")
    if args.model:
        sets.append(f"model.name_or_path={args.model}")
    if args.data:
        sets.append(f"data.train={args.data}")
    if args.method:
        sets.append(f"method.name={args.method}")
    return sets + args.set


def unavailable(args) -> str | None:
    """Why this machine cannot run the variant asked for, or None."""
    import torch

    if args.liger and not (importlib.util.find_spec("liger_kernel") and torch.cuda.is_available()):
        return "skipped --liger: needs the liger-kernel package and a CUDA GPU"
    if args.attn == "flash_attention_2" and not (importlib.util.find_spec("flash_attn") and torch.cuda.is_available()):
        return "skipped --attn flash_attention_2: needs the flash-attn package and a CUDA GPU"
    return None


def gemm_peak(dtype_name: str, seconds: float = 2.0) -> float:
    """FLOP/s of a large square matmul in ``dtype_name`` on this device."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, dtype_name)
    size = 4096 if device == "cuda" else 1024
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * count / (time.perf_counter() - start)


def peak_memory_mib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    from ftune.resources import peak_rss_mib

    return peak_rss_mib()


def heldout_loss(model, rows, collate) -> float:
    """Mean cross-entropy over the answer tokens of the held-out rows, the same for every run."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    total = count = 0.0
    with torch.no_grad():
        for start in range(0, len(rows), 8):
            batch = {key: value.to(device) for key, value in collate(rows[start : start + 8]).items()}
            labels = batch["labels"]
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            targets = labels[:, 1:]
            losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="sum")
            total, count = total + losses.item(), count + (targets != -100).sum().item()
    return total / count


def run_one(which: str, args) -> dict:
    """One run, in this process: its training wall time, real tokens, final train loss, held-out loss, peak memory."""
    from transformers import DataCollatorForSeq2Seq

    from ftune.data import build_datasets
    from ftune.model import load_tokenizer
    from ftune.recipe import load_recipe
    from ftune.runtime import quiet_libraries

    quiet_libraries()
    recipe = load_recipe(args.recipe, overrides(args))
    tokenizer = load_tokenizer(recipe.model)
    splits = build_datasets(recipe.data, tokenizer, recipe.task)
    dynamic = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")
    def as_rows(dataset) -> list[dict]:
        return [{"input_ids": row["input_ids"], "attention_mask": [1] * len(row["input_ids"]), "labels": row["labels"]}
                for row in (dataset[i] for i in range(len(dataset)))]

    eval_rows = as_rows(splits.eval)

    if which == "c":
        from ftune.methods import load_trained
        from ftune.model import load_base_model
        from ftune.training.run import run_training

        run = run_training(recipe, overwrite=True, echo=lambda *_: None)
        summary = json.loads(run.summary.read_text())
        memory = peak_memory_mib()
        model = load_trained(recipe.method.name, lambda: load_base_model(recipe.model, recipe.quantization, task=recipe.task), run.model)
        rows = as_rows(splits.train)
        labelled_share = sum(sum(label != -100 for label in row["labels"][1:]) for row in rows) / sum(len(row["input_ids"]) for row in rows)
        computed = summary["computed_tokens_per_second"] * summary["wall_time_s"]
        return {"wall": summary["wall_time_s"], "tokens": summary["tokens_seen"], "computed": computed,
                "head_positions": summary["tokens_seen"] * labelled_share, "train_loss": last_logged_loss(run.metrics),
                "heldout_loss": heldout_loss(model, eval_rows, dynamic), "memory": memory, **parameter_counts(model)}

    import torch

    from ftune.hardware import resolve_precision
    from ftune.methods import apply_method
    from ftune.model import load_base_model

    torch.manual_seed(recipe.training.seed)
    model = apply_method(load_base_model(recipe.model, recipe.quantization, task=recipe.task), recipe.method, recipe.task)
    precision = resolve_precision(recipe.training.mixed_precision)
    train = recipe.training
    common = dict(
        output_dir=f"{args.workdir}/trainer-{which}", per_device_train_batch_size=train.batch_size, max_steps=train.max_steps,
        learning_rate=train.learning_rate, lr_scheduler_type=train.lr_scheduler, warmup_steps=train.warmup_ratio,
        optim=train.optimizer, bf16=precision.mode == "bf16", fp16=precision.mode == "fp16", logging_steps=5,
        save_strategy="no", report_to="none", disable_tqdm=True, seed=train.seed, data_seed=train.seed,
        use_cpu=not torch.cuda.is_available(), gradient_checkpointing=train.gradient_checkpointing,
        use_liger_kernel=args.liger,
    )
    counts = {"tokens": 0, "computed": 0, "head_positions": 0}

    def counting(step):
        """The trainer's training_step, counting the batches it trains on (a collator would also count the one the
        dataloader fetches ahead)."""
        def training_step(model, inputs, *rest, **options):
            mask = inputs.get("attention_mask")
            counts["computed"] += inputs["input_ids"].numel()
            counts["tokens"] += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()  # packed: no padding
            # TRL's fused LM head projects the labelled positions only; the Trainer's head every position
            counts["head_positions"] += int((inputs["labels"] != -100).sum()) if which in "de" else inputs["input_ids"].numel()
            return step(model, inputs, *rest, **options)
        return training_step

    if which in "ab":
        from transformers import Trainer, TrainingArguments

        padded = DataCollatorForSeq2Seq(tokenizer, padding="max_length", max_length=recipe.data.max_length, label_pad_token_id=-100,
                                        return_tensors="pt")
        trainer = Trainer(model=model, args=TrainingArguments(**common, remove_unused_columns=False), train_dataset=as_rows(splits.train),
                          data_collator=padded if which == "a" else dynamic)
    else:
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        from ftune.data.pipeline import load_records

        # The same conversations ftune trains on, split where ftune's labels start: the last (assistant) turn.
        conversations = [record.value for record in load_records(recipe.data, recipe.task).train]
        dataset = Dataset.from_list([{"prompt": messages[:-1], "completion": messages[-1:]} for messages in conversations])
        config = SFTConfig(**common, packing=which == "d", max_length=recipe.data.max_length, completion_only_loss=True)
        trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    trainer.training_step = counting(trainer.training_step)
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    losses = [record["loss"] for record in trainer.state.log_history if "loss" in record]
    return {"wall": wall, **counts, "train_loss": losses[-1] if losses else float("nan"),
            "heldout_loss": heldout_loss(trainer.model, eval_rows, dynamic), "memory": peak_memory_mib(), **parameter_counts(model)}


def parameter_counts(model) -> dict:
    """All parameters, and the LM head's (tied or not, the matrix that projects hidden states to the vocabulary)."""
    return {"params": sum(p.numel() for p in model.parameters()), "head": model.get_output_embeddings().weight.numel()}


def last_logged_loss(metrics: Path) -> float:
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line]
    losses = [record["loss"] for record in records if "loss" in record]
    return losses[-1] if losses else float("nan")


def child_command(which: str, dataset: str, args) -> list[str]:
    child = [sys.executable, __file__, "--one", which, "--dataset", dataset, "--workdir", args.workdir, "--recipe", args.recipe,
             "--steps", str(args.steps), *sum((["--set", item] for item in args.set), [])]
    for flag in ("model", "data", "method", "attn"):
        if getattr(args, flag):
            child += [f"--{flag}", getattr(args, flag)]
    return child + (["--liger"] if args.liger else [])


def table(dataset: str, args, peak: float) -> None:
    """Run every asked-for run on ``dataset``, each in its own process, and print its table."""
    import torch

    from ftune.hardware import resolve_precision
    from ftune.recipe import load_recipe

    args.dataset = dataset
    recipe = load_recipe(args.recipe, overrides(args))
    results = {}
    for which in args.runs:
        output = subprocess.run(child_command(which, dataset, args), capture_output=True, text=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"})
        line = next((line for line in output.stdout.splitlines() if line.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"run {which} on {dataset} failed:\n{output.stderr[-3000:]}")
        results[which] = json.loads(line[len("RESULT "):])

    factor = 6 if recipe.method.name == "full" else 4
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    precision = resolve_precision(recipe.training.mixed_precision)
    variant = ", ".join(filter(None, [f"attention {args.attn}" if args.attn else "", "liger kernels" if args.liger else ""]))
    print(f"\n### {args.data or dataset}: {recipe.model.name_or_path}, method {recipe.method.name}, batch {recipe.training.batch_size}, "
          f"max_length {recipe.data.max_length}, {args.steps} steps, precision {precision.mode}, {device}" + (f", {variant}" if variant else ""))
    print("\n| run | real tokens/s | computed tokens/s | wall s | peak memory MiB | final train loss | held-out loss | GFLOP/s | "
          "share of peak |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for which, result in results.items():
        speed = result["tokens"] / result["wall"]
        flops = factor * ((result["params"] - result["head"]) * result["computed"] + result["head"] * result["head_positions"]) / result["wall"]
        print(f"| {which}. {RUNS[which]} | {speed:.0f} | {result['computed'] / result['wall']:.0f} | {result['wall']:.1f} | "
              f"{result['memory']:,.0f} | {result['train_loss']:.4f} | {result['heldout_loss']:.4f} | {flops / 1e9:.0f} | "
              f"{flops / peak:.0%} |")
    if "c" in results:
        speed = {which: result["tokens"] / result["wall"] for which, result in results.items()}
        print("\nftune's real tokens/s against " + "; ".join(f"{which}: {speed['c'] / speed[which]:.2f}x" for which in speed if which != "c"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=[*DATASETS, "both"], default="both", help="benchmark rows (default both, one table each)")
    parser.add_argument("--runs", default="".join(RUNS), help=f"which runs, e.g. acd (default {''.join(RUNS)})")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps of every run")
    parser.add_argument("--liger", action="store_true", help="Liger kernels in every run (skipped without liger-kernel and CUDA)")
    parser.add_argument("--attn", choices=["auto", "sdpa", "eager", "flash_attention_2"],
                        help="attention kernel of every run (flash_attention_2 is skipped without flash-attn and CUDA)")
    parser.add_argument("--recipe", default="recipes/smollm2-135m/lora-quickstart.yaml")
    parser.add_argument("--model", help="model.name_or_path override")
    parser.add_argument("--data", help="data.train override (replaces --dataset)")
    parser.add_argument("--method", help="method.name override (lora or full)")
    parser.add_argument("--set", action="append", default=[], help="any other recipe override, key=value")
    parser.add_argument("--one", choices=sorted(RUNS), help=argparse.SUPPRESS)  # a child run
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if set(args.runs) - set(RUNS) or not args.runs:
        parser.exit(2, f"bench_train.py: --runs: pick letters from {''.join(RUNS)} (got {args.runs!r})\n")

    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args)))
        return
    if reason := unavailable(args):
        print(reason)
        return

    from ftune.hardware import resolve_precision
    from ftune.recipe import load_recipe

    datasets = ["quickstart"] if args.data or args.dataset == "quickstart" else ["longtail"] if args.dataset == "longtail" else list(DATASETS)
    with tempfile.TemporaryDirectory() as workdir:
        args.workdir = workdir
        precision = resolve_precision(load_recipe(args.recipe, overrides(args)).training.mixed_precision)
        dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(precision.mode, "float32")
        peak = gemm_peak(dtype)
        print(f"measured GEMM peak ({dtype}): {peak / 1e9:.0f} GFLOP/s")
        for dataset in datasets:
            table(dataset, args, peak)


if __name__ == "__main__":
    main()
