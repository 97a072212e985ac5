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
