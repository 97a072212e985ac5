"""``ftune eval --benchmark``: lm-evaluation-harness on a run's model, the shipped local task offline, and the score of
the adapter equal to the score of the merged model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, recipe_dict
from ftune.errors import FtuneError


def build_lora_run(root, model_dir, train, eval_file):
    """A finished LoRA run directory on the tiny model, without training: the adapter's B matrices are drawn at random
    (a trained adapter's are not zero either), so the tuned model differs from its base."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftune.data import load_records
    from ftune.data.heldout import heldout_rows
    from ftune.methods import apply_method, save_method_artifact
    from ftune.recipe import validate_recipe
    from ftune.run_dir import prepare_run_dir, write_json_atomic, write_jsonl_atomic

    recipe = validate_recipe(recipe_dict(model_dir, train, eval_file, root))
    run = prepare_run_dir(recipe, overwrite=False, resume=False)
    model = apply_method(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), recipe.method, recipe.task)
    generator = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.1
    save_method_artifact(model, recipe.method.name, run.model)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(run.model)
    write_jsonl_atomic(run.heldout, heldout_rows(load_records(recipe.data).eval))
    write_json_atomic(run.manifest, {"ftune": "0.1.0", "stage": "sft", "lineage": []})
    write_json_atomic(run.summary, {"train_loss": 1.0, "steps": 4})
    return run


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_llama_dir, alpaca_files):
    return build_lora_run(tmp_path_factory.mktemp("bench") / "run", tiny_llama_dir, *alpaca_files)


def test_without_lm_eval_the_command_names_the_pip_command(lora_run, monkeypatch):
    from typer.testing import CliRunner

    from ftune.cli import app

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # an import of it now raises ImportError
    result = CliRunner().invoke(app, ["eval", str(lora_run.root), "--benchmark", "ftune_dates"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: --benchmark needs lm-evaluation-harness, which is not installed; install it with: pip install 'ftune[benchmark]'"


def test_the_local_task_is_found_and_its_questions_are_well_formed():
    from ftune.benchmark import LOCAL_TASKS, local_task_names

    assert local_task_names() == ["ftune_dates"]
    rows = [json.loads(line) for line in (LOCAL_TASKS / "ftune_dates" / "ftune_dates.jsonl").read_text().splitlines()]
    assert len(rows) == 64
    assert all(len(set(row["choices"])) == 4 and row["choices"][row["answer"]].count("-") == 2 for row in rows)


def test_flatten_scores_names_task_metric_stderr_and_samples():
    from ftune.benchmark import flatten_scores

    results = {"results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1, "exact_match,strict-match": 1.0,
                                 "f1_stderr,none": "N/A", "sample_len": 10}},
               "n-samples": {"t": {"original": 10, "effective": 8}}}
    assert flatten_scores(results) == {"t/acc": 0.5, "t/acc_stderr": 0.1, "t/exact_match[strict-match]": 1.0, "t/samples": 8}


def test_unknown_task_is_refused_before_any_model_loads(lora_run):
    pytest.importorskip("lm_eval")
    from ftune.benchmark import run_benchmark

    with pytest.raises(FtuneError, match=r"--benchmark ftune_nope: lm-evaluation-harness has no such task \(local tasks: ftune_dates"):
        run_benchmark(lora_run.root, ["ftune_dates", "ftune_nope"], echo=lambda line: None)


