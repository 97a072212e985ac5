"""The plan's shape in the row length: linear with gradient checkpointing, and the logits stop growing past the loss chunk."""

from __future__ import annotations

import json

import pytest

from ftune.recipe import load_recipe
from ftune.training.chunked_loss import LOSS_CHUNK
from ftune.training.plan import HIDDEN_STATES_COPIES, MIB, estimate_memory


def activations(make_recipe, tiny_llama_dir, length: int, precision: str, checkpointing: bool = True, batch: int = 1) -> float:
    recipe = load_recipe(make_recipe(data={"max_length": length},
                                     training={"gradient_checkpointing": checkpointing, "batch_size": batch}))
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    return estimate_memory(recipe, config, device="cpu", precision=precision).activations_mib


@pytest.mark.parametrize("precision", ["no", "bf16"])
@pytest.mark.parametrize("checkpointing", [True, False], ids=["checkpointing", "no checkpointing"])
def test_activations_grow_linearly_in_length_and_the_logits_stop_at_the_chunk(make_recipe, tiny_llama_dir, precision, checkpointing):
    def at(length):
        return activations(make_recipe, tiny_llama_dir, length, precision, checkpointing)

    below = (at(LOSS_CHUNK) - at(LOSS_CHUNK // 2)) / (LOSS_CHUNK // 2)  # MiB per token, the head's logits included
    above = (at(4 * LOSS_CHUNK) - at(2 * LOSS_CHUNK)) / (2 * LOSS_CHUNK)
    assert (at(8 * LOSS_CHUNK) - at(4 * LOSS_CHUNK)) / (4 * LOSS_CHUNK) == pytest.approx(above)  # a constant slope
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    per_row = config["vocab_size"] * (12 if precision == "no" else 16)  # float32 logits, log-softmax, gradient (+ 16-bit output, gradient)
    hidden_states = HIDDEN_STATES_COPIES * config["hidden_size"] * 4 * (config["num_hidden_layers"] + 1)  # at most float32
    # Past the chunk the logits stop growing; the layers' share grows on, with the hidden states the chunked loss reads.
    assert per_row - hidden_states - 1e-6 <= (below - above) * MIB < per_row
    assert above > 0

