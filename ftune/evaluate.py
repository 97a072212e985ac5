"""Eval stage: score a run's tuned model (and optionally its base) on held-out data, from the run directory alone.

Causal LM: loss and perplexity on the response tokens, then batched greedy generation scored by
exact match, token F1 and ROUGE-L; on tool-calling conversations also the share of replies that make
a well-formed call to a known function, and that make exactly the reference call (name and arguments
as parsed JSON). Classification: loss, accuracy, macro F1 and the confusion matrix. A kto run: the KL
estimate and the desirable / undesirable implicit rewards against the base (``scoring.score_kto``). The held-out
rows come from ``RUN/heldout.jsonl`` (or ``--split FILE``), tokenized as training tokenized them.
Results go to RUN/eval/metrics.json and RUN/eval/predictions.jsonl. ``TASK_SCORERS`` maps the
recipe's task to how it is scored.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ftune.data.heldout import load_heldout, split_file, tokenize_heldout
from ftune.errors import FtuneError
from ftune.metrics import TEXT_METRICS, TOOL_METRICS, accuracy, confusion_matrix, macro_f1, tool_call_exact, tool_call_valid
from ftune.recipe.grpo import GRPO
from ftune.rewards import reward_scorer
from ftune.recipe.stages import KTO, PREFERENCE_STAGES, REWARD
from ftune.recipe.tasks import CAUSAL_LM, CLASSIFICATION
from ftune.run_dir import RunDir, load_run, run_labels, write_json_atomic, write_jsonl_atomic

# Below this share of replies ending on the end-of-turn token, eval warns that the model may not have learned to stop.
STOPPED_WARNING = 0.5
UNCOMPARED = ("samples", "tool_call_samples", "wall_time_s")  # reported, but no delta and no --min


@dataclass
class EvalReport:
    tuned: dict
    base: dict | None
    metrics_file: Path
    table: tuple[str, ...]  # metric names to print, in order
    wall_time_s: float = 0.0


def parse_thresholds(items: list[str]) -> dict[str, float]:
    """``--min METRIC=VALUE`` options as a dict."""
    thresholds = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError(item)
            thresholds[name.strip()] = float(value)
        except ValueError as err:
            raise FtuneError(f"--min {item!r}: expected METRIC=NUMBER, e.g. --min exact_match=0.5") from err
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


def tool_prompts(records: list) -> list[tuple[list[dict], list[dict], list[dict] | None]]:
    """(prompt, reference calls, tools) before the first assistant turn that calls a tool, per tool-calling chat."""
    from ftune.data.tools import reference_calls

    out = []
    for record in records:
        if record.kind != "chat":
            continue
        turn = next((i for i, m in enumerate(record.value) if m["role"] == "assistant" and m.get("tool_calls")), None)
        if turn is not None:
            out.append((record.value[:turn], reference_calls(record.value[turn]), record.tools))
    return out


def score_tool_calls(model, tokenizer, records: list, recipe) -> tuple[dict, list[dict]]:
    import json

    from ftune.data.tools import attempts_call, parse_reply_calls
    from ftune.generation import generate_replies

    prompts = tool_prompts(records)
    if not prompts:
        return {}, []
    replies = generate_replies(model, tokenizer, [p for p, _, _ in prompts], tools=[t for _, _, t in prompts],
                               max_new_tokens=recipe.evaluation.max_new_tokens, batch_size=recipe.evaluation.batch_size)
    rows = []
    for (prompt, reference, tools), reply in zip(prompts, replies):
        calls = parse_reply_calls(reply.text)
        known = {t["function"]["name"] for t in tools} if tools else {c["name"] for c in reference}
        rows.append({"prompt": prompt[-1]["content"], "reference": json.dumps(reference, ensure_ascii=False), "prediction": reply.text,
                     "tool_call_attempted": attempts_call(reply.text), "tool_call_valid": tool_call_valid(calls, known),
                     "tool_call_exact": tool_call_exact(calls, reference), "stopped": reply.stopped})
    attempts = [row for row in rows if row["tool_call_attempted"]]
    return {
        "tool_call_rate": len(attempts) / len(rows),
        "tool_call_valid": sum(row["tool_call_valid"] for row in attempts) / max(len(attempts), 1),
        "tool_call_exact": sum(row["tool_call_exact"] for row in rows) / len(rows),
        "tool_call_samples": len(rows),
    }, rows


def score_generation(model, tokenizer, records: list, recipe) -> tuple[dict, list[dict]]:
    from ftune.generation import generate_replies, prompt_and_reference
    from ftune.scoring import response_loss

    clock = time.perf_counter()
    chats = [r for r in records if r.kind == "chat"]
    if not chats:
        raise FtuneError("the held-out split has no chat or instruction examples to score generation on (raw text rows have no reply)")
    loss = response_loss(model, tokenizer, tokenize_heldout(tokenizer, records, recipe.data), recipe.evaluation.batch_size)
    metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50))}
    # A conversation that ends on a call has no text answer to compare; its call is scored by score_tool_calls.
    answered = [r for r in chats if not r.value[max(i for i, m in enumerate(r.value) if m["role"] == "assistant")].get("tool_calls")]
    pairs = [prompt_and_reference(r.value) for r in answered]
    predictions = generate_replies(
        model, tokenizer, [p for p, _ in pairs], tools=[r.tools for r in answered],
        max_new_tokens=recipe.evaluation.max_new_tokens, batch_size=recipe.evaluation.batch_size,
    ) if pairs else []
    rows = [
        {"prompt": prompt[-1]["content"], "reference": reference, "prediction": prediction.text, "stopped": prediction.stopped}
        for (prompt, reference), prediction in zip(pairs, predictions)
    ]
    for name, metric in TEXT_METRICS.items():
        if rows:
            metrics[name] = sum(metric(r["prediction"], r["reference"]) for r in rows) / len(rows)
    tool_metrics, tool_rows = score_tool_calls(model, tokenizer, chats, recipe)
    metrics.update(tool_metrics)
    generated = rows + tool_rows
    metrics.update(stopped_rate=sum(row["stopped"] for row in generated) / len(generated) if generated else 0.0,
                   samples=len(generated), wall_time_s=time.perf_counter() - clock)
    return metrics, generated


def score_classification(model, tokenizer, examples: list[dict], recipe, label_names: list[str]) -> tuple[dict, list[dict]]:
    from ftune.scoring import class_logits

    clock = time.perf_counter()
    total_loss, predicted = class_logits(model, examples, pad_token_id=tokenizer.pad_token_id, batch_size=recipe.evaluation.batch_size)
    expected = [int(e["labels"]) for e in examples]
    metrics = {
        "loss": total_loss / len(examples),
        "accuracy": accuracy(predicted, expected),
        "macro_f1": macro_f1(predicted, expected, len(label_names)),
        "confusion_matrix": {"labels": label_names, "rows_true_columns_predicted": confusion_matrix(predicted, expected, len(label_names))},
        "samples": len(examples),
        "wall_time_s": time.perf_counter() - clock,
    }
    rows = [
        {"text": tokenizer.decode(e["input_ids"], skip_special_tokens=True), "reference": label_names[t], "prediction": label_names[p]}
        for e, t, p in zip(examples, expected, predicted)
    ]
    return metrics, rows


@dataclass(frozen=True)
class TaskScorer:
    score: Callable  # (model, tokenizer, records, recipe, label names) -> (metrics, prediction rows)
    table: tuple[str, ...]  # metrics shown in the printed table, in order


TASK_SCORERS: dict[str, TaskScorer] = {
    CAUSAL_LM: TaskScorer(lambda model, tok, records, recipe, _: score_generation(model, tok, records, recipe),
                          ("loss", "perplexity", *TEXT_METRICS, *TOOL_METRICS, "stopped_rate", "samples", "wall_time_s")),
    CLASSIFICATION: TaskScorer(lambda model, tok, records, recipe, names: score_classification(model, tok, tokenize_heldout(tok, records, recipe.data), recipe, names),
                               ("loss", "accuracy", "macro_f1", "samples", "wall_time_s")),
}


def run_evaluation(run_dir, *, split: str = "eval", with_base: bool = False, max_samples: int | None = None, echo=print) -> EvalReport:
    from ftune.runtime import quiet_libraries
    from ftune.tuned import fold_for_speed, load_model

    quiet_libraries()
    clock = time.perf_counter()
    run, recipe = load_run(run_dir)
    if split != "eval":
        split_file(split)  # fail before loading any model
    records = load_heldout(run, recipe, split)
    limit = max_samples or recipe.evaluation.max_samples
    records = records[:limit] if limit else records
    if not records:
        raise FtuneError(f"--split {split}: no examples to score")
    if recipe.stage in PREFERENCE_STAGES:
        return evaluate_preference(run, recipe, records, split, with_base=with_base, clock=clock, echo=echo)
    if recipe.stage == KTO:  # the KL estimate and implicit rewards against the base (``scoring.score_kto``)
        from ftune.scoring import KTO_TABLE, score_kto
        results = score_kto(lambda tuned: load_model(run, recipe, tuned=tuned), records, recipe, with_base=with_base, echo=echo)
        return save_report(run, split, results, table=KTO_TABLE, wall_time_s=time.perf_counter() - clock)
    scorer = TaskScorer(*reward_scorer(recipe, run)) if recipe.stage == GRPO else TASK_SCORERS[recipe.task]  # grpo: its rewards
    with_base = with_base or recipe.stage == GRPO  # a reward means little without the base's beside it
    results = {}
    for label, tuned in (("tuned", True), ("base", False))[: 2 if with_base else 1]:
        model, tokenizer = load_model(run, recipe, tuned=tuned)
        model = fold_for_speed(model, recipe) if tuned else model
        echo(f"Scoring the {label} model on {len(records)} examples...")
        results[label] = scorer.score(model, tokenizer, records, recipe, run_labels(run))
        del model
    stopped = results["tuned"][0].get("stopped_rate")
    if stopped is not None and stopped < STOPPED_WARNING:
        echo(f"warning: only {stopped:.0%} of the tuned model's replies ended with its end-of-turn token "
             f"({recipe.evaluation.max_new_tokens} new tokens allowed); the others ran on to the limit, so the model may "
             "never stop in a runtime either. Check that the answers' end-of-turn token is trained (ftune data preview "
             "RECIPE marks it) and that pad differs from EOS, or raise evaluation.max_new_tokens if answers are long")
    # Metrics a split cannot have (tool calls on plain chats, text answers when every row ends on a call) are not shown.
    table = tuple(name for name in scorer.table if name in results["tuned"][0])
    return save_report(run, split, results, table=table, wall_time_s=time.perf_counter() - clock)


PREFERENCE_TABLE = ("preference_accuracy", "reward_margin", "logprob_accuracy", "chosen_logp", "rejected_logp", "samples")
# Mean summed log-prob drop (nats per answer) of both sides that signals DPO pushing probability off both answers.
LOGP_COLLAPSE = 5.0


def evaluate_preference(run: RunDir, recipe, records: list, split: str, *, with_base: bool, clock: float, echo=print) -> EvalReport:
    """Preference runs: the tuned policy's implicit reward against its base on held-out pairs (and the base's own
    log-prob ranking with ``--base``); warns when chosen and rejected log-probs both fell sharply."""
    from ftune.data.preference import tokenize_pairs
    from ftune.scoring import completion_logps, preference_metrics
    from ftune.tuned import load_model

    pairs = [r for r in records if r.kind == "preference"]
    if not pairs:
        raise FtuneError(f"--split {split}: no preference pairs (prompt/chosen/rejected) to score a {recipe.stage} run on")
    if recipe.stage == REWARD:
        return evaluate_reward(run, recipe, pairs, split, with_base=with_base, clock=clock, echo=echo)
    scored = {}
    for label, tuned in (("base", False), ("tuned", True)):
        model, tokenizer = load_model(run, recipe, tuned=tuned)
        rows = tokenize_pairs(tokenizer, pairs, max_length=recipe.data.max_length,
                              max_prompt_length=recipe.preference.max_prompt_length).rows
        echo(f"Scoring the {label} model on {len(rows)} preference pairs...")
        scored[label] = completion_logps(model, rows, batch_size=recipe.evaluation.batch_size, max_length=recipe.data.max_length)
        del model
    beta = recipe.preference.beta
    results = {}
    for label in ("tuned", "base")[: 2 if with_base else 1]:
        metrics = preference_metrics(scored[label], scored["base"], beta)
        predictions = [{"prompt": r.value["prompt"][-1]["content"], "chosen": r.value["chosen"], "rejected": r.value["rejected"],
                        "chosen_logp": c, "rejected_logp": j} for r, (c, j) in zip(pairs, scored[label])]
        results[label] = (metrics, predictions)
    base = preference_metrics(scored["base"], scored["base"], beta)
    tuned = results["tuned"][0]
    if base["chosen_logp"] - tuned["chosen_logp"] > LOGP_COLLAPSE and base["rejected_logp"] - tuned["rejected_logp"] > LOGP_COLLAPSE:
        echo(f"warning: both chosen ({base['chosen_logp']:.1f} -> {tuned['chosen_logp']:.1f}) and rejected "
             f"({base['rejected_logp']:.1f} -> {tuned['rejected_logp']:.1f}) log-probs fell sharply: the policy is moving away from "
             "both answers (a known DPO failure); lower training.learning_rate or raise preference.beta")
    return save_report(run, split, results, table=PREFERENCE_TABLE, wall_time_s=time.perf_counter() - clock)


def evaluate_reward(run: RunDir, recipe, pairs: list, split: str, *, with_base: bool, clock: float, echo=print) -> EvalReport:
    """Reward runs: pairwise accuracy (score of chosen above rejected) and mean score margin on held-out pairs."""
    from ftune.data.preference import tokenize_pairs
    from ftune.scoring import reward_metrics, reward_scores
    from ftune.tuned import load_model

    results = {}
    for label, tuned in (("tuned", True), ("base", False))[: 2 if with_base else 1]:
        model, tokenizer = load_model(run, recipe, tuned=tuned)
        rows = tokenize_pairs(tokenizer, pairs, max_length=recipe.data.max_length,
                              max_prompt_length=recipe.preference.max_prompt_length).rows
        echo(f"Scoring the {label} reward model on {len(rows)} preference pairs...")
        scores = reward_scores(model, rows, pad_token_id=tokenizer.pad_token_id, batch_size=recipe.evaluation.batch_size,
                               max_length=recipe.data.max_length)
        predictions = [{"prompt": r.value["prompt"][-1]["content"], "chosen_score": c, "rejected_score": j} for r, (c, j) in zip(pairs, scores)]
        results[label] = (reward_metrics(scores), predictions)
        del model
    return save_report(run, split, results, table=("pairwise_accuracy", "reward_margin", "samples"), wall_time_s=time.perf_counter() - clock)


def save_report(run: RunDir, split: str, results: dict, *, table: tuple[str, ...], wall_time_s: float = 0.0) -> EvalReport:
    metrics = {"split": split, **{label: scores for label, (scores, _) in results.items()}}
    if "base" in results:
        tuned, base = scalar_metrics(results["tuned"][0]), scalar_metrics(results["base"][0])
        metrics["delta"] = {k: tuned[k] - base[k] for k in tuned if k in base}
    metrics["wall_time_s"] = wall_time_s
    write_jsonl_atomic(run.eval_predictions, [{"model": label, **row} for label, (_, rows) in results.items() for row in rows])
    write_json_atomic(run.eval_metrics, metrics)
    return EvalReport(results["tuned"][0], results["base"][0] if "base" in results else None, run.eval_metrics, table, wall_time_s)


def compared(name: str) -> bool:
    """Whether the table shows a metric's delta: not for the sample count, nor a benchmark's standard error (``TASK/acc_stderr``)."""
    return name.rpartition("/")[2] != "samples" and not name.endswith("_stderr")


def format_table(report: EvalReport) -> str:
    columns, width = ["tuned"] + (["base", "delta"] if report.base else []), max(14, *(len(name) + 2 for name in report.table))
    lines = [f"{'metric':<{width}}" + "".join(f"{c:>12}" for c in columns)]
    for name in report.table:
        values = [report.tuned[name]]
        if report.base:
            values += [report.base[name], "" if not compared(name) else report.tuned[name] - report.base[name]]
        lines.append(f"{name:<{width}}" + "".join(f"{v:>12.4f}" if isinstance(v, float) else f"{v:>12}" for v in values))
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
