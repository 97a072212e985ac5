"""UniPELT on tiny Llamas: the untrained model is the base, each part enters scaled by its own gate
(or unscaled with gates: false), only UniPELT's parameters train, and families it cannot attach to are refused."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from ftune.errors import FtuneError
from ftune.methods import METHODS, apply_method, count_parameters
from ftune.methods.unipelt import FAMILIES, GatedAdapterMLP, GatedLoraLinear, GatedPrefixAttention, unipelt_state_dict
from ftune.recipe.methods import method_class
from tests.tolerances import assert_close, forward_steps

HIDDEN, HEADS, KV_HEADS, LAYERS, VOCAB = 64, 4, 2, 2, 128


def llama_config(**extra) -> LlamaConfig:
    return LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
                       num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, pad_token_id=0, **extra)


def tiny(cls=LlamaForCausalLM, seed: int = 0, **extra):
    torch.manual_seed(seed)
    return cls(llama_config(**extra)).eval()


def unipelt(**knobs):
    return method_class("unipelt").model_validate({"name": "unipelt", **knobs})


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


IDS = torch.randint(3, VOCAB, (3, 9), generator=torch.Generator().manual_seed(7))


@pytest.mark.numerical
@pytest.mark.parametrize("gates", [True, False])
@pytest.mark.parametrize(("cls", "task"), [(LlamaForCausalLM, "causal_lm"), (LlamaForSequenceClassification, "classification")])
def test_a_fresh_unipelt_model_computes_what_the_base_computes(cls, task, gates):
    expected = logits(tiny(cls, num_labels=3), IDS)
    model = apply_method(tiny(cls, num_labels=3), unipelt(gates=gates), task)
    assert_close(logits(model, IDS), expected, steps=forward_steps(LAYERS))


@pytest.mark.numerical
def test_bias_terms_of_the_output_projection_are_not_counted_twice():
    expected = logits(tiny(attention_bias=True), IDS)
    model = apply_method(tiny(attention_bias=True), unipelt(), "causal_lm")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.prefix_values.normal_()
    # The prefix adds a bias-free projection: with its gate closed almost shut the base output comes back.
    for layer in model.model.layers:
        with torch.no_grad():
            layer.self_attn.gate.proj.weight.zero_()
            layer.self_attn.gate.proj.bias.fill_(-60.0)
    assert_close(logits(model, IDS), expected, steps=forward_steps(LAYERS))


def test_trainable_count_is_lora_prefix_adapter_and_three_gates_per_layer():
    model = apply_method(tiny(), unipelt(lora={"r": 4}, prefix={"num_virtual_tokens": 5}, adapter={"bottleneck": 8}), "causal_lm")
    head_dim, kv = HIDDEN // HEADS, KV_HEADS * HIDDEN // HEADS
    lora = 4 * (HIDDEN + HIDDEN) + 4 * (HIDDEN + kv)  # q: 64 -> 64, v: 64 -> 32
    prefix = 2 * HEADS * 5 * head_dim
    adapter = HIDDEN * 8 + 8 + 8 * HIDDEN + HIDDEN
    gates = 3 * (HIDDEN + 1)
    trainable, _ = count_parameters(model)
    assert trainable == LAYERS * (lora + prefix + adapter + gates)
    assert set(unipelt_state_dict(model)) == {n for n, p in model.named_parameters() if p.requires_grad}


def test_without_gates_there_are_no_gate_parameters():
    model = apply_method(tiny(), unipelt(gates=False), "causal_lm")
    assert not any(".gate." in name for name, _ in model.named_parameters())


def _set_gate(module, bias: float) -> None:
    with torch.no_grad():
        module.gate.proj.weight.zero_()
        module.gate.proj.bias.fill_(bias)


@pytest.mark.numerical
def test_each_part_is_scaled_by_its_own_gate():
    """With a gate's weights zero and bias b, its part enters times sigmoid(b); gates: false is the plain sum."""
    gated = apply_method(tiny(), unipelt(), "causal_lm")
    plain = apply_method(tiny(), unipelt(gates=False), "causal_lm")
    torch.manual_seed(5)
    with torch.no_grad():
        trained = {n: torch.randn_like(p) * 0.1 for n, p in unipelt_state_dict(plain).items()}
        for models in (gated, plain):
            for n, p in unipelt_state_dict(models).items():
                if n in trained:
                    p.copy_(trained[n])
    layer, plain_layer = gated.model.layers[0], plain.model.layers[0]
    attention, plain_attention = layer.self_attn, plain_layer.self_attn
    for module, bias in ((attention.base_layer.q_proj, 0.7), (attention, -0.4), (layer.mlp, 1.3)):
        _set_gate(module, bias)
    x = torch.randn(2, 6, HIDDEN)
    position = gated.model.rotary_emb(x, torch.arange(6)[None])
    with torch.no_grad():
        # LoRA: q and v share the layer's LoRA gate.
        for proj in ("q_proj", "v_proj"):
            gated_proj, plain_proj = getattr(attention.base_layer, proj), getattr(plain_attention.base_layer, proj)
            base = gated_proj.base_layer(x)
            # Each side is a sum less the base it holds: its rounding is the base's size, whatever the difference's.
            assert_close(gated_proj(x) - base, (plain_proj(x) - base) * torch.sigmoid(torch.tensor(0.7)), steps=1, scale=base.abs().max().item())
        # Prefix: compare the prefix's contribution on top of each model's own (LoRA-adapted) attention.
        def prefix_term(block):
            with_prefix, _ = block(hidden_states=x, position_embeddings=position, attention_mask=None)
            without, _ = block.base_layer(hidden_states=x, position_embeddings=position, attention_mask=None)
            return with_prefix - without
        _set_gate(attention.base_layer.q_proj, 30.0)  # LoRA fully open, so both models' queries agree
        outputs = attention.base_layer(hidden_states=x, position_embeddings=position, attention_mask=None)[0].abs().max().item()
        assert_close(prefix_term(attention), prefix_term(plain_attention) * torch.sigmoid(torch.tensor(-0.4)), steps=1, scale=outputs)
        # Adapter: the gate reads the feed-forward output, which is also the adapter's input.
        h = layer.mlp.base_layer(x)
        assert_close(layer.mlp(x) - h, (plain_layer.mlp(x) - h) * torch.sigmoid(torch.tensor(1.3)), steps=1, scale=h.abs().max().item())


