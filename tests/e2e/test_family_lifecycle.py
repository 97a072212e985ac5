"""BLOOM and Qwen2 through the whole lifecycle from the CLI: train (LoRA) -> merge -> export GGUF -> reload."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import invoke_ok, recipe_dict, write_recipe
from ftune.families import FAMILIES
from tests.unit.test_families import save_family_model


@pytest.mark.parametrize("model_type", ["bloom", "qwen2"])
def test_train_merge_export_reload(model_type, tmp_path, alpaca_files):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = save_family_model(model_type, tmp_path / "base")
    tokenizer = AutoTokenizer.from_pretrained(base)
    train, eval_file = alpaca_files
    run = tmp_path / "run"
    # BLOOM is a base model with no chat layout of its own, so its recipe names one; Qwen2 uses its family's (ChatML).
    data = {"chat_template": "chatml"} if FAMILIES[model_type].chat_template is None else {}
    invoke_ok("train", write_recipe(tmp_path / "recipe.yaml", recipe_dict(base, train, eval_file, run, data=data)))
    invoke_ok("merge", run)
    assert json.loads((run / "merged" / "parity.json").read_text())["passed"]
    result = invoke_ok("export", run, "--format", "gguf", "--quant", "f16")
    report = json.loads((run / "export" / "model-f16.gguf.verify.json").read_text())
    assert report["passed"] and report["tokenizer_match"], report

    merged = AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32).eval()
    exported = AutoModelForCausalLM.from_pretrained(run / "export", gguf_file="model-f16.gguf", dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer("Repeat the word.\n\nmoon")["input_ids"]])
    with torch.no_grad():
        expected, got = merged(input_ids=ids).logits, exported(input_ids=ids).logits
    assert (got - expected).abs().max() <= 1e-2 * expected.abs().max()  # f16 rounding, the export's own tolerance
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    assert "Exported:" in result.output


@pytest.mark.parametrize("model_type", sorted(t for t, f in FAMILIES.items() if f.gguf))
def test_llama_cpp_runs_every_gguf_family_as_transformers_does(model_type, tmp_path):
    """With the llamacpp extra: each family ftune exports to GGUF gives the same greedy replies in llama.cpp (f32)."""
    pytest.importorskip("llama_cpp", reason="needs the llamacpp extra: pip install 'ftune[llamacpp]'")
    from ftune.export import export_gguf
    from ftune.llamacpp import verify_with_llama_cpp

    folder = save_family_model(model_type, tmp_path / "model")
    if FAMILIES[model_type].chat_template is None:  # a base-model family: the prompts are rendered in ChatML
        from transformers import AutoTokenizer

        from ftune.data.templates import read_chat_template

        tokenizer = AutoTokenizer.from_pretrained(folder)
        tokenizer.chat_template = read_chat_template("chatml")
        tokenizer.save_pretrained(folder)
    assert export_gguf(folder, tmp_path / "model.gguf", quant="f32").passed
    prompts = [[{"role": "user", "content": text}] for text in ("moon", "red sun", "Repeat the word twice.\n\ncat", "tree")]
    checked = verify_with_llama_cpp(tmp_path / "model.gguf", folder, prompts, quant="f32", max_new_tokens=8, batch_size=4)
    assert checked.same_tokens == 1.0 and checked.same_text == 1.0, checked