def test_adapter_and_merged_model_score_the_same_on_the_local_task(lora_run):
    """The adapter, scored through peft on its base, and the merged folder give the same numbers; the base differs."""
    pytest.importorskip("lm_eval")
    from typer.testing import CliRunner

    from ftune.benchmark import benchmark_file
    from ftune.cli import app
    from ftune.merge import run_merge

    merge = run_merge(lora_run.root, echo=lambda line: None)
    assert merge.passed, merge
    runner = CliRunner()
    adapter = runner.invoke(app, ["eval", str(lora_run.root), "--benchmark", "ftune_dates", "--base"])
    assert adapter.exit_code == 0, adapter.output
    scores = json.loads(benchmark_file(lora_run).read_text())
    assert scores["model"] == "adapter" and scores["tuned"]["ftune_dates/samples"] == 64
    assert "ftune_dates/acc" in adapter.output and "ftune_dates/acc_norm" in adapter.output
    assert scores["delta"]["ftune_dates/acc"] == pytest.approx(scores["tuned"]["ftune_dates/acc"] - scores["base"]["ftune_dates/acc"])
    merged = runner.invoke(app, ["eval", str(lora_run.root), "--benchmark", "ftune_dates", "--merged"])
    assert merged.exit_code == 0, merged.output
    merged_scores = json.loads(benchmark_file(lora_run).read_text())
    assert merged_scores["model"] == "merged" and "base" not in merged_scores
    for name in ("ftune_dates/acc", "ftune_dates/acc_norm"):
        assert merged_scores["tuned"][name] == scores["tuned"][name]
    # The random adapter moves the answers: had it been ignored, both would equal the base.
    assert scores["tuned"] != scores["base"]


def harness_command_line(model_dir, *, batch_size: int, out) -> dict:
    """ftune_dates scored by lm-evaluation-harness's own command line on a model folder: its results for the task."""
    subprocess.run([sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args", f"pretrained={model_dir}",
                    "--include_path", str(REPO / "ftune" / "benchmarks"), "--tasks", "ftune_dates", "--batch_size", str(batch_size),
                    "--device", "cpu", "--output_path", str(out)], check=True, capture_output=True, cwd=out.parent)
    [results] = out.rglob("results_*.json")
    return json.loads(results.read_text())["results"]["ftune_dates"]


@pytest.mark.slow
def test_smollm2_adapter_and_merged_scores_agree_and_equal_the_harness_command_line(tmp_path, monkeypatch):
    """The quickstart run (8 steps): the adapter's score is the merged model's within the harness's stderr, and the
    merged model's score is what lm-evaluation-harness's command line prints for the same folder and task."""
    pytest.importorskip("lm_eval")
    from tests.conftest import invoke_ok

    from ftune.benchmark import benchmark_file
    from ftune.run_dir import load_run

    monkeypatch.chdir(REPO)  # the recipe names its data relative to the repository
    run_dir = tmp_path / "run"
    invoke_ok("train", "recipes/smollm2-135m/lora-quickstart.yaml", "--set", "training.max_steps=8",
              "--set", "training.save_steps=100", "--set", f"output_dir={run_dir}")
    invoke_ok("merge", run_dir)
    invoke_ok("eval", run_dir, "--benchmark", "ftune_dates")
    adapter = json.loads(benchmark_file(load_run(run_dir)[0]).read_text())["tuned"]
    invoke_ok("eval", run_dir, "--benchmark", "ftune_dates", "--merged")
    merged = json.loads(benchmark_file(load_run(run_dir)[0]).read_text())["tuned"]
    for name in ("ftune_dates/acc", "ftune_dates/acc_norm"):  # a score of 1.0 has stderr 0: the other side's bounds then
        assert abs(adapter[name] - merged[name]) <= max(adapter[name + "_stderr"], merged[name + "_stderr"])
    batch_size = load_run(run_dir)[1].evaluation.batch_size
    harness = harness_command_line(run_dir / "merged", batch_size=batch_size, out=tmp_path / "lm_eval-out")
    print(f"ftune_dates acc/acc_norm: adapter {adapter['ftune_dates/acc']}/{adapter['ftune_dates/acc_norm']}, merged "
          f"{merged['ftune_dates/acc']}/{merged['ftune_dates/acc_norm']} (stderr {merged['ftune_dates/acc_stderr']:.4f}), "
          f"lm_eval command line {harness['acc,none']}/{harness['acc_norm,none']}")
    assert harness["acc,none"] == pytest.approx(merged["ftune_dates/acc"], abs=1e-9)
    assert harness["acc_norm,none"] == pytest.approx(merged["ftune_dates/acc_norm"], abs=1e-9)
