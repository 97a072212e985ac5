"""Compiled decoder layers: few compilations over ragged batches, the eager loss and gradients, and auto's decision."""

from __future__ import annotations

import json

import pytest
import torch

from ftune.training.compilation import COMPILE_FIGURES, PROBE_STEPS, CompileFigures, compile_decoder_layers, decide
from ftune.data.collate import PackCollator, PadCollator
from ftune.training.label_positions import keeps_labelled_positions, loss_at_labelled_positions
from tests.conftest import invoke_ok
from tests.tolerances import assert_close, forward_steps
from tests.unit.test_label_positions import loss_and_grads, lora_model


class CountingBackend:
    """A torch.compile backend that runs the captured graph as it is and counts the graphs it was given."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, graph, example_inputs):
        self.graphs += 1
        return graph.forward


def ragged_features(length: int, rows: int = 3) -> list[dict]:
    generator = torch.Generator().manual_seed(length)
    features = []
    for row in range(rows):
        ids = torch.randint(3, 700, (length + row,), generator=generator).tolist()
        features.append({"input_ids": ids, "labels": [-100] * (length // 2) + ids[length // 2:]})
    return features


def train_step(model, batch) -> None:
    inputs = {k: v for k, v in batch.items() if k != "logits_to_keep"}
    model(**inputs).loss.backward()


def trained_lora(tiny_llama_dir, forward: str = "peft"):
    from ftune.methods.lora_forward import use_addmm_forward

    model = lora_model(tiny_llama_dir)
    model.config.use_cache = False  # as the Trainer sets it (training.use_cache defaults to false)
    if forward == "addmm":  # as apply_lora trains it
        assert use_addmm_forward(model) > 0
    return model


# Both LoRA forwards: peft's own, and the addmm one ftune trains with.
FORWARDS = pytest.mark.parametrize("forward", ["peft", "addmm"])


@FORWARDS
def test_ragged_packed_and_padded_batches_stop_recompiling(tiny_llama_dir, forward):
    model = trained_lora(tiny_llama_dir, forward)
    backend = CountingBackend()
    assert compile_decoder_layers(model, backend=backend) == 2
    pack, pad = PackCollator(), PadCollator(0)
    counts = []
    for step, length in enumerate((7, 12, 9, 20, 15, 11, 26, 8)):
        train_step(model, (pack if step % 2 else pad)(ragged_features(length)))
        counts.append(backend.graphs)
    # Sizes are symbolic from the start: each layout (padded rows; one packed row, whose batch size of 1 is
    # specialised) compiles once, the first layer (input without gradient) apart from the others. After that no
    # new graph, whichever layout or length comes, and both layers share every graph.
    assert counts[0] == 2
    assert counts[-1] == counts[1] == 4, counts


def test_packed_sdpa_rows_of_any_layout_compile_once(tiny_llama_dir):
    from ftune.packed_attention import verify
    from tests.unit.test_packed_attention import prompt_rows

    model = trained_lora(tiny_llama_dir, "addmm")
    assert verify(model) is None
    backend = CountingBackend()
    compile_decoder_layers(model, backend=backend)
    pack = PackCollator(share_prefix=True)
    counts = []
    for step, examples in enumerate((3, 5, 4, 6, 7, 3, 5, 8)):  # other example counts, lengths and prefixes every step
        train_step(model, pack(prompt_rows(300, count=examples, prefix=5 + step)))
        counts.append(backend.graphs)
    # The attention runs eager between the layer's compiled pieces; its per-example loop never reaches dynamo.
    assert counts[0] > 0 and counts[-1] == counts[0], counts


def test_evaluation_runs_the_eager_layers(tiny_llama_dir):
    model = trained_lora(tiny_llama_dir)
    backend = CountingBackend()
    compile_decoder_layers(model, backend=backend)
    model.eval()
    with torch.no_grad():
        model(**PadCollator(0)(ragged_features(9)))
    assert backend.graphs == 0


@pytest.mark.numerical
@pytest.mark.parametrize("collator", [PadCollator(0), PackCollator()], ids=["padded", "packed"])
def test_compiled_layers_give_the_eager_loss_and_gradients(tiny_llama_dir, collator):
    # aot_eager traces forward and backward as inductor does (AOTAutograd, decompositions) without generating code.
    # The addmm LoRA forward, the one ftune trains with (test_lora_forward ties it to peft's eager forward).
    batch = keeps_labelled_positions(collator)(ragged_features(10))
    eager_loss, eager_grads = loss_and_grads(trained_lora(tiny_llama_dir, "addmm"), batch, loss_at_labelled_positions())
    compiled = trained_lora(tiny_llama_dir, "addmm")
    compile_decoder_layers(compiled, backend="aot_eager")
    compiled_loss, compiled_grads = loss_and_grads(compiled, batch, loss_at_labelled_positions())
    assert_close(compiled_loss, eager_loss, steps=forward_steps(2))
    for name, grad in eager_grads.items():
        assert_close(compiled_grads[name], grad, steps=forward_steps(2, backward=True), msg=name)


@pytest.mark.parametrize("precision", ["bf16", "no", "fp16"])
def test_auto_compiles_only_when_the_remaining_steps_pay_for_it(precision):
    assert not decide(step_time_s=1.0, remaining_steps=10, precision=precision).compile
    long_run = decide(step_time_s=2.0, remaining_steps=2000, precision=precision)
    assert long_run.compile
    figures = COMPILE_FIGURES.get(precision, COMPILE_FIGURES["bf16"])
    assert f"compiling costs ~{figures.cost_s:.0f} s; figures from a {figures.measured_on}" in long_run.reason


def test_auto_in_float32_needs_a_longer_run_than_in_bf16():
    # float32 compiles to a smaller speedup (its GEMMs already dominate), so the run bf16 first pays on stays eager.
    first_paying = next(n for n in range(1, 100_000) if decide(step_time_s=2.0, remaining_steps=n, precision="bf16").compile)
    assert not decide(step_time_s=2.0, remaining_steps=first_paying, precision="no").compile


def test_training_compile_true_trains_with_compiled_layers(make_recipe, monkeypatch):
    import ftune.training.compilation

    backend = CountingBackend()
    monkeypatch.setattr(ftune.training.compilation, "BACKEND", backend)
    recipe = make_recipe(training={"compile": True, "max_steps": 4})
    result = invoke_ok("train", recipe)
    assert "compile: on (training.compile: true); 2 decoder layers" in result.output
    assert backend.graphs >= 1
    summary = json.loads((recipe.parent / "run" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["train_loss"] > 0


@pytest.fixture
def free_compiling(monkeypatch):
    """Compiling costs nothing, so auto compiles whenever a step would be saved."""
    import ftune.training.compilation

    free = CompileFigures(0.0, 1.2, "test")
    monkeypatch.setattr(ftune.training.compilation, "COMPILE_FIGURES", {"bf16": free, "no": free})


def test_training_compile_auto_probes_then_decides(make_recipe, monkeypatch, free_compiling):
    import ftune.training.compilation

    backend = CountingBackend()
    monkeypatch.setattr(ftune.training.compilation, "BACKEND", backend)
    steps = PROBE_STEPS + 3
    result = invoke_ok("train", make_recipe(training={"compile": "auto", "max_steps": steps}))
    assert f"compile: on (auto: {steps - PROBE_STEPS - 1} steps left" in result.output
    assert backend.graphs >= 1


def test_training_compile_auto_skips_a_short_run(make_recipe, monkeypatch):
    import ftune.training.compilation

    backend = CountingBackend()
    monkeypatch.setattr(ftune.training.compilation, "BACKEND", backend)
    result = invoke_ok("train", make_recipe(training={"max_steps": 3}))
    assert "compile: off (auto: 3 steps to train, too few to pay for compiling)" in result.output
    assert backend.graphs == 0


def test_compile_true_on_a_quantized_base_is_refused(make_recipe):
    from typer.testing import CliRunner

    from ftune.cli import app

    recipe = make_recipe(training={"compile": True}, quantization={"bits": 4})
    result = CliRunner().invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 2
    assert "training.compile: true, but a 4-bit bitsandbytes base" in result.output
    assert "set training.compile: auto or false" in result.output


@pytest.mark.parametrize("name", ["prefix", "ptuning_v2", "mam"])
def test_compile_true_with_layer_prefixes_is_refused(make_recipe, name):
    from typer.testing import CliRunner

    from ftune.cli import app

    result = CliRunner().invoke(app, ["validate", str(make_recipe(method={"name": name}, training={"compile": True}))])
    assert result.exit_code == 2
    assert f"training.compile: true, but method {name}: its prefixes reach each layer through the key/value cache" in result.output


def test_compile_auto_with_layer_prefixes_trains_eager(make_recipe, monkeypatch, free_compiling):
    import ftune.training.compilation

    backend = CountingBackend()
    monkeypatch.setattr(ftune.training.compilation, "BACKEND", backend)
    result = invoke_ok("train", make_recipe(method={"name": "prefix", "num_virtual_tokens": 4}, training={"max_steps": PROBE_STEPS + 3}))
    assert "compile: off (auto: method prefix: its prefixes reach each layer" in result.output
    assert backend.graphs == 0
