"""Stages chain through run directories: pretrain -> sft -> dpo, each run's manifest recording where it came from."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from ftune.cli import app
from tests.conftest import invoke_ok, recipe_dict, write_jsonl, write_recipe
from tests.e2e.test_preference_train import WORDS, pair_rows


def test_pretrain_sft_dpo_chain_through_run_directories(tmp_path, tiny_llama_dir, alpaca_files):
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"text": f"the {w} is a {w}"} for w in WORDS * 2])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(WORDS[:9]))
    held = write_jsonl(tmp_path / "held.jsonl", pair_rows(WORDS[9:]))
    train, eval_file = alpaca_files
    runs = [tmp_path / name for name in ("pretrain", "sft", "dpo")]

    pretrain = recipe_dict(tiny_llama_dir, docs, eval_file, runs[0], stage="pretrain", method={"name": "full"},
                           data={"train": str(docs), "eval": [], "eval_split": 2, "max_length": 32}, training={"learning_rate": 1e-3})
    invoke_ok("train", write_recipe(tmp_path / "pretrain.yaml", pretrain))

    sft = recipe_dict(runs[0], train, eval_file, runs[1])  # full weights: the run directory is the model
    invoke_ok("train", write_recipe(tmp_path / "sft.yaml", sft))
    dpo = recipe_dict(runs[1], pairs, held, runs[2], stage="dpo")
    refused = CliRunner().invoke(app, ["train", str(write_recipe(tmp_path / "dpo.yaml", dpo))])
    assert refused.exit_code == 2 and "holds an adapter, not a whole model; fold it into its base with `ftune merge" in refused.output
    invoke_ok("merge", runs[1])
    invoke_ok("train", tmp_path / "dpo.yaml", "--overwrite")  # the refused attempt left its run directory started

    manifest = json.loads((runs[2] / "manifest.json").read_text())
    assert manifest["stage"] == "dpo"
    assert [(step["run"], step["stage"]) for step in manifest["lineage"]] == [(str(runs[0]), "pretrain"), (str(runs[1]), "sft")]
    assert manifest["model_source"] == str(runs[1] / "merged")
    invoke_ok("eval", runs[2])
