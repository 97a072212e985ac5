"""The ``grpo:`` section: defaults, its rewards list, and every combination refused at validate time naming the key."""

from __future__ import annotations

import pytest

from ftune.recipe import load_recipe
from tests.conftest import recipe_problems as problems


@pytest.fixture
def recipe_file(tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text('{"instruction": "Add 1 and 2.", "output": "3"}\n')
    (tmp_path / "score.py").write_text("def score(prompts, completions, **columns):\n    return [0.0] * len(completions)\n")

    def write(extra: str = "", method: str = "lora", stage: str = "grpo"):
        path = tmp_path / "r.yaml"
        data_extra, _, extra = extra.rpartition("||")  # data keys before ||, other sections after
        path.write_text(f"stage: {stage}\ndata:\n  train: {data}\n{data_extra}method:\n  name: {method}\noutput_dir: out\n"
                        f"training:\n  batch_size: 4\n{extra}")
        return path

    return write




def test_grpo_takes_weighted_builtin_and_function_rewards(recipe_file, tmp_path):
    recipe = load_recipe(recipe_file(
        "grpo:\n  num_generations: 2\n  rewards:\n    - {kind: exact_match}\n    - {kind: regex, pattern: '\\d+', weight: 0.5}\n"
        f"    - {{kind: function, function: '{tmp_path}/score.py:score'}}\n    - {{kind: numeric_match}}\n    - {{kind: valid_json}}\n"
        "    - {kind: tool_call_exact}\n"))
    assert recipe.stage == "grpo" and recipe.grpo.num_generations == 2
    assert [r.kind for r in recipe.grpo.rewards] == ["exact_match", "regex", "function", "numeric_match", "valid_json", "tool_call_exact"]
    assert recipe.grpo.rewards[1].weight == 0.5 and recipe.grpo.rewards[2].function == f"{tmp_path.resolve()}/score.py:score"


@pytest.mark.parametrize(("extra", "method", "expected"), [
    ("", "lora", "grpo.rewards: stage: grpo needs at least one reward"),
    ("grpo:\n  num_generations: 3\n  rewards: [{kind: exact_match}]\n", "lora", "grpo.num_generations: 3 groups do not fit the 4 completions"),
    ("grpo:\n  rewards: [{kind: exact_match}]\n", "prefix", "grpo.beta: method 'prefix' cannot be switched off"),
    ("  max_length: 64\n||grpo:\n  max_new_tokens: 64\n  rewards: [{kind: exact_match}]\n", "lora", "grpo.max_new_tokens: 64 leaves no room"),
    ("grpo:\n  rewards: [{kind: exact_match}]\npreference:\n  beta: 0.3\n", "lora", "preference.beta: stage: grpo does not read"),
    ("  packing: true\n||grpo:\n  rewards: [{kind: exact_match}]\n", "lora", "data.packing: true does not apply to stage: grpo"),
    ("grpo:\n  rewards: [{kind: exact_match}]\ntask: classification\n", "lora", "stage: grpo samples completions from a causal LM; set task: causal_lm"),
    ("  train_on_prompt: true\n||grpo:\n  rewards: [{kind: exact_match}]\n", "lora", "data.train_on_prompt: stage: grpo trains on its own"),
])
def test_grpo_mismatches_are_refused_with_the_fix(recipe_file, extra, method, expected):
    assert expected in problems(recipe_file(extra, method))


def test_the_grpo_section_belongs_to_stage_grpo(recipe_file):
    assert "grpo: the section only applies to stage: grpo (now 'sft')" in problems(
        recipe_file("grpo:\n  rewards: [{kind: exact_match}]\n", stage="sft"))


@pytest.mark.parametrize(("reward", "expected"), [
    ("{kind: function, function: missing.py:score}", "grpo.rewards.0.function (line 11): file 'missing.py' does not exist"),
    ("{kind: function, function: '{tmp}/score.py:absent'}", "grpo.rewards.0.function (line 11): {tmp}/score.py defines no function 'absent'"),
    ("{kind: function, function: score}", "grpo.rewards.0.function (line 11): 'score' is not path/to/file.py:function"),
    ("{kind: regex, pattern: '(unclosed'}", "grpo.rewards.0.pattern (line 11): not a valid regular expression"),
    ("{kind: model, run: '{tmp}'}", "grpo.rewards.0.run (line 11): "),
    ("{kind: exactmatch}", "grpo.rewards.0"),
])
def test_bad_rewards_name_their_key(recipe_file, tmp_path, reward, expected):
    found = problems(recipe_file(f"grpo:\n  rewards:\n    - {reward.replace('{tmp}', str(tmp_path))}\n"))
    assert expected.replace("{tmp}", str(tmp_path)) in found


def test_a_model_reward_must_be_a_finished_reward_run(recipe_file, tmp_path):
    run = tmp_path / "sft-run"
    run.mkdir()
    (run / "recipe.yaml").write_text("stage: sft\n")
    assert "sft-run' is a stage: sft run, not a reward model; give a stage: reward run directory" in problems(
        recipe_file(f"grpo:\n  rewards:\n    - {{kind: model, run: '{run}'}}\n"))
    (run / "recipe.yaml").write_text("stage: reward\n")
    assert "did not finish training" in problems(recipe_file(f"grpo:\n  rewards:\n    - {{kind: model, run: '{run}'}}\n"))
