"""Eval stage: score a run's tuned model (and optionally its base) on held-out data, from the run directory alone.

Causal LM: loss and perplexity on the response tokens, then batched greedy generation scored by
exact match, token F1 and ROUGE-L. Classification: loss, accuracy, macro F1 and the confusion
matrix. Results go to RUN/eval/metrics.json and RUN/eval/predictions.jsonl. ``TASKS`` maps the
recipe's task to how its eval data is loaded and scored.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ftune.errors import FtuneError
from ftune.run_dir import RunDir, load_run, write_json_atomic, write_text_atomic

UNCOMPARED = ("samples", "wall_time_s")  # reported, but no delta and no --min


@dataclass
class EvalReport:
    tuned: dict
    base: dict | None
    metrics_file: Path
    table: tuple[str, ...]  # metric names to print, in order
    wall_time_s: float = 0.0


@dataclass
class EvalData:
    items: list  # conversations (causal LM) or tokenized examples (classification)
    label_names: list[str] | None = None


# --- thresholds (--min METRIC=VALUE) ---------------------------------------------------------

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


def scalar_metrics(metrics: dict) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k not in UNCOMPARED}


def check_thresholds(metrics: dict, thresholds: dict[str, float]) -> list[str]:
    scores = scalar_metrics(metrics)
    failures = []
    for name, minimum in thresholds.items():
        if name not in scores:
            raise FtuneError(f"--min {name}: no such metric; available: {', '.join(sorted(scores))}")
        if scores[name] < minimum:
            failures.append(f"{name} = {scores[name]:.4f} < {minimum}")
    return failures


# --- text metrics ----------------------------------------------------------------------------

def normalize(text: str) -> str:
    return " ".join(text.strip().split())


def words(text: str) -> list[str]:
    return normalize(text).lower().split()


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    predicted, expected = words(prediction), words(reference)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if not predicted or not expected or not common:
        return float(predicted == expected)
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def longest_common_subsequence(a: list[str], b: list[str]) -> int:
    # One row of the DP table at a time: O(len(a) * len(b)) time, O(len(b)) memory.
    previous = [0] * (len(b) + 1)
    for item in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if item == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased whitespace words (order-aware, unlike token F1)."""
    predicted, expected = words(prediction), words(reference)
    if not predicted or not expected:
        return float(predicted == expected)
    common = longest_common_subsequence(predicted, expected)
    if not common:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


TEXT_METRICS: dict[str, Callable[[str, str], float]] = {"exact_match": exact_match, "token_f1": token_f1, "rouge_l": rouge_l}


# --- classification metrics ------------------------------------------------------------------

def accuracy(predicted: list[int], expected: list[int]) -> float:
    return sum(p == e for p, e in zip(predicted, expected)) / max(len(expected), 1)


def confusion_matrix(predicted: list[int], expected: list[int], num_labels: int) -> list[list[int]]:
    """``matrix[true][predicted]`` counts."""
    matrix = [[0] * num_labels for _ in range(num_labels)]
    for p, e in zip(predicted, expected):
        matrix[e][p] += 1
    return matrix


def macro_f1(predicted: list[int], expected: list[int], num_labels: int) -> float:
    """Unweighted mean of per-class F1 over the classes that occur in either list (absent ones would
    score an arbitrary 0 or 1)."""
    matrix = confusion_matrix(predicted, expected, num_labels)
    scores = []
    for label in range(num_labels):
        true_positive = matrix[label][label]
        actual = sum(matrix[label])
        claimed = sum(row[label] for row in matrix)
        if actual == 0 and claimed == 0:
            continue
        scores.append(2 * true_positive / (actual + claimed))
    return sum(scores) / len(scores) if scores else 0.0


# --- causal LM -------------------------------------------------------------------------------

def eval_conversations(recipe, split: str) -> list[list[dict]]:
    """The recipe's held-out conversations (split exactly as training split them), or those of a file."""
    from ftune.data import load_conversations, load_file_conversations

    if split == "eval":
        return load_conversations(recipe.data, recipe.task)[1]
    return load_file_conversations(str(split_file(split)), recipe.data)


def split_file(split: str) -> Path:
    from ftune.recipe.schema import DATA_SUFFIXES

    path = Path(split).expanduser()
    if not path.is_file() or path.suffix not in DATA_SUFFIXES:
        raise FtuneError(f"--split {split!r}: expected 'eval' or an existing {'/'.join(DATA_SUFFIXES)} file")
    return path.resolve()


