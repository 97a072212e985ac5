"""grpo's rewards as callables: the built-ins score reply text against the reference column, a user function is called
as documented and its failures name the prompt, and prompts are cut before the last assistant turn."""

from __future__ import annotations

import json

import pytest

from ftune.data.formats import Record
from ftune.errors import FtuneError
from ftune.recipe.grpo import GrpoConfig
from ftune.rewards import build_rewards, prompt_rows, score_replies

CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}


def rewards_of(*specs):
    config = GrpoConfig(rewards=list(specs))
    return config.rewards, build_rewards(config.rewards)


def test_prompts_stop_before_the_last_assistant_turn_which_is_the_reference():
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]
    tool = [{"role": "user", "content": "weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": CALL}]}]
    rows = prompt_rows([Record("chat", chat, "a.jsonl:1", 0), Record("chat", tool, "a.jsonl:2", 0), Record("text", "raw", "b:1", 1)])
    assert [r["prompt"] for r in rows] == [chat[:3], tool[:1]]
    assert [r["reference"] for r in rows] == ["4", ""] and json.loads(rows[1]["reference_calls"]) == [CALL]


def test_builtins_score_the_reply_against_the_reference():
    specs, built = rewards_of({"kind": "exact_match"}, {"kind": "numeric_match", "weight": 2.0},
                              {"kind": "regex", "pattern": r"\d+"}, {"kind": "valid_json"}, {"kind": "tool_call_exact"})
    rows = [{"prompt": [{"role": "user", "content": "2+2?"}], "reference": "4", "reference_calls": "[]", "origin": "f:1"},
            {"prompt": [{"role": "user", "content": "weather?"}], "reference": "", "reference_calls": json.dumps([CALL]), "origin": "f:2"}]
    metrics, scores = score_replies(specs, built, rows, ["The answer is 4.", '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'])
    assert scores == [[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 1.0]]
    assert metrics["reward"] == pytest.approx((2.0 + 1.0) / 2) and metrics["reward/numeric_match"] == 0.5
    _, [exact] = rewards_of({"kind": "exact_match"})
    assert exact([[{"role": "user", "content": "q"}]], [[{"role": "assistant", "content": " 4 "}]], reference=["4"]) == [1.0]


def test_a_function_reward_is_called_with_the_columns_and_its_failure_names_the_prompt(tmp_path):
    (tmp_path / "score.py").write_text(
        "def score(prompts, completions, reference, **columns):\n"
        "    return [float(c[-1]['content'] == r) for c, r in zip(completions, reference)]\n"
        "def picky(prompts, completions, **columns):\n"
        "    return [1 / len(c[-1]['content']) for c in completions]\n")
    _, [score, picky] = rewards_of({"kind": "function", "function": f"{tmp_path}/score.py:score"},
                                   {"kind": "function", "function": f"{tmp_path}/score.py:picky"})
    prompts = [[{"role": "user", "content": "first"}], [{"role": "user", "content": "second"}]]
    completions = [[{"role": "assistant", "content": "a"}], [{"role": "assistant", "content": ""}]]
    assert score(prompts, completions, reference=["a", "b"], origin=["f:1", "f:2"]) == [1.0, 0.0]
    with pytest.raises(FtuneError) as info:
        picky(prompts, completions, reference=["a", "b"], origin=["f:1", "f:2"])
    [line] = info.value.problems if hasattr(info.value, "problems") else [str(info.value)]
    assert "grpo.rewards.1.function" in line and "ZeroDivisionError" in line and "'second' (f:2)" in line and "\n" not in line


def test_a_missing_reward_run_is_named_when_training_starts(tmp_path):
    specs = GrpoConfig(rewards=[{"kind": "model", "run": str(tmp_path / "not-yet")}]).rewards
    with pytest.raises(FtuneError, match=r"grpo.rewards.0.run: .*not-yet holds no finished reward model; train it first"):
        build_rewards(specs)


def test_rewards_of_one_kind_keep_their_own_names():
    _, built = rewards_of({"kind": "regex", "pattern": "a"}, {"kind": "exact_match"}, {"kind": "regex", "pattern": "b"})
    assert [f.__name__ for f in built] == ["regex_0", "exact_match", "regex_2"]
