"""``stage:`` and the ``preference:`` section: defaults, and combinations refused with the reason before anything loads."""

from __future__ import annotations

import pytest

from ftune.recipe import load_recipe
from tests.conftest import recipe_problems as problems


@pytest.fixture
def recipe_file(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')

    def write(extra: str = "", method: str = "lora"):
        path = tmp_path / "r.yaml"
        path.write_text(f"data:\n  train: {data}\nmethod:\n  name: {method}\noutput_dir: out\n{extra}")
        return path

    return write




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


def test_kto_takes_its_weights_and_the_reference_of_dpo(recipe_file):
    recipe = load_recipe(recipe_file("stage: kto\npreference:\n  beta: 0.2\n  desirable_weight: 1.33\n  undesirable_weight: 0.5\n"))
    assert (recipe.stage, recipe.preference.desirable_weight, recipe.preference.undesirable_weight) == ("kto", 1.33, 0.5)
    assert load_recipe(recipe_file("stage: kto\npreference:\n  precompute_reference: true\n", method="full")).stage == "kto"


@pytest.mark.parametrize("extra, method, expected", [
    ("preference:\n  desirable_weight: 2.0\n", "lora",
     "preference.desirable_weight: only stage: kto weighs completions (now 'sft'); set stage: kto or remove it"),
    ("stage: dpo\npreference:\n  undesirable_weight: 0.5\n", "lora",
     "preference.undesirable_weight: only stage: kto weighs completions (now 'dpo'); set stage: kto or remove it"),
    ("stage: kto\npreference:\n  loss_type: ipo\n", "lora", "preference.loss_type: stage: kto trains with the KTO loss"),
    ("stage: kto\n", "unipelt", "method 'unipelt' cannot train stage: kto"),
    ("stage: kto\npreference:\n  precompute_reference: true\n", "lora",
     "preference.precompute_reference: with method 'lora' the reference is the base with the adapter switched off"),
    ("stage: kto\ntask: classification\n", "lora", "stage: kto tunes a causal LM on completions labelled desirable or "
     "undesirable; set task: causal_lm"),
    ("stage: kto\ntraining:\n  batch_size: 1\n", "lora", "training.batch_size: stage: kto estimates its KL term"),
    ("stage: kto\npreference:\n  max_prompt_length: 2000\n", "lora", "preference.max_prompt_length: 2000 leaves no room"),
    ("stage: kto\npreference:\n  desirable_weight: 0\n", "lora", "preference.desirable_weight"),
])
def test_kto_mismatches_are_refused_naming_the_key(recipe_file, extra, method, expected):
    assert expected in problems(recipe_file(extra, method))


def test_kto_refuses_packing_and_prompt_training(tmp_path):
    data = tmp_path / "kto.jsonl"
    data.write_text('{"prompt": "a", "completion": "b", "label": true}\n')
    path = tmp_path / "k.yaml"
    path.write_text(f"stage: kto\ndata:\n  train: {data}\n  packing: true\n  train_on_prompt: true\nmethod:\n  name: lora\noutput_dir: out\n")
    found = problems(path)
    assert "data.packing: true does not apply to stage: kto" in found and "data.train_on_prompt: stage: kto scores the completions only" in found


def test_pretrain_refuses_knobs_that_fight_packed_raw_text(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"text": "a b c"}\n')
    path = tmp_path / "p.yaml"
    path.write_text(f"stage: pretrain\ndata:\n  train: {docs}\n  packing: false\n  truncation: drop\nmethod:\n  name: lora\noutput_dir: out\n")
    found = problems(path)
    assert "data.packing: false does not apply to stage: pretrain" in found and "data.truncation: drop" in found
