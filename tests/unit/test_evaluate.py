"""Eval metrics on inputs whose scores are known by hand, and the scorers on models whose outputs are fixed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.conftest import recipe_dict
from ftune.errors import FtuneError
from ftune.data.formats import Record
from ftune.generation import Reply
from ftune.evaluate import EvalReport, check_thresholds, format_table, parse_thresholds, score_classification, score_generation
from ftune.metrics import accuracy, confusion_matrix, exact_match, longest_common_subsequence, macro_f1, rouge_l, token_f1
from ftune.recipe import validate_recipe


def test_exact_match_ignores_surrounding_and_repeated_whitespace_only():
    assert exact_match("  2005-07-12\n", "2005-07-12") == 1.0
    assert exact_match("a  b", "a b") == 1.0
    assert exact_match("A b", "a b") == 0.0  # case matters for exact match


def test_token_f1_known_values():
    assert token_f1("the cat sat", "the cat sat") == 1.0
    assert token_f1("the cat", "the cat sat on") == pytest.approx(2 * 1.0 * 0.5 / 1.5)  # P=1, R=1/2
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("", "x") == 0.0
    assert token_f1("Cat THE", "the cat") == 1.0  # bag of lower-cased words


def test_rouge_l_is_order_aware_where_token_f1_is_not():
    assert longest_common_subsequence("a b c d".split(), "a c b d".split()) == 3
    assert rouge_l("a b c d", "a b c d") == 1.0
    assert rouge_l("d c b a", "a b c d") == pytest.approx(0.25)  # LCS 1 of 4 words
    assert token_f1("d c b a", "a b c d") == 1.0
    # LCS("the cat sat", "the cat sat on the mat") = 3 -> P = 1, R = 1/2
    assert rouge_l("the cat sat", "the cat sat on the mat") == pytest.approx(2 / 3)
    assert rouge_l("", "") == 1.0 and rouge_l("x", "") == 0.0 and rouge_l("x", "y") == 0.0


def test_classification_metrics_known_values():
    expected = [0, 0, 1, 1, 2, 2]
    predicted = [0, 1, 1, 1, 2, 0]
    assert accuracy(predicted, expected) == pytest.approx(4 / 6)
    assert confusion_matrix(predicted, expected, 3) == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    # per class F1: 0 -> 2*1/(2+2) = .5, 1 -> 2*2/(2+3) = .8, 2 -> 2*1/(2+1) = 2/3
    assert macro_f1(predicted, expected, 3) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert macro_f1(expected, expected, 3) == 1.0


def test_macro_f1_skips_labels_absent_from_both_sides():
    assert macro_f1([0, 1], [0, 1], 5) == 1.0
    assert macro_f1([0, 0], [1, 1], 2) == 0.0


def test_thresholds_parse_and_name_unknown_metrics():
    assert parse_thresholds(["exact_match=0.5", "token_f1 = 0.25"]) == {"exact_match": 0.5, "token_f1": 0.25}
    with pytest.raises(FtuneError, match="expected METRIC=NUMBER"):
        parse_thresholds(["exact_match"])
    with pytest.raises(FtuneError, match="expected METRIC=NUMBER"):
        parse_thresholds(["exact_match=high"])
    metrics = {"accuracy": 0.8, "macro_f1": 0.5, "confusion_matrix": {}, "samples": 10}
    assert check_thresholds(metrics, {"accuracy": 0.7}) == []
    assert check_thresholds(metrics, {"macro_f1": 0.6}) == ["macro_f1 = 0.5000 < 0.6"]
    with pytest.raises(FtuneError, match=r"--min rouge: no such metric; available: accuracy, macro_f1"):
        check_thresholds(metrics, {"rouge": 0.1})


@pytest.fixture
def recipe(tiny_llama_dir, alpaca_files, tmp_path):
    train, eval_file = alpaca_files
    return validate_recipe(recipe_dict(tiny_llama_dir, train, eval_file, tmp_path / "run"))


def test_generation_scores_with_known_predictions(recipe, tiny_llama_dir, monkeypatch):
    """Generation is replaced by fixed answers, so every text metric has a known value; the loss is real."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import ftune.generation

    conversations = [
        [{"role": "user", "content": f"Repeat {w}"}, {"role": "assistant", "content": w}] for w in ("red sun", "blue", "cat", "red sun")
    ]
    answers = ["red sun", "blue", "cat dog", "sun red"]  # exact, exact, extra word, swapped words
    monkeypatch.setattr(ftune.generation, "generate_replies", lambda model, tok, prompts, **kw: [Reply(a, True) for a in answers[: len(prompts)]])
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    metrics, rows = score_generation(model, tokenizer, [Record("chat", c, f"row {i}", 0) for i, c in enumerate(conversations)], recipe)
    assert metrics["exact_match"] == pytest.approx(0.5)
    assert metrics["token_f1"] == pytest.approx((1 + 1 + 2 / 3 + 1) / 4)
    assert metrics["rouge_l"] == pytest.approx((1 + 1 + 2 / 3 + 0.5) / 4)
    assert metrics["loss"] > 0 and metrics["perplexity"] == pytest.approx(torch.tensor(metrics["loss"]).exp().item(), rel=1e-5)
    assert rows[2] == {"prompt": "Repeat cat", "reference": "cat", "prediction": "cat dog", "stopped": True}
    assert metrics["stopped_rate"] == 1.0


class FixedClassifier(torch.nn.Module):
    """Returns preset logits per example, keyed by its first token id; records the batches it saw."""

    def __init__(self, logits_by_first_token: dict[int, list[float]]):
        super().__init__()
        self.table = logits_by_first_token
        self.config = SimpleNamespace(pad_token_id=None)
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.batches = []

    def forward(self, input_ids, attention_mask):
        self.batches.append(input_ids.shape)
        return SimpleNamespace(logits=torch.tensor([self.table[int(row[0])] for row in input_ids]))


def test_classification_scores_with_known_logits(recipe):
    tokenizer = SimpleNamespace(pad_token_id=0, decode=lambda ids, skip_special_tokens: " ".join(map(str, ids)))
    names = ["negative", "neutral", "positive"]
    examples = [
        {"input_ids": [11, 5, 6], "labels": 0},
        {"input_ids": [12], "labels": 1},
        {"input_ids": [13, 7], "labels": 2},
        {"input_ids": [14, 8, 9, 9], "labels": 2},
    ]
    model = FixedClassifier({11: [5.0, 0.0, 0.0], 12: [0.0, 5.0, 0.0], 13: [0.0, 0.0, 5.0], 14: [0.0, 5.0, 0.0]})
    metrics, rows = score_classification(model, tokenizer, examples, recipe, names)
    assert metrics["accuracy"] == 0.75
    assert metrics["confusion_matrix"] == {"labels": names, "rows_true_columns_predicted": [[1, 0, 0], [0, 1, 0], [0, 1, 1]]}
    assert metrics["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    expected_loss = torch.nn.functional.cross_entropy(
        torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0], [0, 5.0, 0]]), torch.tensor([0, 1, 2, 2])
    ).item()
    assert metrics["loss"] == pytest.approx(expected_loss)
    assert model.config.pad_token_id == 0  # sequence classifiers locate the last real token by it
    assert rows[3] == {"text": "14 8 9 9", "reference": "positive", "prediction": "neutral"}

    report = EvalReport(metrics, None, None, ("loss", "accuracy", "macro_f1", "samples", "wall_time_s"), 1.0)
    table = format_table(report)
    assert "accuracy" in table and "confusion (rows: true, columns: predicted)" in table
