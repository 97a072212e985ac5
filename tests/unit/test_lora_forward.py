"""The addmm LoRA forward: peft's outputs and gradients, peft's forward wherever it cannot serve, peft's saved adapter."""

from __future__ import annotations

import pytest
import torch

from ftune.data.collate import PackCollator
from ftune.methods.lora_forward import addmm_lora_linear, use_addmm_forward
from tests.unit.test_compilation import ragged_features
from tests.tolerances import assert_close, forward_steps
from tests.unit.test_label_positions import ftune_method, loss_and_grads, lora_model

STEPS = forward_steps(2)  # the tiny Llama's 2 layers


def batch():
    return PackCollator()(ragged_features(11))


def model_inputs(*dropped: str) -> dict:
    return {k: v for k, v in batch().items() if k not in ("logits_to_keep", *dropped)}


def swapped_count(model) -> int:
    return sum(type(module) is addmm_lora_linear() for module in model.modules())


@pytest.mark.numerical
@pytest.mark.parametrize("knobs", [{}, {"use_rslora": True}, {"lora_dropout": 0.1}], ids=["lora", "rslora", "dropout"])
def test_same_loss_and_gradients_as_pefts_forward(tiny_llama_dir, knobs):
    peft_model, addmm_model = lora_model(tiny_llama_dir, **knobs), lora_model(tiny_llama_dir, **knobs)
    assert use_addmm_forward(addmm_model) == 14  # 7 projections in each of the 2 layers
    torch.manual_seed(3)  # the same dropout masks: both draw them in the same order
    peft_loss, peft_grads = loss_and_grads(peft_model, batch())
    torch.manual_seed(3)
    addmm_loss, addmm_grads = loss_and_grads(addmm_model, batch())
    assert_close(addmm_loss, peft_loss, steps=STEPS)
    assert peft_grads.keys() == addmm_grads.keys() and any("lora_B" in name for name in peft_grads)
    for name, grad in peft_grads.items():
        assert_close(addmm_grads[name], grad, steps=forward_steps(2, backward=True), msg=name)


@pytest.mark.numerical
def test_bf16_autocast_matches_pefts_forward(tiny_llama_dir):
    peft_model, addmm_model = lora_model(tiny_llama_dir), lora_model(tiny_llama_dir)
    use_addmm_forward(addmm_model)
    inputs = model_inputs()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = peft_model(**inputs).logits, addmm_model(**inputs).logits
    assert got.dtype == expected.dtype == torch.bfloat16
    assert_close(got.float(), expected.float(), steps=STEPS, dtype=torch.bfloat16)


@pytest.mark.numerical
def test_a_bf16_base_with_fp32_adapters_promotes_as_peft_does(tiny_llama_dir):
    # peft keeps the adapters in float32 on a bf16 base
    peft_model, addmm_model = (lora_model(tiny_llama_dir, torch.bfloat16, ["q_proj"]) for _ in range(2))
    use_addmm_forward(addmm_model)
    inputs = model_inputs("labels")
    with torch.no_grad():
        expected, got = peft_model(**inputs).logits, addmm_model(**inputs).logits
    assert got.dtype == expected.dtype
    assert_close(got, expected, steps=STEPS)


@pytest.mark.numerical
def test_disabled_and_merged_adapters_take_pefts_forward(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    plain_base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    model = lora_model(tiny_llama_dir).eval()
    use_addmm_forward(model)
    inputs = model_inputs("labels")
    with torch.no_grad():
        adapted = model(**inputs).logits
        with model.disable_adapter():
            base = model(**inputs).logits
        model.merge_adapter()
        merged = model(**inputs).logits
        expected_base = plain_base(**inputs).logits
    assert not torch.allclose(adapted, base, atol=1e-3)  # the adapter changes the output
    assert_close(base, expected_base, steps=STEPS)  # and disabling it gives the base model's
    assert_close(merged, adapted, steps=STEPS + 1)  # + rounding W + BA once into each merged weight


@pytest.mark.numerical
def test_the_saved_adapter_is_pefts(tiny_llama_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = lora_model(tiny_llama_dir)
    use_addmm_forward(model)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32), tmp_path / "adapter")
    assert swapped_count(reloaded) == 0  # a plain peft model: nothing of ftune's in what was saved
    inputs = model_inputs("labels")
    with torch.no_grad():
        assert_close(reloaded.eval()(**inputs).logits, model.eval()(**inputs).logits, steps=STEPS)


@pytest.mark.parametrize(("knobs", "swapped"), [({}, 14), ({"use_dora": True}, 0)], ids=["lora", "dora"])
def test_ftune_lora_trains_with_the_addmm_forward_except_for_variants(tiny_llama_dir, knobs, swapped):
    model = ftune_method(tiny_llama_dir, "lora", r=4, dropout=0.0, **knobs)
    assert swapped_count(model) == swapped
