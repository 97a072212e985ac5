"""Secret-looking environment values are masked in everything the run directory's text writer writes: a token given on
the command line lands in manifest.json's command as ***, and a recipe holding one still resumes."""

from __future__ import annotations

import json

import pytest

from ftune.redaction import MASK, is_secret_name, redact, secret_values
from ftune.run_dir import RunDir, prepare_run_dir, write_json_atomic


@pytest.mark.parametrize("name", ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY", "DB_PASSWORD",
                                  "OPENAIKEY", "GITHUB_PAT", "GOOGLE_APPLICATION_CREDENTIALS", "comet_api_key"])
def test_secret_names(name):
    assert is_secret_name(name)


@pytest.mark.parametrize("name", ["TOKENIZERS_PARALLELISM", "PWD", "PATH", "HOME", "FTUNE_CACHE_DIR", "KEYBOARD_LAYOUT"])
def test_names_that_are_not_secrets(name):
    assert not is_secret_name(name)


def test_values_are_masked_longest_first_and_short_ones_left_alone():
    environ = {"HF_TOKEN": "hf_abcdefgh12345678", "OUTER_KEY": "xx-hf_abcdefgh12345678-yy", "FLAG_TOKEN": "true", "HOME": "/home/someone"}
    assert secret_values(environ)[:2] == ["xx-hf_abcdefgh12345678-yy", "hf_abcdefgh12345678"]
    assert redact("a xx-hf_abcdefgh12345678-yy b hf_abcdefgh12345678 true /home/someone", environ) == f"a {MASK} b {MASK} true /home/someone"


def test_a_token_on_the_command_line_never_reaches_the_manifest(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "planted-wandb-0123456789")
    manifest = tmp_path / "manifest.json"
    write_json_atomic(manifest, {"command": ["ftune", "train", "r.yaml", "--set", "tracking.key=planted-wandb-0123456789"]})
    assert json.loads(manifest.read_text())["command"][-1] == f"tracking.key={MASK}"


def test_a_recipe_holding_a_secret_is_saved_masked_and_still_resumes(tmp_path, monkeypatch, make_recipe):
    from ftune.recipe import load_recipe

    monkeypatch.setenv("ACME_SECRET", "planted-system-secret")
    recipe = load_recipe(make_recipe(data={"system_prompt": "You answer. planted-system-secret"}))
    run = prepare_run_dir(recipe, overwrite=False, resume=False)
    assert "planted-system-secret" not in run.recipe.read_text() and MASK in run.recipe.read_text()
    (run.root / "metrics.jsonl").write_text("")  # something to continue
    assert prepare_run_dir(recipe, overwrite=False, resume=True) == RunDir(run.root)