def response_loss(model, tokenizer, conversations: list[list[dict]], recipe) -> float:
    """Mean cross-entropy over response tokens, weighted by token count (not by batch)."""
    import torch

    from ftune.data import PadCollator
    from ftune.data.tokenize import IGNORE_INDEX, tokenize_conversations
    from ftune.inference import model_device, reply_logits

    examples, _ = tokenize_conversations(
        tokenizer, conversations, max_length=recipe.data.max_length, train_on_prompt=recipe.data.train_on_prompt
    )
    collate = PadCollator(tokenizer.pad_token_id)
    device = model_device(model)
    total_loss, total_tokens = 0.0, 0
    for start in range(0, len(examples), recipe.evaluation.batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + recipe.evaluation.batch_size]).items()}
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = reply_logits(logits, batch["input_ids"].shape[1]).float()
        targets = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        total_loss += losses.item()
        total_tokens += int((targets != IGNORE_INDEX).sum())
    return total_loss / max(total_tokens, 1)


def load_generation_data(recipe, run: RunDir, split: str, tokenizer, limit: int | None) -> EvalData:
    conversations = eval_conversations(recipe, split)
    if not conversations and split == "eval":
        raise FtuneError("data.eval: no chat or instruction examples to score generation on (raw text rows have no reply)")
    return EvalData(conversations[:limit] if limit else conversations)


def score_generation(model, tokenizer, data: EvalData, recipe) -> tuple[dict, list[dict]]:
    from ftune.inference import generate_replies, prompt_and_reference

    clock = time.perf_counter()
    conversations = data.items
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
    metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50))}
    for name, metric in TEXT_METRICS.items():
        metrics[name] = sum(metric(r["prediction"], r["reference"]) for r in rows) / len(rows)
    metrics.update(samples=len(rows), wall_time_s=time.perf_counter() - clock)
    return metrics, rows


# --- classification --------------------------------------------------------------------------

def classification_examples(recipe, tokenizer, split: str) -> tuple[list[dict], list[str]]:
    """Tokenized ``{"input_ids", "labels": int}`` examples of the split, and the class names."""
    from ftune.data import build_datasets
    from ftune.recipe.schema import DatasetSource

    data = recipe.data
    if split != "eval":
        data = data.model_copy(update={"eval": [DatasetSource(path=str(split_file(split)))]})
    splits = build_datasets(data, tokenizer, recipe.task)
    return splits.eval[:], list(splits.label_names)


def load_classification_data(recipe, run: RunDir, split: str, tokenizer, limit: int | None) -> EvalData:
    from ftune.inference import run_labels

    examples, names = classification_examples(recipe, tokenizer, split)
    trained = run_labels(run)
    if trained and list(names) != trained:
        raise FtuneError(
            f"--split {split}: its labels ({', '.join(names)}) differ from the labels the run was trained on "
            f"({', '.join(trained)}, in {run.root / 'labels.json'})"
        )
    return EvalData(examples[:limit] if limit else examples, names)