@pytest.mark.numerical
def test_prefix_term_is_attention_over_the_learned_keys_and_values():
    model = apply_method(tiny(), unipelt(gates=False, prefix={"num_virtual_tokens": 3}), "causal_lm")
    block = model.model.layers[1].self_attn
    torch.manual_seed(2)
    with torch.no_grad():
        block.prefix_values.normal_()
        x = torch.randn(1, 4, HIDDEN)
        position = model.model.rotary_emb(x, torch.arange(4)[None])
        with_prefix, _ = block(hidden_states=x, position_embeddings=position, attention_mask=None)
        without, _ = block.base_layer(hidden_states=x, position_embeddings=position, attention_mask=None)
        head_dim = HIDDEN // HEADS
        query = block.base_layer.q_proj(x).view(1, 4, HEADS, head_dim).transpose(1, 2)
        weights = torch.softmax(query @ block.prefix_keys.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
        mixed = (weights @ block.prefix_values).transpose(1, 2).reshape(1, 4, HIDDEN)
        assert_close(with_prefix - without, block.base_layer.o_proj(mixed), steps=1, scale=without.abs().max().item())


def test_modules_sit_where_the_paper_puts_them():
    model = apply_method(tiny(), unipelt(), "causal_lm")
    for layer in model.model.layers:
        assert isinstance(layer.self_attn, GatedPrefixAttention) and isinstance(layer.mlp, GatedAdapterMLP)
        assert isinstance(layer.self_attn.base_layer.q_proj, GatedLoraLinear) and isinstance(layer.self_attn.base_layer.v_proj, GatedLoraLinear)
        assert not isinstance(layer.self_attn.base_layer.k_proj, GatedLoraLinear)
    assert model.model.layers[0].self_attn.layer_idx == 0  # attribute reads reach the wrapped attention


def test_unsupported_family_is_refused_with_the_supported_list():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=16))
    with pytest.raises(FtuneError, match=r"method: unipelt needs Llama-family .*'gpt2' is not one of .*llama.*mistral.*qwen2"):
        apply_method(model, unipelt(), "causal_lm")


def test_reload_on_another_architecture_is_refused(tmp_path):
    model = apply_method(tiny(), unipelt(), "causal_lm")
    METHODS["unipelt"].save(model, tmp_path)
    from transformers import MistralConfig, MistralForCausalLM

    other = MistralForCausalLM(MistralConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
                                             num_attention_heads=HEADS, num_key_value_heads=KV_HEADS))
    with pytest.raises(FtuneError, match="trained on a llama model, not mistral"):
        METHODS["unipelt"].load(lambda: other, tmp_path)


def test_generation_with_the_key_value_cache_matches_generation_without():
    """The prefix and LoRA act per query token, so cached decoding (one new token a step) sees the same model."""
    model = apply_method(tiny(eos_token_id=2, bos_token_id=1), unipelt(), "causal_lm")
    with torch.no_grad():
        for param in unipelt_state_dict(model).values():
            param.normal_(std=0.3)
    ids, mask = IDS[:2, :6], torch.ones_like(IDS[:2, :6])
    cached = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def family_model(model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
                                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HIDDEN // HEADS, pad_token_id=0)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.numerical
@pytest.mark.parametrize("model_type", FAMILIES)
def test_every_listed_family_starts_as_its_base_and_trains(model_type):
    expected = logits(family_model(model_type), IDS)
    model = apply_method(family_model(model_type), unipelt(), "causal_lm")
    assert_close(logits(model, IDS), expected, steps=forward_steps(LAYERS))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
