"""BLOOM and Qwen2 through the whole lifecycle from the CLI: train (LoRA) -> merge -> export GGUF -> reload."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import TOKENIZER_DIR, invoke_ok, recipe_dict, write_recipe
from tests.unit.test_families import sizes


@pytest.mark.parametrize("model_type", ["bloom", "qwen2"])
def test_train_merge_export_reload(model_type, tmp_path, alpaca_files):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **sizes(model_type))
    torch.manual_seed(0)
    base = tmp_path / "base"
    AutoModelForCausalLM.from_config(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    train, eval_file = alpaca_files
    run = tmp_path / "run"
    invoke_ok("train", write_recipe(tmp_path / "recipe.yaml", recipe_dict(base, train, eval_file, run)))
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
