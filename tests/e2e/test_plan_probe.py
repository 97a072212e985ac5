"""ftune plan --probe on a small Llama: the memory estimate stays within 15% of the measured peak for full, LoRA and QLoRA."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import TOKENIZER_DIR, recipe_dict, write_jsonl, write_recipe


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory):
    """A 4-layer, hidden-512 Llama (13M parameters) with rows long enough to fill every batch:
    big enough that weights, optimizer states and activations are a real share of the peak."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("small-llama")
    LlamaForCausalLM(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    words = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree"]
    rows = [{"instruction": f"Repeat {i}.", "input": "", "output": " ".join(words[i:] + words[:i]) * 20} for i in range(8)]
    held_out = [{**row, "instruction": f"Say again {i}."} for i, row in enumerate(rows)]
    return root / "model", write_jsonl(root / "train.jsonl", rows * 4), write_jsonl(root / "eval.jsonl", held_out)


@pytest.mark.parametrize(
    ("label", "sections"),
    [
        ("full", {"method": {"name": "full"}}),
        ("lora", {"method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0}}),
        ("qlora", {"method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0}, "quantization": {"bits": 4}}),
    ],
)
def test_estimate_is_within_15_percent_of_the_measured_peak(small_llama, tmp_path, label, sections):
    model, train, eval_file = small_llama
    recipe = recipe_dict(model, train, eval_file, tmp_path / "run", **sections)
    recipe["model"]["dtype"] = "float32"
    recipe["data"].update(max_length=128, packing=False)
    recipe["training"].update(batch_size=4, learning_rate=1e-4, mixed_precision="no")
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    # A fresh process: the peak RSS of this one holds every earlier test.
    done = subprocess.run([sys.executable, "-m", "ftune", "plan", str(path), "--probe", "2", "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    estimate, measured = report["plan"]["total_mib"], report["probe"]["peak_mib"]
    print(f"{label}: estimate {estimate:.1f} MiB, measured peak RSS {measured:.1f} MiB, ratio {estimate / measured:.3f}")
    assert report["probe"]["trainable"] == report["plan"]["trainable"]
    assert report["probe"]["steps"] == 2 and report["probe"]["step_time_s"] > 0 and report["probe"]["tokens_per_second"] > 0
    assert report["probe"]["total_steps"] == 4 and report["probe"]["projected_s"] == pytest.approx(4 * report["probe"]["step_time_s"])
    assert 0.85 <= estimate / measured <= 1.15
