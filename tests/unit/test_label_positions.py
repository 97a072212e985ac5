"""The LM head at labelled positions only gives the model's own loss and gradients (fp32, to rounding), padded or packed."""

from __future__ import annotations

import pytest
import torch

from ftune.data.collate import PackCollator, PadCollator
from ftune.training.label_positions import keeps_labelled_positions, labelled_positions, labelled_positions_blocker, loss_at_labelled_positions
from tests.tolerances import assert_close, forward_steps


def features(seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for length, prompt in ((9, 5), (14, 10), (6, 2), (11, 8)):  # answers of 4, 4, 4 and 3 tokens after the prompt
        ids = torch.randint(3, 700, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def lora_model(tiny_llama_dir, dtype=torch.float32, target_modules="all-linear", **knobs):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=dtype),
                           LoraConfig(r=4, target_modules=target_modules, init_lora_weights=False, **knobs))
    return model.train()


def loss_and_grads(model, batch, loss_func=None, num_items=None):
    model.zero_grad()
    inputs = dict(batch)
    if loss_func is None:
        inputs.pop("logits_to_keep", None)
        loss = model(**inputs, num_items_in_batch=num_items).loss
    else:
        labels = inputs.pop("labels")
        loss = loss_func(model(**inputs), labels, num_items_in_batch=num_items)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def ftune_method(tiny_llama_dir, name: str, **knobs):
    from ftune.methods import apply_method
    from tests.unit.test_methods import loader, method

    model = apply_method(loader(tiny_llama_dir, "causal_lm")(), method(name, **knobs), "causal_lm")
    torch.manual_seed(1)
    with torch.no_grad():  # away from the identity start, so every part of the method is on the path
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.05)
    return model.train()


@pytest.mark.numerical
@pytest.mark.parametrize("collator", [PadCollator(0), PackCollator()], ids=["padded", "packed"])
@pytest.mark.parametrize("num_items", [None, 15], ids=["mean", "summed over the accumulation window"])
@pytest.mark.parametrize("name", ["lora", "prefix", "unipelt", "adapter"])
def test_same_loss_and_gradients_as_the_models_own_loss(tiny_llama_dir, collator, num_items, name):
    knobs = {"prefix": dict(num_virtual_tokens=4), "unipelt": dict(lora={"r": 4}, prefix={"num_virtual_tokens": 4}, adapter={"bottleneck": 16})}
    model = lora_model(tiny_llama_dir) if name == "lora" else ftune_method(tiny_llama_dir, name, **knobs.get(name, {}))
    batch = keeps_labelled_positions(collator)(features())
    positions = batch["logits_to_keep"]
    # Packed, only the answers' positions reach the head; padded, the union over rows (answers end at different places).
    assert 0 < len(positions) < batch["input_ids"].shape[1] * (0.5 if isinstance(collator, PackCollator) else 1.0)
    expected, expected_grads = loss_and_grads(model, batch, num_items=num_items)
    got, grads = loss_and_grads(model, batch, loss_at_labelled_positions(), num_items=num_items)
    assert_close(got, expected, steps=forward_steps(2))
    for name, grad in expected_grads.items():
        assert_close(grads[name], grad, steps=forward_steps(2, backward=True), msg=name)


def test_positions_are_those_whose_next_token_is_labelled():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, -100, -100, -100]])
    assert labelled_positions(labels).tolist() == [0, 1, 2]


def test_methods_that_prepend_virtual_tokens_keep_the_full_head(tiny_llama_dir):
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    assert "prepends virtual tokens" in labelled_positions_blocker(model, "prompt")
    assert labelled_positions_blocker(lora_model(tiny_llama_dir), "lora") is None
