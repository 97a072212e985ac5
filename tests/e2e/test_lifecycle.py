"""train -> eval -> merge -> export -> generate on the tiny Llama, through the CLI, from the run directory alone.

One real training run drives the CLI lifecycle. Merge parity across methods uses run directories
whose adapters are set to random non-zero values instead of trained (a freshly initialised LoRA
is a no-op, and training every method would cost minutes): same save path as training, stronger
check, a fraction of the time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import recipe_dict, write_recipe
from tests.tolerances import approx, assert_close, forward_steps
from ftune.cli import app
from ftune.errors import FtuneError
from ftune.recipe import method_class, method_names, validate_recipe

runner = CliRunner()

MERGEABLE = [name for name in method_names() if method_class(name).mergeable]
UNMERGEABLE = [name for name in method_names() if not method_class(name).mergeable]
# Merge parity cases: every mergeable method with its defaults, plus the LoRA variants.
PARITY_CASES = {
    **{name: {"name": name} for name in MERGEABLE},
    "lora": {"name": "lora", "r": 4, "alpha": 8},
    "dora": {"name": "lora", "r": 4, "alpha": 8, "use_dora": True},
    "rslora": {"name": "lora", "r": 4, "alpha": 8, "use_rslora": True},
    "pissa": {"name": "lora", "r": 4, "alpha": 8, "init": "pissa"},
}


def invoke(*args: str, input: str | None = None):
    result = runner.invoke(app, [str(a) for a in args], input=input)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def build_run(root: Path, tiny_llama_dir, data_files, **sections) -> Path:
    """A finished run directory as ``ftune train`` leaves it, with random non-zero adapter weights."""
    from ftune.data import build_datasets
    from ftune.methods import apply_method
    from ftune.model import load_base_model, load_tokenizer
    from ftune.run_dir import prepare_run_dir, write_json_atomic
    from ftune.training.run import save_artifacts
    from ftune.training.session import save_run_data

    train, eval_file = data_files
    recipe = validate_recipe(recipe_dict(tiny_llama_dir, train, eval_file, root, **sections))
    run = prepare_run_dir(recipe, overwrite=True, resume=False)
    tokenizer = load_tokenizer(recipe.model)
    splits = build_datasets(recipe.data, tokenizer, recipe.task)
    labels = splits.label_names
    save_run_data(run, splits)
    base = load_base_model(recipe.model, recipe.quantization, task=recipe.task, labels=labels)
    model = apply_method(base, recipe.method, recipe.task)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator).to(param.dtype) * 0.1)
    save_artifacts(model, tokenizer, recipe, run)
    write_json_atomic(run.summary, {"steps": 0})
    return run.root


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_llama_dir, alpaca_files) -> Path:
    root = tmp_path_factory.mktemp("lifecycle")
    train, eval_file = alpaca_files
    recipe = write_recipe(root / "recipe.yaml", recipe_dict(tiny_llama_dir, train, eval_file, root / "run", method={
        "name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "init": "gaussian",  # gaussian: B != 0, merge is not a no-op
    }))
    result = invoke("train", recipe)
    assert result.exit_code == 0, result.output
    return root / "run"


def adapter_logits(run_dir: Path, ids: list[int]) -> torch.Tensor:
    from ftune.tuned import load_model
    from ftune.run_dir import load_run

    run, recipe = load_run(run_dir)
    model, _ = load_model(run, recipe)
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def test_lifecycle_through_the_cli(trained_run, tmp_path, alpaca_files):
    run = trained_run

    result = invoke("eval", run, "--base", "--min", "token_f1=0")
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    for key in ("loss", "perplexity", "exact_match", "token_f1", "rouge_l", "samples", "wall_time_s"):
        assert key in metrics["tuned"] and key in metrics["base"]
    assert metrics["tuned"]["samples"] == 8 and metrics["wall_time_s"] > 0
    assert metrics["delta"]["loss"] == pytest.approx(metrics["tuned"]["loss"] - metrics["base"]["loss"])
    assert len((run / "eval" / "predictions.jsonl").read_text().splitlines()) == 16
    result = invoke("eval", run, "--split", alpaca_files[1], "--max-samples", "3", "--min", "token_f1=1.5")
    assert result.exit_code == 1 and "below threshold: token_f1" in result.output
    assert json.loads((run / "eval" / "metrics.json").read_text())["tuned"]["samples"] == 3
    result = invoke("eval", run, "--split", tmp_path / "missing.jsonl")
    assert result.exit_code == 2 and "--split" in result.output

    # Export before any merge: it merges first, then writes and verifies the GGUF.
    result = invoke("export", run, "--format", "gguf", "--quant", "f32", "--verify", "llama.cpp", "--prompts", "4")
    assert result.exit_code == 0, result.output
    assert "merging first" in result.output and "verification" in result.output
    assert f"ollama create NAME -f {run / 'export' / 'model-f32.Modelfile'} (chatml chat template)" in result.output
    from ftune.llamacpp import llama_cpp_available

    if llama_cpp_available():  # the llamacpp extra: the f32 file must give the same replies in llama.cpp
        checked = json.loads((run / "export" / "model-f32.gguf.verify.json").read_text())["llama_cpp"]
        assert checked["prompts"] == 4 and checked["same_text"] == 1.0 and checked["same_tokens"] == 1.0, checked
    else:
        assert "llama.cpp check skipped: llama-cpp-python is not installed; pip install 'ftune[llamacpp]'" in result.output
    parity = json.loads((run / "merged" / "parity.json").read_text())
    assert parity["passed"] and parity["max_abs_logit_diff"] <= 1e-5 and parity["next_token_agreement"] == 1.0
    gguf_file = run / "export" / "model-f32.gguf"
    report = json.loads((run / "export" / "model-f32.gguf.verify.json").read_text())
    assert gguf_file.is_file() and report["passed"] and report["size_bytes"] == gguf_file.stat().st_size

    # The GGUF file loads back with transformers and computes what the adapter model computes.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run / "merged")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Repeat the word.\n\nmoon"}], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    reloaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32).eval()
    with torch.no_grad():
        gguf_logits = reloaded(input_ids=torch.tensor([ids])).logits[0]
    reference = adapter_logits(run, ids)
    assert_close(gguf_logits, reference, steps=forward_steps(2) + 1)  # + the merge rounding W + BA once

    result = invoke("export", run, "--format", "safetensors", "--out", tmp_path / "st")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "st.verify.json").read_text())["passed"]
    # The safetensors export holds the merged weights unchanged, computes what the adapter model computes,
    # and carries the run's tokenizer with its chat template.
    from safetensors.torch import load_file

    merged_weights = load_file(str(run / "merged" / "model.safetensors"))
    exported_weights = {k: v for f in sorted((tmp_path / "st").glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    assert exported_weights.keys() == merged_weights.keys()
    assert all(torch.equal(exported_weights[k], merged_weights[k]) for k in merged_weights)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "st").eval()
    with torch.no_grad():
        exported_logits = exported(input_ids=torch.tensor([ids])).logits[0]
    assert exported_logits.dtype == torch.float32
    assert_close(exported_logits, reference, steps=forward_steps(2) + 1)
    exported_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "st")
    assert exported_tokenizer.chat_template == tokenizer.chat_template
    assert exported_tokenizer.apply_chat_template([{"role": "user", "content": "Repeat the word.\n\nmoon"}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=True)["input_ids"] == ids

    # generate streams the same greedy reply the eval generator produces, for the adapter and the merged model.
    from ftune.generation import generate_replies
    from ftune.tuned import load_model
    from ftune.run_dir import load_run

    run_obj, recipe = load_run(run)
    model, tok = load_model(run_obj, recipe)
    expected = generate_replies(model, tok, [[{"role": "user", "content": "moon"}]], max_new_tokens=6, batch_size=1)[0].text
    for extra in ([], ["--merged"]):
        result = invoke("generate", run, "--prompt", "moon", "--max-new-tokens", "6", *extra)
        assert result.exit_code == 0, result.output
        assert result.stdout.strip() == expected

    result = invoke("chat", run, "--max-new-tokens", "6", input="moon\n/exit\nnot read\n")
    assert result.exit_code == 0, result.output
    assert expected in result.stdout and result.stdout.count(">>> ") == 2
    result = invoke("chat", run, "--max-new-tokens", "6", input="moon\n")  # end of input also ends it
    assert result.exit_code == 0 and expected in result.stdout


def test_merged_folder_loads_with_plain_transformers(trained_run, tmp_path):
    run = trained_run
    if not (run / "merged" / "parity.json").is_file():
        assert invoke("merge", run).exit_code == 0
    ids = list(range(5, 40))
    out = tmp_path / "logits.pt"
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(run / 'merged')!r}).eval()
        tokenizer = AutoTokenizer.from_pretrained({str(run / 'merged')!r})
        assert tokenizer.chat_template, "chat template missing"
        assert tokenizer.eos_token_id in model.generation_config.eos_token_id
        with torch.no_grad():
            torch.save(model(input_ids=torch.tensor([{ids}])).logits[0], {str(out)!r})
        leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('ftune', 'peft'))
        assert not leaked, leaked
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_close(torch.load(out), adapter_logits(run, ids), steps=forward_steps(2) + 1)


@pytest.mark.parametrize("case", sorted(PARITY_CASES))
def test_merge_parity(case, tmp_path, tiny_llama_dir, alpaca_files):
    from ftune.merge import run_merge

    run = build_run(tmp_path / "run", tiny_llama_dir, alpaca_files, method=PARITY_CASES[case], merge={"parity_samples": 2})
    report = run_merge(run, echo=lambda *_: None)
    assert report.passed, report
    assert report.max_abs_logit_diff <= 1e-5 and report.next_token_agreement == 1.0
    assert json.loads((run / "merged" / "parity.json").read_text())["passed"]
    assert not (run / "merged" / "adapter_config.json").exists()
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_merge_dtype_bfloat16_is_checked_with_a_looser_tolerance(tmp_path, tiny_llama_dir, alpaca_files):
    from safetensors import safe_open

    from ftune.merge import run_merge

    run = build_run(tmp_path / "run", tiny_llama_dir, alpaca_files)
    report = run_merge(run, out=tmp_path / "bf16", dtype="bfloat16", echo=lambda *_: None)
    assert report.passed and report.dtype == "bfloat16"
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as weights:
        assert weights.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.bfloat16


def lora_delta(adapter_dir: Path, module: str, scale: float) -> torch.Tensor:
    from safetensors.torch import load_file

    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    a = next(v for k, v in weights.items() if f"{module}.lora_A" in k)
    b = next(v for k, v in weights.items() if f"{module}.lora_B" in k)
    return scale * (b.double() @ a.double())


def test_qlora_merges_into_the_full_precision_base(tmp_path, tiny_llama_dir, alpaca_files):
    from safetensors.torch import load_file

    from ftune.merge import run_merge

    module = "layers.0.self_attn.q_proj"
    run = build_run(tmp_path / "run", tiny_llama_dir, alpaca_files, quantization={"bits": 4})
    report = run_merge(run, echo=lambda *_: None)
    assert report.passed and report.base == "full_precision"
    # The merged model is off from the 4-bit model that was trained by the quantization error, and says so.
    assert report.vs_quantized_max_abs_logit_diff > 10 * report.max_abs_logit_diff

    base = load_file(str(tiny_llama_dir / "model.safetensors"))[f"model.{module}.weight"].double()
    merged = load_file(str(run / "merged" / "model.safetensors"))[f"model.{module}.weight"].double()
    delta = lora_delta(run / "model", module, scale=8 / 4)
    assert (merged - (base + delta)).abs().max().item() < 1e-6  # base + delta in fp32, nothing re-quantized

    # merge.base: dequantized folds the same adapter into the dequantized 4-bit weights instead,
    # and then reproduces the quantized model that was trained.
    recipe = (run / "recipe.yaml").read_text().replace("base: full_precision", "base: dequantized")
    (run / "recipe.yaml").write_text(recipe)
    gap = report.vs_quantized_max_abs_logit_diff
    report = run_merge(run, out=tmp_path / "dequantized", echo=lambda *_: None)
    assert report.passed and report.base == "dequantized" and report.max_abs_logit_diff < gap / 3
    dequantized = load_file(str(tmp_path / "dequantized" / "model.safetensors"))[f"model.{module}.weight"].double()
    assert (dequantized - base).abs().max().item() > 1e-3  # carries the 4-bit rounding
    assert (dequantized - merged).abs().max().item() > 1e-3


def test_failed_parity_writes_nothing(tmp_path, tiny_llama_dir, alpaca_files):
    run = build_run(tmp_path / "run", tiny_llama_dir, alpaca_files, merge={"tolerance": 1e-12, "parity_samples": 1})
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    result = invoke("merge", run)
    assert result.exit_code == 1
    assert "nothing was written" in result.output
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


def fake_run(root: Path, tiny_llama_dir, alpaca_files, method: dict, files: dict[str, str]) -> Path:
    """A run directory on disk without loading any model (for checks that must fail before loading one)."""
    from ftune.run_dir import prepare_run_dir, write_json_atomic

    train, eval_file = alpaca_files
    recipe = validate_recipe(recipe_dict(tiny_llama_dir, train, eval_file, root, method=method))
    run = prepare_run_dir(recipe, overwrite=True, resume=False)
    for name, text in files.items():
        (run.model / name).parent.mkdir(parents=True, exist_ok=True)
        (run.model / name).write_text(text)
    write_json_atomic(run.summary, {})
    return run.root


@pytest.mark.parametrize("name", UNMERGEABLE)
def test_unmergeable_methods_say_what_to_do_instead(name, tmp_path, tiny_llama_dir, alpaca_files):
    files = {"config.json": "{}"} if name == "full" else {"adapter_config.json": "{}"}
    run = fake_run(tmp_path / "run", tiny_llama_dir, alpaca_files, {"name": name}, files)
    result = invoke("merge", run)
    assert result.exit_code == 2
    [line] = result.output.strip().splitlines()
    if "config.json" in files:
        assert "already holds complete weights" in line and "ftune export" in line
    else:
        assert method_class(name).unmergeable_hint in line


def test_export_and_generate_reject_bad_options(tmp_path, tiny_llama_dir, alpaca_files):
    run = fake_run(tmp_path / "run", tiny_llama_dir, alpaca_files, {"name": "lora"}, {"adapter_config.json": "{}"})
    for args, expected in (
        (["--format", "onnx"], "--format 'onnx': expected one of safetensors, gguf, gguf-lora"),
        (["--format", "gguf", "--quant", "q3_0"], "--quant 'q3_0': expected one of f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0"),
        (["--format", "safetensors", "--quant", "f16"], "--quant applies to --format gguf only"),
        (["--format", "safetensors", "--verify", "llama.cpp"], "--verify llama.cpp runs GGUF files; add --format gguf"),
        (["--format", "gguf", "--verify", "ollama"], "--verify 'ollama': expected one of llama.cpp"),
    ):
        result = invoke("export", run, *args)
        assert result.exit_code == 2 and expected in result.output
    result = invoke("generate", run, "--prompt", "hi", "--merged")
    assert result.exit_code == 2 and "ftune merge" in result.output
    assert invoke("merge", run, "--dtype", "int8").exit_code == 2


def test_dequantized_merge_base_needs_a_quantized_run(tiny_llama_dir, alpaca_files, tmp_path):
    train, eval_file = alpaca_files
    for quantization in ({}, {"bits": 8}):
        with pytest.raises(FtuneError, match=r"merge.base: 'dequantized' applies to 4-bit runs"):
            validate_recipe(recipe_dict(tiny_llama_dir, train, eval_file, tmp_path, merge={"base": "dequantized"}, quantization=quantization))


@pytest.fixture(scope="module")
def classification_files(tmp_path_factory) -> tuple[Path, Path]:
    from tests.conftest import write_jsonl

    root = tmp_path_factory.mktemp("classification")
    good, bad = ["good", "great", "fine", "nice"], ["bad", "awful", "poor", "sad"]
    rows = [{"text": f"it was {w}", "label": "pos" if w in good else "neg"} for w in good + bad]
    held_out = [{"text": f"so {w} really", "label": "pos" if w in good else "neg"} for w in good + bad]
    return write_jsonl(root / "train.jsonl", rows * 2), write_jsonl(root / "eval.jsonl", held_out)


def test_classification_run_merges_and_evaluates(tmp_path, tiny_llama_dir, classification_files):
    from ftune.evaluate import run_evaluation
    from ftune.tuned import load_plain_model
    from ftune.merge import run_merge

    run = build_run(tmp_path / "run", tiny_llama_dir, classification_files, task="classification")
    report = run_merge(run, echo=lambda *_: None)
    assert report.passed and report.next_token_agreement == 1.0
    merged = load_plain_model(run / "merged", "classification")
    assert merged.config.id2label == {0: "neg", 1: "pos"}

    result = run_evaluation(run, echo=lambda *_: None)
    assert result.tuned["samples"] == 8
    matrix = result.tuned["confusion_matrix"]
    assert matrix["labels"] == ["neg", "pos"] and sum(map(sum, matrix["rows_true_columns_predicted"])) == 8
    assert sum(row[i] for i, row in enumerate(matrix["rows_true_columns_predicted"])) / 8 == result.tuned["accuracy"]
    predictions = (run / "eval" / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 8 and json.loads(predictions[0])["reference"] in ("neg", "pos")


@pytest.mark.parametrize("method,sections", [
    ("prompt", {}), ("prefix", {}), ("ptuning", {}), ("lora", {"quantization": {"bits": 4}}),
])
def test_eval_scores_prompt_learning_and_quantized_runs(method, sections, tmp_path, tiny_llama_dir, alpaca_files):
    from ftune.data.heldout import load_heldout, tokenize_heldout
    from ftune.evaluate import run_evaluation
    from ftune.scoring import response_loss
    from ftune.run_dir import load_run
    from ftune.tuned import load_model

    run_dir = build_run(tmp_path / "run", tiny_llama_dir, alpaca_files, method={"name": method}, **sections)
    report = run_evaluation(run_dir, max_samples=4, echo=lambda *_: None)
    assert report.tuned["samples"] == 4 and 0 < report.tuned["loss"] < 20

    # The response loss equals the model's own loss (peft shifts labels past virtual tokens itself).
    run, recipe = load_run(run_dir)
    model, tokenizer = load_model(run, recipe)
    [example] = tokenize_heldout(tokenizer, load_heldout(run, recipe)[:1], recipe.data)
    with torch.no_grad():
        own = model(input_ids=torch.tensor([example["input_ids"]]), labels=torch.tensor([example["labels"]])).loss.item()
    assert response_loss(model, tokenizer, [example], batch_size=8) == approx(own, steps=forward_steps(2))


def test_full_fine_tune_exports_its_own_weights(tmp_path, tiny_llama_dir, alpaca_files):
    from ftune.export import run_export

    run = build_run(tmp_path / "run", tiny_llama_dir, alpaca_files, method={"name": "full"})
    messages = []
    report = run_export(run, "gguf", quant="f32", echo=messages.append)
    assert report.passed and report.max_abs_logit_diff <= report.tolerance
    assert not (run / "merged").exists() and str(run / "model") in messages[0]

    # The GGUF file computes what the run's trained weights compute, not what the base model computes.
    from transformers import AutoModelForCausalLM

    from ftune.generation import generate_replies
    from ftune.run_dir import load_run
    from ftune.tuned import load_model

    ids = list(range(5, 40))
    model, tokenizer = load_model(*load_run(run))
    with torch.no_grad():
        reference = model(input_ids=torch.tensor([ids])).logits[0]
        exported = AutoModelForCausalLM.from_pretrained(report.path.parent, gguf_file=report.path.name, dtype=torch.float32).eval()
        gguf_logits = exported(input_ids=torch.tensor([ids])).logits[0]
        base_logits = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()(input_ids=torch.tensor([ids])).logits[0]
    assert_close(gguf_logits, reference, steps=forward_steps(2))
    assert (gguf_logits - base_logits).abs().max().item() > 0.1

    # generate --merged uses RUN/model (no merge needed) and replies as the run's model does.
    expected = generate_replies(model, tokenizer, [[{"role": "user", "content": "moon"}]], max_new_tokens=4, batch_size=1)[0].text
    result = invoke("generate", run, "--prompt", "moon", "--max-new-tokens", "4", "--merged")
    assert result.exit_code == 0, result.output
    assert expected and result.stdout.strip() == expected
