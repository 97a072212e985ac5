"""Measure the data pipeline: tokenization throughput, cache-hit time, padding waste, and forward time per batch layout.

Standalone script; the package never imports it. It uses the built-in SmolLM2 tokenizer (imported
once into the ftune cache) and a private, temporary data cache so runs never disturb each other::

    python scripts/bench_data.py                   # tokenization, cache and padding figures (~1.5 min on 2 CPU cores)
    python scripts/bench_data.py --rows 20000      # smaller generated dataset
    python scripts/bench_data.py --step-batches 4  # also time SmolLM2 forward passes per batch layout (slow;
                                                   # needs an otherwise idle machine to mean anything)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "data" / "quickstart"

WORDS = ("the model learns to rewrite dates answer briefly please explain how this works and why it matters "
         "for training data quality numbers like 42 and 2024-03-05 appear sometimes").split()


def generate_rows(path: Path, count: int, seed: int = 0) -> None:
    """Alpaca rows with varied lengths (prompt 8-120 words, response 1-80 words), deterministic in the seed."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as handle:
        for index in range(count):
            row = {
                "instruction": " ".join(rng.choices(WORDS, k=rng.randint(4, 20))),
                "input": " ".join(rng.choices(WORDS, k=rng.randint(0, 100))) + f" #{index}",
                "output": " ".join(rng.choices(WORDS, k=rng.randint(1, 80))),
            }
            handle.write(json.dumps(row) + "\n")


def timed_build(config, tokenizer):
    from ftune.data import build_datasets

    clock = time.perf_counter()
    splits = build_datasets(config, tokenizer)
    return splits, time.perf_counter() - clock


def padding_waste(lengths: list[int], batch_size: int, seed: int = 42) -> tuple[float, int, int]:
    """Share of pad tokens when batches of ``batch_size`` are padded to their longest example, in a seeded random order."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    real = padded = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start : start + batch_size]]
        real += sum(batch)
        padded += max(batch) * len(batch)
    return (padded - real) / padded, real, padded


def forward_times(model, examples, pad_token_id: int, batch_size: int, batches: int, seed: int = 42) -> tuple[dict[str, float], float]:
    """Seconds per forward pass (fp32, no grad) over the same seeded random batches: padded, packed and auto;
    and the share of batches auto packed."""
    import torch

    from ftune.data.collate import AutoCollator, PackCollator, PadCollator, linear_cost_in_tokens

    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    chunks = [[examples[i] for i in order[b * batch_size : (b + 1) * batch_size]] for b in range(batches + 1)]
    layouts = {"padded": PadCollator(pad_token_id), "packed": PackCollator(),
               "auto": AutoCollator(pad_token_id, linear_cost_in_tokens(model.config), varlen_attention=False)}
    totals = dict.fromkeys(layouts, 0.0)
    for index, chunk in enumerate(chunks):  # layouts interleaved per batch, so load drift hits all alike
        for name, collate in layouts.items():
            batch = collate(chunk)
            clock = time.perf_counter()
            with torch.no_grad():
                model(**batch)
            if index:  # the first batch warms up and is not counted
                totals[name] += time.perf_counter() - clock
    auto = layouts["auto"]
    return {name: total / batches for name, total in totals.items()}, auto.packed_batches / (auto.packed_batches + auto.padded_batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000, help="rows in the generated dataset")
    parser.add_argument("--batch-size", type=int, default=8, help="batch size for the padding-waste figure")
    parser.add_argument("--step-batches", type=int, default=0, help="batches timed per layout in the forward-pass timing (0 = skip)")
    args = parser.parse_args()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(REPO))
    from ftune.model import load_tokenizer
    from ftune.recipe.data import DataConfig
    from ftune.recipe.schema import ModelConfig
    from ftune.runtime import quiet_libraries

    quiet_libraries()
    tokenizer = load_tokenizer(ModelConfig())  # before the private cache below: reuses the imported model
    with tempfile.TemporaryDirectory(prefix="ftune-bench-") as scratch:
        from ftune.model import cache_dir

        models = cache_dir() / "models"
        os.environ["FTUNE_CACHE_DIR"] = str(Path(scratch) / "cache")
        (Path(scratch) / "cache").mkdir()
        (Path(scratch) / "cache" / "models").symlink_to(models, target_is_directory=True)  # reuse the imported model
        print(f"tokenizer: SmolLM2-135M-Instruct ({type(tokenizer).__name__}), {os.cpu_count()} CPUs")

        quick = DataConfig(train=str(QUICKSTART / "train.jsonl"), eval=str(QUICKSTART / "eval.jsonl"), max_length=128)
        splits, cold = timed_build(quick, tokenizer)
        tokens = splits.train_stats.tokens + splits.eval_stats.tokens
        _, warm = timed_build(quick, tokenizer)
        print(f"quickstart: {len(splits.train) + len(splits.eval):,} rows, {tokens:,} tokens; "
              f"read+tokenize {cold:.2f} s = {tokens / cold:,.0f} tokens/s; cache hit {warm * 1000:.0f} ms")

        lengths = [int(n) for n in splits.train.lengths()]
        waste, real, padded = padding_waste(lengths, args.batch_size)
        print(f"padding waste, quickstart train at batch size {args.batch_size}: {100 * waste:.1f}% pad tokens with dynamic "
              f"padding ({padded:,} positions for {real:,} tokens); 0.0% with packing ({real:,} positions)")

        generated = Path(scratch) / "generated.jsonl"
        clock = time.perf_counter()
        generate_rows(generated, args.rows)
        print(f"generated {args.rows:,} rows ({generated.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - clock:.1f} s")
        big = DataConfig(train=str(generated), eval_split=0.01, max_length=1024)
        splits_big, cold = timed_build(big, tokenizer)
        tokens = splits_big.train_stats.tokens + splits_big.eval_stats.tokens
        _, warm = timed_build(big, tokenizer)
        print(f"generated: {len(splits_big.train) + len(splits_big.eval):,} examples, {tokens:,} tokens; "
              f"read+split+tokenize+cache write {cold:.1f} s = {tokens / cold:,.0f} tokens/s; cache hit {warm:.2f} s")
        lengths = [int(n) for n in splits_big.train.lengths()]
        print(f"padding waste, generated train at batch size {args.batch_size}: {100 * padding_waste(lengths, args.batch_size)[0]:.1f}%")

        if args.step_batches:
            from ftune.model import load_base_model
            from ftune.recipe.schema import QuantizationConfig

            model = load_base_model(ModelConfig(dtype="float32"), QuantizationConfig()).eval()
            model.config.use_cache = False
            for name, examples in (("quickstart", splits.train), ("generated", splits_big.train)):
                times, packed_share = forward_times(model, examples, tokenizer.pad_token_id, args.batch_size, args.step_batches)
                print(f"forward pass, {name} batches of {args.batch_size}, SmolLM2 fp32 sdpa: "
                      + ", ".join(f"{layout} {seconds:.2f} s" for layout, seconds in times.items())
                      + f" (auto packed {100 * packed_share:.0f}% of batches)")

if __name__ == "__main__":
    main()