def score_classification(model, tokenizer, data: EvalData, recipe) -> tuple[dict, list[dict]]:
    import torch

    from ftune.inference import model_device

    examples, names = data.items, data.label_names
    clock = time.perf_counter()
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # sequence classifiers find the last token by it
    device = model_device(model)
    total_loss, predicted = 0.0, []
    for start in range(0, len(examples), recipe.evaluation.batch_size):
        chunk = examples[start : start + recipe.evaluation.batch_size]
        longest = max(len(e["input_ids"]) for e in chunk)
        ids = torch.tensor([list(e["input_ids"]) + [tokenizer.pad_token_id] * (longest - len(e["input_ids"])) for e in chunk], device=device)
        mask = torch.tensor([[1] * len(e["input_ids"]) + [0] * (longest - len(e["input_ids"])) for e in chunk], device=device)
        labels = torch.tensor([int(e["labels"]) for e in chunk], device=device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        total_loss += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        predicted.extend(logits.argmax(-1).tolist())
    expected = [int(e["labels"]) for e in examples]
    metrics = {
        "loss": total_loss / len(examples),
        "accuracy": accuracy(predicted, expected),
        "macro_f1": macro_f1(predicted, expected, len(names)),
        "confusion_matrix": {"labels": names, "rows_true_columns_predicted": confusion_matrix(predicted, expected, len(names))},
        "samples": len(examples),
        "wall_time_s": time.perf_counter() - clock,
    }
    rows = [
        {"text": tokenizer.decode(e["input_ids"], skip_special_tokens=True), "reference": names[t], "prediction": names[p]}
        for e, t, p in zip(examples, expected, predicted)
    ]
    return metrics, rows


@dataclass(frozen=True)
class TaskEval:
    load: Callable  # (recipe, run, split, tokenizer, limit) -> EvalData
    score: Callable  # (model, tokenizer, EvalData, recipe) -> (metrics, prediction rows)
    table: tuple[str, ...]  # metrics shown in the printed table, in order


TASKS: dict[str, TaskEval] = {
    "causal_lm": TaskEval(load_generation_data, score_generation, ("loss", "perplexity", *TEXT_METRICS, "samples", "wall_time_s")),
    "classification": TaskEval(load_classification_data, score_classification, ("loss", "accuracy", "macro_f1", "samples", "wall_time_s")),
}


# --- the stage -------------------------------------------------------------------------------

def run_evaluation(run_dir, *, split: str = "eval", with_base: bool = False, max_samples: int | None = None, echo=print) -> EvalReport:
    from ftune.inference import fold_for_speed, load_model
    from ftune.runtime import quiet_libraries

    quiet_libraries()
    clock = time.perf_counter()
    run, recipe = load_run(run_dir)
    if split != "eval":
        split_file(split)  # fail before loading any model
    task = TASKS[recipe.task]
    results = {}
    data = None
    for label, tuned in (("tuned", True), ("base", False))[: 2 if with_base else 1]:
        model, tokenizer = load_model(run, recipe, tuned=tuned)
        model = fold_for_speed(model, recipe) if tuned else model
        if data is None:
            data = task.load(recipe, run, split, tokenizer, max_samples or recipe.evaluation.max_samples)
            if not data.items:
                raise FtuneError(f"--split {split}: no examples to score")
        echo(f"Scoring the {label} model on {len(data.items)} examples...")
        results[label] = task.score(model, tokenizer, data, recipe)
        del model
    return save_report(run, split, results, table=task.table, wall_time_s=time.perf_counter() - clock)


def save_report(run: RunDir, split: str, results: dict, *, table: tuple[str, ...], wall_time_s: float = 0.0) -> EvalReport:
    metrics = {"split": split, **{label: scores for label, (scores, _) in results.items()}}
    if "base" in results:
        tuned, base = scalar_metrics(results["tuned"][0]), scalar_metrics(results["base"][0])
        metrics["delta"] = {k: tuned[k] - base[k] for k in tuned if k in base}
    metrics["wall_time_s"] = wall_time_s
    lines = []
    for label, (_, rows) in results.items():
        lines.extend(json.dumps({"model": label, **row}, ensure_ascii=False) for row in rows)
    write_text_atomic(run.eval_dir / "predictions.jsonl", "\n".join(lines) + "\n")
    metrics_file = run.eval_dir / "metrics.json"
    write_json_atomic(metrics_file, metrics)
    return EvalReport(results["tuned"][0], results["base"][0] if "base" in results else None, metrics_file, table, wall_time_s)


def format_table(report: EvalReport) -> str:
    columns = ["tuned"] + (["base", "delta"] if report.base else [])
    lines = [f"{'metric':<14}" + "".join(f"{c:>12}" for c in columns)]
    for name in report.table:
        values = [report.tuned[name]]
        if report.base:
            values += [report.base[name], "" if name == "samples" else report.tuned[name] - report.base[name]]
        lines.append(f"{name:<14}" + "".join(f"{v:>12.4f}" if isinstance(v, float) else f"{v:>12}" for v in values))
    if "confusion_matrix" in report.tuned:
        lines.append(format_confusion(report.tuned["confusion_matrix"]))
    lines.append(f"total eval wall time {report.wall_time_s:.1f} s")
    return "\n".join(lines)


def format_confusion(confusion: dict) -> str:
    names, matrix = confusion["labels"], confusion["rows_true_columns_predicted"]
    width = max(8, *(len(n) + 2 for n in names))
    lines = ["confusion (rows: true, columns: predicted)", " " * width + "".join(f"{n:>{width}}" for n in names)]
    lines += [f"{name:<{width}}" + "".join(f"{count:>{width}}" for count in row) for name, row in zip(names, matrix)]
    return "\n".join(lines)
