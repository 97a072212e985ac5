"""Eval stage: score a run's tuned model (and optionally its base) on held-out data, from the run directory alone.

Causal LM: loss and perplexity on the response tokens, then greedy generation scored by exact
match and token F1. Results go to RUN/eval/metrics.json and RUN/eval/predictions.jsonl.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ftune.errors import FtuneError
from ftune.run_dir import RunDir, load_run, write_json_atomic, write_text_atomic

GENERATION_METRICS = ("exact_match", "token_f1")


@dataclass
class EvalReport:
    tuned: dict
    base: dict | None
    metrics_file: Path


def parse_thresholds(items: list[str]) -> dict[str, float]:
    thresholds = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            thresholds[name.strip()] = float(value)
        except ValueError:
            raise FtuneError(f"--min {item!r}: expected METRIC=NUMBER, e.g. --min exact_match=0.5") from None
        if not sep:
            raise FtuneError(f"--min {item!r}: expected METRIC=NUMBER, e.g. --min exact_match=0.5")
    return thresholds


def check_thresholds(metrics: dict, thresholds: dict[str, float]) -> list[str]:
    failures = []
    for name, minimum in thresholds.items():
        if name not in metrics:
            raise FtuneError(f"--min {name}: no such metric; available: {', '.join(sorted(metrics))}")
        if metrics[name] < minimum:
            failures.append(f"{name} = {metrics[name]:.4f} < {minimum}")
    return failures


def normalize(text: str) -> str:
    return " ".join(text.strip().split())


def token_f1(prediction: str, reference: str) -> float:
    predicted, expected = normalize(prediction).lower().split(), normalize(reference).lower().split()
    common = sum((Counter(predicted) & Counter(expected)).values())
    if not predicted or not expected or not common:
        return float(predicted == expected)
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def eval_conversations(recipe, split: str) -> list[list[dict]]:
    from ftune.data import load_conversations
    from ftune.data.formats import rows_to_conversations
    from ftune.data.sources import read_rows

    if split == "eval":
        return load_conversations(recipe.data)[1]
    path = Path(split)
    if not path.is_file() or path.suffix not in (".jsonl", ".json"):
        raise FtuneError(f"--split {split!r}: expected 'eval' or an existing .jsonl/.json file")
    return rows_to_conversations(read_rows(str(path)), "auto", system_prompt=recipe.data.system_prompt)


def response_loss(model, tokenizer, conversations: list[list[dict]], recipe) -> float:
    """Mean cross-entropy over response tokens, weighted by token count (not by batch)."""
    import torch

    from ftune.data import PadCollator
    from ftune.data.tokenize import IGNORE_INDEX, tokenize_conversations

    examples, _ = tokenize_conversations(
        tokenizer, conversations, max_length=recipe.data.max_length, train_on_prompt=recipe.data.train_on_prompt
    )
    collate = PadCollator(tokenizer.pad_token_id)
    device = next(model.parameters()).device
    total_loss, total_tokens = 0.0, 0
    for start in range(0, len(examples), recipe.training.batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + recipe.training.batch_size]).items()}
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        targets = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        total_loss += losses.item()
        total_tokens += int((targets != IGNORE_INDEX).sum())
    return total_loss / max(total_tokens, 1)


def score_model(model, tokenizer, conversations, recipe) -> tuple[dict, list[dict]]:
    from ftune.inference import generate_replies, prompt_and_reference

    clock = time.perf_counter()
    loss = response_loss(model, tokenizer, conversations, recipe)
    pairs = [prompt_and_reference(c) for c in conversations]
    predictions = generate_replies(
        model, tokenizer, [p for p, _ in pairs],
        max_new_tokens=recipe.evaluation.max_new_tokens, batch_size=recipe.evaluation.batch_size,
    )
    rows = [
        {"prompt": prompt[-1]["content"], "reference": reference, "prediction": prediction}
        for (prompt, reference), prediction in zip(pairs, predictions)
    ]
    exact = sum(normalize(r["prediction"]) == normalize(r["reference"]) for r in rows) / len(rows)
    f1 = sum(token_f1(r["prediction"], r["reference"]) for r in rows) / len(rows)
    metrics = {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50)),
        "exact_match": exact,
        "token_f1": f1,
        "samples": len(rows),
        "wall_time_s": time.perf_counter() - clock,
    }
    return metrics, rows


def run_evaluation(run_dir, *, split: str = "eval", with_base: bool = False, max_samples: int | None = None, echo=print) -> EvalReport:
    from ftune.inference import load_model
    from ftune.runtime import quiet_libraries

    quiet_libraries()
    run, recipe = load_run(run_dir)
    conversations = eval_conversations(recipe, split)
    limit = max_samples or recipe.evaluation.max_samples
    conversations = conversations[:limit] if limit else conversations
    if not conversations:
        raise FtuneError(f"--split {split}: no examples to score")
    results = {}
    for label, tuned in (("tuned", True), ("base", False))[: 2 if with_base else 1]:
        echo(f"Scoring the {label} model on {len(conversations)} examples...")
        model, tokenizer = load_model(run, recipe, tuned=tuned)
        results[label] = score_model(model, tokenizer, conversations, recipe)
        del model
    return save_report(run, split, results)


def save_report(run: RunDir, split: str, results: dict) -> EvalReport:
    metrics = {"split": split, **{label: scores for label, (scores, _) in results.items()}}
    if "base" in results:
        metrics["delta"] = {k: results["tuned"][0][k] - results["base"][0][k] for k in ("loss", "exact_match", "token_f1")}
    lines = []
    for label, (_, rows) in results.items():
        lines.extend(json.dumps({"model": label, **row}, ensure_ascii=False) for row in rows)
    write_text_atomic(run.eval_dir / "predictions.jsonl", "\n".join(lines) + "\n")
    metrics_file = run.eval_dir / "metrics.json"
    write_json_atomic(metrics_file, metrics)
    return EvalReport(results["tuned"][0], results["base"][0] if "base" in results else None, metrics_file)


def format_table(report: EvalReport) -> str:
    names = ("loss", "perplexity", "exact_match", "token_f1", "samples", "wall_time_s")
    columns = ["tuned"] + (["base", "delta"] if report.base else [])
    lines = [f"{'metric':<14}" + "".join(f"{c:>12}" for c in columns)]
    for name in names:
        values = [report.tuned[name]]
        if report.base:
            values += [report.base[name], report.tuned[name] - report.base[name]]
        lines.append(f"{name:<14}" + "".join(f"{v:>12.4f}" if isinstance(v, float) else f"{v:>12}" for v in values))
    return "\n".join(lines)
