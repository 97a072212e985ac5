"""The quickstart lifecycle on real SmolLM2-135M weights: a short LoRA run, merged and exported to GGUF,
whose merged and exported models answer eval prompts exactly as the adapter model does (greedy)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import REPO
from tests.conftest import invoke_ok as invoke

pytestmark = pytest.mark.slow
PROMPTS = 4


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.chdir(REPO)  # the recipe names its data relative to the repository
    out = tmp_path_factory.mktemp("smollm2") / "run"
    invoke(
        "train", "recipes/smollm2-135m/lora-quickstart.yaml",
        "--set", "training.max_steps=8", "--set", "training.save_steps=100", "--set", f"output_dir={out}",
    )
    return out


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def greedy(model, tokenizer, prompts):
    from ftune.generation import generate_replies

    return [r.text for r in generate_replies(model, tokenizer, prompts, max_new_tokens=16, batch_size=PROMPTS)]


def test_merged_and_gguf_exports_generate_like_the_adapter(quickstart_run):
    from transformers import AutoModelForCausalLM

    from ftune.data.heldout import conversations, load_heldout
    from ftune.generation import prompt_and_reference
    from ftune.tuned import load_merged, load_model
    from ftune.run_dir import load_run

    run_dir = quickstart_run
    invoke("merge", run_dir)
    parity = json.loads((run_dir / "merged" / "parity.json").read_text())
    assert parity["passed"] and parity["next_token_agreement"] == 1.0

    run, recipe = load_run(run_dir)
    prompts = [prompt_and_reference(c)[0] for c in conversations(load_heldout(run, recipe))[:PROMPTS]]
    adapter, tokenizer = load_model(run, recipe)
    expected = greedy(adapter, tokenizer, prompts)
    del adapter
    merged, _ = load_merged(run, recipe)
    assert greedy(merged, tokenizer, prompts) == expected
    del merged

    for quant in ("f16", "q8_0"):
        invoke("export", run_dir, "--format", "gguf", "--quant", quant)
        report = json.loads((run_dir / "export" / f"model-{quant}.gguf.verify.json").read_text())
        assert report["passed"], report
        gguf_file = run_dir / "export" / f"model-{quant}.gguf"
        exported = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32).eval()
        assert greedy(exported, tokenizer, prompts) == expected, quant
        del exported


def test_llama_cpp_replies_like_transformers_on_the_exported_files(quickstart_run):
    pytest.importorskip("llama_cpp", reason="needs the llamacpp extra: pip install 'ftune[llamacpp]'")
    rows = []
    for quant in ("f16", "q8_0", "q4_0"):
        out = quickstart_run / "export" / f"llamacpp-{quant}.gguf"
        result = invoke("export", quickstart_run, "--format", "gguf", "--quant", quant, "--out", out, "--verify", "llama.cpp")
        checked = json.loads((out.parent / f"{out.name}.verify.json").read_text())["llama_cpp"]
        rows.append(f"| {quant} | {checked['prompts']} | {checked['same_text']:.2f} | {checked['same_tokens']:.2f} | {checked['stopped_rate']:.2f} |")
        assert checked["same_tokens"] == 1.0, checked  # llama.cpp's tokenizer splits the prompts as transformers does
        assert checked["stopped_rate"] == 1.0, checked  # the tuned model ends its ISO dates in llama.cpp too
        if quant == "f16":
            assert checked["same_text"] == 1.0, checked
        assert "llama.cpp: same reply as transformers" in result.output
    print("| quant | prompts | same reply | same tokens | stopped |", "| --- | --- | --- | --- | --- |", *rows, sep="\n")


def test_gguf_lora_in_llama_cpp_replies_like_the_merged_model(quickstart_run):
    """Base f16 + adapter f16 in llama.cpp give the merged model's greedy replies on the held-out prompts (the merged
    f16 file is held to the same replies above, so the two files answer alike)."""
    pytest.importorskip("llama_cpp", reason="needs the llamacpp extra: pip install 'ftune[llamacpp]'")
    result = invoke("export", quickstart_run, "--format", "gguf-lora", "--quant", "f16", "--verify", "llama.cpp")
    report = json.loads((quickstart_run / "export" / "adapter-f16.gguf.verify.json").read_text())
    assert report["passed"] and report["next_token_agreement"] == 1.0, report
    checked = report["llama_cpp"]
    assert checked["prompts"] == 16 and checked["same_text"] == 1.0 and checked["stopped_rate"] == 1.0, checked
    sizes = {name: (quickstart_run / "export" / name).stat().st_size for name in ("adapter-f16.gguf", "base-f16.gguf")}
    assert sizes["adapter-f16.gguf"] < sizes["base-f16.gguf"] / 20  # r16 adapters: a few MiB beside a 270 MB base
    print(f"gguf-lora: {checked['same_text']:.0%} of {checked['prompts']} replies equal; sizes {sizes}; {result.output[-300:]}")
