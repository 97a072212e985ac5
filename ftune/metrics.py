"""Metrics of held-out predictions: text overlap for generated replies, tool calls, accuracy and F1 for class labels.

Pure Python on strings and label ids, so they are exact, fast and testable without a model.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable


def normalize(text: str) -> str:
    return " ".join(text.strip().split())


def words(text: str) -> list[str]:
    return normalize(text).lower().split()


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def _f1(common: int, predicted: int, expected: int) -> float:
    precision, recall = common / predicted, common / expected
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, reference: str) -> float:
    predicted, expected = words(prediction), words(reference)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if not predicted or not expected or not common:
        return float(predicted == expected)
    return _f1(common, len(predicted), len(expected))


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
    return _f1(common, len(predicted), len(expected)) if common else 0.0


# A number as written in text: optional sign, digits with optional thousands commas, optional decimals or exponent.
NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:[eE][-+]?\d+)?"


def last_number(text: str) -> float | None:
    import re

    found = [m for m in re.findall(NUMBER, text) if any(c.isdigit() for c in m)]
    return float(found[-1].replace(",", "")) if found else None


def numeric_match(prediction: str, reference: str) -> float:
    """1 when the last number in the prediction equals the reference's last number (so "The answer is 42." matches "42";
    1e-9 relative tolerance for decimals), 0 when either has none."""
    predicted, expected = last_number(prediction), last_number(reference)
    if predicted is None or expected is None:
        return 0.0
    return float(abs(predicted - expected) <= 1e-9 * max(abs(expected), 1.0))


def valid_json(prediction: str) -> float:
    import json

    try:
        json.loads(prediction)
    except ValueError:
        return 0.0
    return 1.0


def regex_match(prediction: str, pattern: str) -> float:
    """1 when the whole stripped prediction matches ``pattern``."""
    import re

    return float(re.fullmatch(pattern, prediction.strip(), flags=re.DOTALL) is not None)


TEXT_METRICS: dict[str, Callable[[str, str], float]] = {"exact_match": exact_match, "token_f1": token_f1, "rouge_l": rouge_l}


def tool_call_valid(calls: list[dict] | None, known: set[str]) -> float:
    """1 when the reply holds calls that all parsed as JSON and name known functions (``calls`` None = unparsable)."""
    return float(bool(calls) and all(call["name"] in known for call in calls))


def tool_call_exact(calls: list[dict] | None, reference: list[dict]) -> float:
    """1 when the reply makes exactly the reference calls, in order: same names, arguments equal as parsed JSON
    (so key order and spacing do not matter, and 20 equals 20.0)."""
    return float(calls is not None and [(c["name"], c["arguments"]) for c in calls] == [(r["name"], r["arguments"]) for r in reference])


# Over the held-out turns that expect a call: tool_call_rate = share of replies that try to call,
# tool_call_valid = share of those attempts that parse and name known functions,
# tool_call_exact = share of turns whose reply makes exactly the reference calls.
TOOL_METRICS = ("tool_call_rate", "tool_call_valid", "tool_call_exact")


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
