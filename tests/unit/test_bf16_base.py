"""The frozen base held in bf16 under bf16 autocast: the same loss, adapter gradients and training as a float32 base,
to the rounding of the embeddings (tests/tolerances.py), for every adapter family; and only where it applies."""

from __future__ import annotations

import pytest
import torch

from ftune.methods import apply_method
from ftune.training.base_dtype import describe_base_dtype, hold_frozen_base_in_bf16, holds_base_in_bf16
from ftune.recipe import load_recipe
from tests.tolerances import bf16_base_tolerance, bf16_base_training_tolerance

METHODS = [
    {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
    {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "use_dora": True},
    {"name": "adalora"},
    {"name": "ia3"},
    {"name": "loha", "r": 4, "alpha": 8},
    {"name": "lokr", "r": 4, "alpha": 8},
    {"name": "oft"},
    {"name": "vera"},
    {"name": "prefix", "num_virtual_tokens": 4},
    {"name": "prompt", "num_virtual_tokens": 4},
    {"name": "adapter"},
    {"name": "mam"},
    {"name": "unipelt"},
]


def compared(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The gradients a comparison can hold: AdaLoRA's singular values (lora_E) start at zero and their gradients
    differ between two identical float32-base builds already (by ~1% of their largest entry here), so no comparison
    across builds bounds them; its lora_A and lora_B are compared."""
    return {name: grad for name, grad in grads.items() if ".lora_E." not in name}


def method_id(method: dict) -> str:
    return method["name"] + ("-dora" if method.get("use_dora") else "")


def build(recipe, tiny_llama_dir, *, bf16_base: bool = False, rounded_embeddings: bool = False):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = apply_method(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32), recipe.method, recipe.task)
    if bf16_base:
        assert hold_frozen_base_in_bf16(model) > 0
    if rounded_embeddings:  # float32 weights holding the values the bf16 embedding holds
        for module in model.modules():
            if isinstance(module, torch.nn.Embedding) and not module.weight.requires_grad:
                module.weight.data = module.weight.data.to(torch.bfloat16).float()
    return model


def batch(vocab: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 24), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def loss_and_grads(model, inputs) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # forced: on an AVX2-only CPU auto would train in float32
        loss = model(**inputs).loss
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.numerical
@pytest.mark.parametrize("method", METHODS, ids=method_id)
def test_bf16_base_gives_the_float32_base_loss_and_adapter_gradients(make_recipe, tiny_llama_dir, method):
    recipe = load_recipe(make_recipe(method=method))
    reference, held = build(recipe, tiny_llama_dir, bf16_base=False), build(recipe, tiny_llama_dir, bf16_base=True)
    trained = {n for n, p in held.named_parameters() if p.requires_grad}
    assert trained and all(p.dtype == torch.float32 for n, p in held.named_parameters() if n in trained)
    assert describe_base_dtype(held) == "bfloat16" and describe_base_dtype(reference) == "float32"
    inputs = batch(held.config.vocab_size)
    loss, grads = loss_and_grads(held, inputs)
    expected_loss, expected_grads = loss_and_grads(reference, inputs)
    layers = held.config.num_hidden_layers
    tol = bf16_base_tolerance(layers=layers, scale=abs(expected_loss))
    assert loss == pytest.approx(expected_loss, rel=tol["rtol"], abs=tol["atol"])
    assert grads.keys() == expected_grads.keys() and grads
    for name, expected in compared(expected_grads).items():
        assert grads[name].dtype == torch.float32
        scale = expected.abs().max().item()
        torch.testing.assert_close(grads[name], expected, **bf16_base_tolerance(layers=layers, backward=True, scale=scale), msg=name)


@pytest.mark.numerical
@pytest.mark.parametrize("method", [m for m in METHODS if not m.get("use_dora")], ids=method_id)
def test_bf16_base_is_bit_identical_to_a_float32_base_with_the_same_embedding_values(make_recipe, tiny_llama_dir, method):
    """Autocast casts each float32 linear weight with the rounding the one-time cast used, so with the embeddings'
    bf16 rounding given to both sides, nothing else differs: the same bits, no tolerance. Not DoRA: it computes its
    weight norm from the base weight itself, outside autocast's matmuls, in the weight's dtype (within the tolerance
    of the test above)."""
    recipe = load_recipe(make_recipe(method=method))
    held = build(recipe, tiny_llama_dir, bf16_base=True)
    reference = build(recipe, tiny_llama_dir, rounded_embeddings=True)
    inputs = batch(held.config.vocab_size)
    loss, grads = loss_and_grads(held, inputs)
    expected_loss, expected_grads = loss_and_grads(reference, inputs)
    assert loss == expected_loss
    assert grads.keys() == expected_grads.keys() and grads
    for name, expected in compared(expected_grads).items():
        assert torch.equal(grads[name], expected), name


@pytest.mark.numerical
@pytest.mark.parametrize("method", [METHODS[0], {"name": "adapter"}], ids=method_id)
def test_a_few_training_steps_over_a_bf16_base_end_with_the_float32_base_losses(make_recipe, tiny_llama_dir, method):
    recipe = load_recipe(make_recipe(method=method))
    lr, steps = 1e-3, 4
    runs = {}
    for held in (False, True):
        model = build(recipe, tiny_llama_dir, bf16_base=held)
        start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        losses, l1 = [], []
        for step in range(steps + 1):  # the last forward reads the loss after `steps` updates
            loss, grads = loss_and_grads(model, batch(model.config.vocab_size, seed=step))
            losses.append(loss)
            l1.append(sum(g.abs().sum().item() for g in grads.values()))
            if step < steps:
                optimizer.step()
        assert all(s.dtype == torch.float32 for state in optimizer.state.values() for s in state.values() if s.dim())
        runs[held] = losses, l1
        moved = [(p.detach() - start[n]).abs().max().item() for n, p in model.named_parameters() if p.requires_grad]
    (held_losses, _), (expected, gradient_l1) = runs[True], runs[False]
    layers = model.config.num_hidden_layers
    for step, (got, want) in enumerate(zip(held_losses, expected)):
        tolerance = bf16_base_training_tolerance(layers=layers, loss=want, lr=lr, steps=step, gradient_l1=max(gradient_l1[: step + 1]))
        assert abs(got - want) <= tolerance, (step, got, want, tolerance)
    assert moved and min(moved) > lr / 2  # every trained tensor took its steps over the bf16 base


def test_plan_counts_the_frozen_base_at_two_bytes_only_where_it_is_held_in_bf16(make_recipe, tiny_llama_dir):
    import json

    from ftune.training.layout import build_layout
    from ftune.training.plan import RUNTIME_MIB, estimate_memory

    config = json.loads((tiny_llama_dir / "config.json").read_text())
    layout = build_layout(config)
    norms = layout.layers * layout.layer_norm_params
    lora = load_recipe(make_recipe())
    held = estimate_memory(lora, config, precision="bf16")
    assert held.weights_mib * 2**20 == (layout.total_params - norms) * 2 + norms * 4
    assert any("held in bf16" in note for note in held.notes)
    # The cast reads the whole float32 checkpoint while writing the bf16 copies: on CPU that is a floor of the peak.
    assert held.load_mib * 2**20 == layout.total_params * 4 + held.weights_mib * 2**20 + RUNTIME_MIB["cpu"] * 2**20
    assert held.total_mib >= held.load_mib
    assert estimate_memory(lora, config, device="cuda", precision="bf16").load_mib == 0  # GPU counters exclude host memory
    for recipe, precision in [(lora, "no"), (lora, "fp16"), (load_recipe(make_recipe(method={"name": "full"})), "bf16"),
                              (load_recipe(make_recipe(quantization={"bits": 4})), "bf16")]:
        plan = estimate_memory(recipe, config, precision=precision)
        assert not any("held in bf16" in note for note in plan.notes), (recipe.method.name, precision)
        assert plan.load_mib == 0
        if not recipe.quantization.bits:  # float32 weights (plus, under 16-bit autocast, the 16-bit copies autocast makes)
            assert plan.weights_mib * 2**20 >= layout.total_params * 4


def test_only_adapter_methods_on_a_float32_unquantized_base_in_bf16_sft_or_pretraining_hold_it(make_recipe):
    assert holds_base_in_bf16(load_recipe(make_recipe()), "bf16")
    assert holds_base_in_bf16(load_recipe(make_recipe(method={"name": "adapter"})), "bf16")
    assert not holds_base_in_bf16(load_recipe(make_recipe()), "no")
    assert not holds_base_in_bf16(load_recipe(make_recipe()), "fp16")
    for name in ("full", "freeze", "bitfit"):
        assert not holds_base_in_bf16(load_recipe(make_recipe(method={"name": name})), "bf16"), name
    assert not holds_base_in_bf16(load_recipe(make_recipe(quantization={"bits": 4})), "bf16")
    assert not holds_base_in_bf16(load_recipe(make_recipe(model={"dtype": "bfloat16"})), "bf16")


def test_tied_embeddings_stay_tied_and_keep_a_float32_residual_stream(make_recipe, tiny_llama_dir):
    recipe = load_recipe(make_recipe())
    model = build(recipe, tiny_llama_dir, bf16_base=True)
    base = model.get_base_model()
    assert base.lm_head.weight is base.model.embed_tokens.weight and base.lm_head.weight.dtype == torch.bfloat16
    assert all(m.weight.dtype == torch.float32 for n, m in base.named_modules() if n.endswith("norm"))
    assert base.model.embed_tokens(torch.tensor([[3, 4]])).dtype == torch.float32


@pytest.mark.numerical
def test_a_bf16_input_reaches_the_lora_adapter_without_a_float32_round_trip(make_recipe, tiny_llama_dir):
    """Under autocast a bf16 input (o_proj's, down_proj's) went up to the adapter's float32 and straight back down
    for its GEMM; both casts are exact, so skipping them changes no bit of the output or of any gradient."""
    from ftune.methods.lora_forward import addmm_lora_linear

    model = build(load_recipe(make_recipe(method=METHODS[0])), tiny_llama_dir, bf16_base=True)
    layer = model.get_base_model().model.layers[0].self_attn.o_proj
    assert type(layer) is addmm_lora_linear()
    lora_A, lora_B, scaling = layer.lora_A["default"], layer.lora_B["default"], layer.scaling["default"]
    torch.nn.init.normal_(lora_B.weight)  # B starts at zero, which would hide the adapter's path
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16).requires_grad_()

    def run(forward):
        layer.zero_grad()
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = forward(x)
        out.float().square().sum().backward()
        return out, x.grad.clone(), lora_A.weight.grad.clone(), lora_B.weight.grad.clone()

    def round_trip(x):  # the forward before: peft's input cast to the adapter's dtype
        result = layer.base_layer(x)
        hidden = lora_A(x.to(lora_A.weight.dtype)).reshape(-1, lora_A.out_features)
        return torch.addmm(result.reshape(-1, result.shape[-1]), hidden, lora_B.weight.t(), alpha=scaling).view(result.shape)

    for got, expected in zip(run(layer), run(round_trip)):
        assert got.dtype == expected.dtype and torch.equal(got, expected)


MAPPED = """
import gc, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from ftune.resources import current_rss_mib
from ftune.training.base_dtype import hold_frozen_base_in_bf16
config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                     num_key_value_heads=8, tie_word_embeddings=False)
LlamaForCausalLM(config).save_pretrained(sys.argv[1])  # float32 safetensors, ~180 MiB
gc.collect()
before = current_rss_mib()
model = LlamaForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)  # its tensors are views of the mapped file
model.requires_grad_(False)
float32 = sum(p.numel() for p in model.parameters()) * 4 / 2**20
hold_frozen_base_in_bf16(model)
gc.collect()
print(float32, current_rss_mib() - before)
"""


def test_the_cast_releases_the_float32_checkpoint_it_was_loaded_from(tmp_path):
    # The cast reads every float32 page of the memory-mapped checkpoint; while the norms still viewed the file those
    # pages stayed resident beside the bf16 copies (1.5x the float32 size instead of 0.5x).
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", MAPPED, str(tmp_path / "model")], capture_output=True, text=True, check=True)
    float32, held = map(float, out.stdout.split())
    assert held < 0.9 * float32, (float32, held)
