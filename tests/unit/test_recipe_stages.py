"""``stage:`` and the ``preference:`` section: defaults, and combinations refused with the reason before anything loads."""

from __future__ import annotations

import pytest

from ftune.errors import FtuneError
from ftune.recipe import load_recipe


@pytest.fixture
def recipe_file(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')

    def write(extra: str = "", method: str = "lora"):
        path = tmp_path / "r.yaml"
        path.write_text(f"data:\n  train: {data}\nmethod:\n  name: {method}\noutput_dir: out\n{extra}")
        return path

    return write


def problems(path) -> str:
    with pytest.raises(FtuneError) as info:
        load_recipe(path)
    return " | ".join(info.value.problems)


def test_stage_defaults_to_sft_and_dpo_takes_the_preference_section(recipe_file):
    assert load_recipe(recipe_file()).stage == "sft"
    recipe = load_recipe(recipe_file("stage: dpo\npreference:\n  beta: 0.2\n  precompute_reference: no\n", method="full"))
    assert (recipe.stage, recipe.preference.beta, recipe.preference.precompute_reference) == ("dpo", 0.2, False)


def test_orpo_needs_no_reference_so_any_method_fits(recipe_file):
    assert load_recipe(recipe_file("stage: orpo\n", method="unipelt")).stage == "orpo"


@pytest.mark.parametrize("extra, method, expected", [
    ("preference:\n  beta: 0.2\n", "lora", "preference.beta only apply to stage: dpo or orpo (now 'sft')"),
    ("stage: orpo\npreference:\n  loss_type: ipo\n", "lora", "preference.loss_type: stage: orpo has no reference model"),
    ("stage: dpo\npreference:\n  precompute_reference: true\n", "lora", "the reference is the base with the adapter switched off"),
    ("stage: dpo\n", "unipelt", "method 'unipelt' cannot train stage: dpo"),
    ("stage: dpo\ntask: classification\n", "lora", "set task: causal_lm"),
    ("stage: dpo\npreference:\n  max_prompt_length: 2000\n", "lora", "preference.max_prompt_length: 2000 leaves no room"),
    ("stage: ppo\n", "lora", "stage"),
    ("stage: reward\n", "lora", "stage: reward trains a one-output sequence classifier; set task: classification"),
    ("stage: reward\ntask: classification\npreference:\n  beta: 0.3\n", "lora", "preference.beta: stage: reward"),
])
def test_stage_mismatches_are_refused_with_the_fix(recipe_file, extra, method, expected):
    assert expected in problems(recipe_file(extra, method))


def test_pretrain_refuses_knobs_that_fight_packed_raw_text(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"text": "a b c"}\n')
    path = tmp_path / "p.yaml"
    path.write_text(f"stage: pretrain\ndata:\n  train: {docs}\n  packing: false\n  truncation: drop\nmethod:\n  name: lora\noutput_dir: out\n")
    found = problems(path)
    assert "data.packing: false does not apply to stage: pretrain" in found and "data.truncation: drop" in found
