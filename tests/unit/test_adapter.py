"""Unit tests for native Houlsby bottleneck adapters on tiny, randomly initialised models."""

from __future__ import annotations

import json
import pathlib
from types import SimpleNamespace
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from ftune.methods.adapter import (
    SUBLAYER_BLOCKS,
    BottleneckAdapterLayer,
    ParallelAdapterLayer,
    adapter_state_dict,
    apply_bottleneck_adapters,
    load_bottleneck_adapters,
    save_bottleneck_adapters,
)
from tests.tolerances import assert_close

HIDDEN, LAYERS, VOCAB = 64, 2, 128


def tiny_llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def tiny_bert(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # Dropout off so train-mode losses are deterministic and comparable step to step.
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=32,
                        bos_token_id=1, eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


BUILDERS: dict[str, Callable[..., nn.Module]] = {"llama": tiny_llama, "bert": tiny_bert, "gpt2": tiny_gpt2}


def batch(name: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(3, VOCAB, (4, 12), generator=generator)
    labels = torch.tensor([0, 1, 2, 1]) if name == "bert" else input_ids.clone()
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def logits(model: nn.Module, name: str) -> torch.Tensor:
    inputs = {k: v for k, v in batch(name).items() if k != "labels"}
    with torch.no_grad():
        return model(**inputs).logits


def train(model: nn.Module, name: str, steps: int = 8) -> list[float]:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(**batch(name)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("placement", ["both", "attention", "feed_forward"])
def test_identity_at_init(name: str, placement: str) -> None:
    model = BUILDERS[name]()
    expected = logits(model, name)
    wrapped = apply_bottleneck_adapters(model, reduction_factor=8, placement=placement)
    assert len(wrapped) == LAYERS * (2 if placement == "both" else 1)
    assert torch.equal(logits(model, name), expected)


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("reduction_factor", [4, 16])
def test_only_adapters_trainable_and_count_matches_formula(name: str, reduction_factor: int) -> None:
    model = BUILDERS[name]()
    wrapped = apply_bottleneck_adapters(model, reduction_factor=reduction_factor)
    h, b = HIDDEN, HIDDEN // reduction_factor
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == len(wrapped) * (2 * h * b + b + h)
    assert set(trainable) == set(adapter_state_dict(model))
    assert all(".adapter." in n for n in trainable)
    for module_name in wrapped:
        assert isinstance(model.get_submodule(module_name), BottleneckAdapterLayer)
        assert f"{module_name}.base_layer.weight" in dict(model.named_parameters())
        assert f"{module_name}.adapter.down.weight" in trainable


def test_wrapped_module_names_per_architecture() -> None:
    assert apply_bottleneck_adapters(tiny_llama()) == [
        "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj",
    ]
    # "output.dense" must not also catch "attention.output.dense" twice, nor the pooler.
    assert apply_bottleneck_adapters(tiny_bert(), placement="feed_forward") == [
        "bert.encoder.layer.0.output.dense", "bert.encoder.layer.1.output.dense",
    ]
    assert apply_bottleneck_adapters(tiny_gpt2(), placement="attention") == [
        "transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj",
    ]


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_training_changes_exactly_the_adapters(name: str) -> None:
    model = BUILDERS[name]()
    apply_bottleneck_adapters(model, reduction_factor=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = train(model, name)
    assert losses[-1] < losses[0]
    adapter_names = set(adapter_state_dict(model))
    for n, p in model.named_parameters():
        if n in adapter_names:
            assert not torch.equal(p, before[n]), f"adapter parameter {n} did not change"
        else:
            assert torch.equal(p, before[n]), f"base parameter {n} changed"


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_save_load_round_trip(name: str, tmp_path: pathlib.Path) -> None:
    model = BUILDERS[name]()
    base_logits = logits(model, name)
    wrapped = apply_bottleneck_adapters(model, reduction_factor=8, placement="both", non_linearity="silu")
    train(model, name, steps=3)
    model.eval()
    trained_logits = logits(model, name)
    assert not torch.equal(trained_logits, base_logits)

    save_bottleneck_adapters(model, tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert set(saved) == set(adapter_state_dict(model))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config == {
        "reduction_factor": 8, "placement": "both", "non_linearity": "silu",
        "wrapped_modules": wrapped, "model_type": name,
    }

    restored = load_bottleneck_adapters(BUILDERS[name](), tmp_path)
    assert torch.equal(logits(restored.eval(), name), trained_logits)
    assert all(p.requires_grad == (".adapter." in n) for n, p in restored.named_parameters())


def test_load_rejects_other_architecture(tmp_path: pathlib.Path) -> None:
    model = tiny_llama()
    apply_bottleneck_adapters(model)
    save_bottleneck_adapters(model, tmp_path)
    with pytest.raises(ValueError, match="model_type 'llama'"):
        load_bottleneck_adapters(tiny_gpt2(), tmp_path)


def test_unknown_architecture_is_rejected() -> None:
    model = nn.Linear(4, 4)
    model.config = SimpleNamespace(model_type="mamba")
    with pytest.raises(ValueError, match="mamba") as info:
        apply_bottleneck_adapters(model)
    assert "llama" in str(info.value) and "method: lora" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"placement": "sideways"}, "placement 'sideways'"),
        ({"non_linearity": "tanhh"}, "non_linearity 'tanhh'"),
        ({"reduction_factor": 0}, "reduction_factor"),
    ],
)
def test_bad_options_are_rejected_before_touching_the_model(kwargs: dict, message: str) -> None:
    model = tiny_llama()
    expected = logits(model, "llama")
    with pytest.raises(ValueError, match=message):
        apply_bottleneck_adapters(model, **kwargs)
    assert all(p.requires_grad for p in model.parameters())
    assert not any(isinstance(m, BottleneckAdapterLayer) for m in model.modules())
    assert torch.equal(logits(model, "llama"), expected)


def test_applying_twice_is_rejected() -> None:
    model = tiny_llama()
    apply_bottleneck_adapters(model)
    with pytest.raises(ValueError, match="already has bottleneck adapters"):
        apply_bottleneck_adapters(model)


def test_adapter_matches_base_dtype() -> None:
    model = tiny_llama().to(torch.bfloat16)
    expected = logits(model, "llama")
    apply_bottleneck_adapters(model)
    assert all(p.dtype == torch.bfloat16 for p in adapter_state_dict(model).values())
    assert torch.equal(logits(model, "llama"), expected)


class Int8Linear(nn.Module):
    """Stands in for a quantized linear layer: integer weight, floating output."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features
        self.weight = nn.Parameter(torch.randint(-8, 8, (out_features, in_features), dtype=torch.int8),
                                   requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.to(x.dtype).T


def test_quantized_base_gets_float32_adapter() -> None:
    layer = BottleneckAdapterLayer(Int8Linear(8, 16), reduction_factor=4, non_linearity="relu")
    assert all(p.dtype == torch.float32 for p in layer.adapter.parameters())
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, layer.base_layer(x))
    assert layer.out_features == 16  # attribute reads fall through to the wrapped module


# --- parallel adapters (He et al. 2022): beside the block, reading its input ---


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("placement", ["both", "attention", "feed_forward"])
def test_parallel_identity_at_init(name: str, placement: str) -> None:
    model = BUILDERS[name]()
    expected = logits(model, name)
    wrapped = apply_bottleneck_adapters(model, reduction_factor=8, placement=placement, style="parallel", scaling=4.0)
    assert len(wrapped) == LAYERS * (2 if placement == "both" else 1)
    assert all(isinstance(model.get_submodule(n), ParallelAdapterLayer) for n in wrapped)
    assert torch.equal(logits(model, name), expected)


@pytest.mark.numerical
def test_parallel_adapter_adds_its_scaled_bottleneck_of_the_block_input() -> None:
    model = tiny_llama()
    apply_bottleneck_adapters(model, reduction_factor=8, style="parallel", scaling=4.0)
    torch.manual_seed(3)
    for name, param in adapter_state_dict(model).items():
        with torch.no_grad():
            param.normal_(std=0.1)
    layer = model.model.layers[0]
    x = torch.randn(2, 5, HIDDEN)
    with torch.no_grad():
        down, up = layer.mlp.adapter.down, layer.mlp.adapter.up
        expected = layer.mlp.base_layer(x) + 4.0 * up(torch.nn.functional.gelu(down(x)))
        assert_close(layer.mlp(x), expected, steps=1)
        # Attention returns (output, weights): the adapter reads hidden_states= and adds to the output only.
        position = model.model.rotary_emb(x, torch.arange(5)[None])
        out, weights = layer.self_attn(hidden_states=x, position_embeddings=position, attention_mask=None)
        plain, _ = layer.self_attn.base_layer(hidden_states=x, position_embeddings=position, attention_mask=None)
        adapter = layer.self_attn.adapter
        assert_close(out, plain + 4.0 * adapter.up(torch.nn.functional.gelu(adapter.down(x))), steps=1)


def test_parallel_round_trip_records_style_and_scaling(tmp_path: pathlib.Path) -> None:
    model = tiny_llama()
    wrapped = apply_bottleneck_adapters(model, reduction_factor=8, style="parallel", scaling=2.0, placement="feed_forward")
    train(model, "llama", steps=3)
    model.eval()
    trained = logits(model, "llama")
    save_bottleneck_adapters(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["style"] == "parallel" and config["scaling"] == 2.0 and config["wrapped_modules"] == wrapped
    restored = load_bottleneck_adapters(tiny_llama(), tmp_path)
    assert isinstance(restored.model.layers[0].mlp, ParallelAdapterLayer)
    assert torch.equal(logits(restored.eval(), "llama"), trained)


def test_parallel_adapters_refuse_post_norm_encoders_and_list_what_works() -> None:
    with pytest.raises(ValueError, match=r"parallel bottleneck adapters do not support model_type 'bert'.*gpt2.*llama"):
        apply_bottleneck_adapters(tiny_bert(), style="parallel")


def test_scaling_belongs_to_parallel_adapters() -> None:
    with pytest.raises(ValueError, match="set style: parallel"):
        apply_bottleneck_adapters(tiny_llama(), scaling=4.0)


@pytest.mark.parametrize("model_type", sorted(SUBLAYER_BLOCKS))
def test_parallel_adapters_attach_to_every_listed_family_as_the_identity(model_type: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = {"n_embd": HIDDEN, "n_layer": LAYERS, "n_head": 4} if model_type == "gpt2" else {
        "hidden_size": HIDDEN, "intermediate_size": 128, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": HIDDEN // 4}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, vocab_size=VOCAB, pad_token_id=0, **sizes)).eval()
    expected = logits(model, "llama")
    wrapped = apply_bottleneck_adapters(model, reduction_factor=8, style="parallel", scaling=4.0)
    assert len(wrapped) == 2 * LAYERS
    assert torch.equal(logits(model, "llama"), expected)
    losses = train(model, "llama", steps=4)
    assert losses[-1] < losses[0]
