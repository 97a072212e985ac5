"""Where peft's prefixes start (method.init of prefix, ptuning_v2 and mam) on a tiny Llama: gated prefixes leave a
fresh model equal to the base and open as they train; token-initialised prefixes are the base reading real tokens."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ftune.methods import METHODS, apply_method
from ftune.methods.prefix_start import PrefixGate, start_from_tokens
from ftune.recipe.methods import method_class

VOCAB, LAYERS = 128, 2
IDS = torch.randint(3, VOCAB, (3, 9), generator=torch.Generator().manual_seed(7))
MASK = torch.ones_like(IDS).index_fill(1, torch.tensor([0, 1]), 0)  # left padding on every row: masks reach the gates
KNOBS = {
    "prefix": {}, "prefix-direct": {"prefix_projection": False}, "ptuning_v2": {},
    "mam": {"bottleneck": 16}, "mam-projection": {"bottleneck": 16, "prefix_projection": True, "encoder_hidden_size": 32},
}
GATED = [case for case in sorted(KNOBS) if case != "ptuning_v2"]  # the cases whose default start is init: gated


def tiny() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                                        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)).eval()


def fresh(case: str, **knobs):
    name = case.split("-")[0]
    config = method_class(name).model_validate({"name": name, "num_virtual_tokens": 4, **KNOBS[case], **knobs})
    return apply_method(tiny(), config, "causal_lm").eval()


def logits(model, ids=IDS, mask=MASK) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def real(mask=MASK):
    return mask.bool()  # padding positions' logits are nobody's


@pytest.mark.parametrize("case", sorted(KNOBS))
def test_a_fresh_gated_model_is_the_base(case):
    model = fresh(case) if case in GATED else fresh(case, init="gated")
    assert model.peft_config["default"].num_virtual_tokens == 4
    difference = (logits(model) - logits(tiny()))[real()].abs().max().item()
    assert difference < 1e-4
    random = fresh(case, init="random")  # what peft's own start gives: far from the base
    assert (logits(random) - logits(tiny()))[real()].abs().max().item() > 100 * max(difference, 1e-6)


def test_the_defaults_are_gated_except_ptuning_v2_which_starts_from_tokens():
    defaults = {name: method_class(name).model_validate({"name": name}).init for name in ("prefix", "ptuning_v2", "mam")}
    assert defaults == {"prefix": "gated", "ptuning_v2": "tokens", "mam": "gated"}


def test_gates_open_as_they_train_and_the_prefixes_follow():
    model = fresh("prefix")
    prefixes = model.prompt_encoder["default"].embedding.weight.detach().clone()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(6):
        loss = model(input_ids=IDS, attention_mask=MASK, labels=IDS.masked_fill(~real(), -100)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    gates = torch.cat([m.gate.detach() for m in model.modules() if isinstance(m, PrefixGate) and m.gate.requires_grad])
    assert gates.numel() == LAYERS * 4 and (gates > 0).any()  # one gate per layer and head, opened by the first step
    assert not torch.equal(model.prompt_encoder["default"].embedding.weight, prefixes)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("case", ["prefix", "prefix-direct", "mam", "ptuning_v2"])
def test_token_prefixes_are_the_base_reading_those_tokens_first(case):
    model = fresh(case) if case == "ptuning_v2" else fresh(case, init="tokens")  # ptuning_v2's default
    tokens = torch.tensor([[11, 12, 13, 14]])
    assert start_from_tokens(model, tokens)
    ones = torch.ones_like(IDS)
    expected = logits(tiny(), torch.cat([tokens.expand(len(IDS), -1), IDS], 1), torch.ones((len(IDS), 4 + IDS.shape[1])))[:, 4:]
    assert (logits(model, mask=ones) - expected).abs().max().item() < 1e-4 * max(1.0, expected.abs().max().item())


def test_a_reloaded_run_keeps_its_gates_and_their_attention(tmp_path):
    model = fresh("ptuning_v2", init="gated")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, PrefixGate):
                module.gate.uniform_(0.5, 1.5)
    METHODS["ptuning_v2"].save(model, tmp_path)
    reloaded = METHODS["ptuning_v2"].load(tiny, tmp_path).eval()
    assert reloaded.get_base_model().config._attn_implementation == model.get_base_model().config._attn_implementation
    expected = logits(model)
    assert (expected - logits(tiny()))[real()].abs().max() > 1e-3  # the opened gates let the prefixes in
    torch.testing.assert_close(logits(reloaded)[real()], expected[real()], rtol=0, atol=1e-5)
