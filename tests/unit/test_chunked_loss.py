"""The head a chunk of positions at a time gives the loss and gradients of the head over all of them, and holds less."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from ftune.data.collate import PackCollator, PadCollator
from ftune.training.chunked_loss import chunked_loss, chunking_blocker
from ftune.training.label_positions import keeps_labelled_positions, labelled_positions, loss_at_labelled_positions, next_token_targets
from tests.tolerances import assert_close, forward_steps
from tests.unit.test_label_positions import loss_and_grads, lora_model

CHUNK = 8


def long_features(seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for length, prompt in ((40, 6), (33, 20), (28, 3)):  # 34, 13 and 25 answer tokens: several chunks of 8 per batch
        ids = torch.randint(3, 700, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


@pytest.mark.numerical
@pytest.mark.parametrize("collator", [PadCollator(0), PackCollator()], ids=["padded", "packed"])
@pytest.mark.parametrize("num_items", [None, 70], ids=["mean", "summed over the accumulation window"])
@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj", "lm_head"]], ids=["all-linear", "lora on the head"])
def test_chunked_loss_and_gradients_equal_the_head_over_all_positions(tiny_llama_dir, collator, num_items, targets):
    model = lora_model(tiny_llama_dir, target_modules=targets)
    whole = keeps_labelled_positions(collator)(long_features())
    chunked = keeps_labelled_positions(collator, chunk=CHUNK)(long_features())
    assert len(chunked["logits_to_keep"]) == 0 and chunked["output_hidden_states"]  # the head runs only in the loss
    assert len(whole["logits_to_keep"]) > 3 * CHUNK
    expected, expected_grads = loss_and_grads(model, whole, loss_at_labelled_positions(), num_items=num_items)
    got, grads = loss_and_grads(model, chunked, loss_at_labelled_positions(model=model, chunk=CHUNK), num_items=num_items)
    assert_close(got, expected, steps=forward_steps(2))
    assert any("lm_head" in name for name in grads) == ("lm_head" in targets)
    for name, grad in expected_grads.items():
        assert grad.abs().max() > 0, name
        assert_close(grads[name], grad, steps=forward_steps(2, backward=True), msg=name)


def test_rows_within_the_chunk_keep_the_positions_path(tiny_llama_dir):
    batch = keeps_labelled_positions(PadCollator(0), chunk=64)(long_features())
    assert "output_hidden_states" not in batch and len(batch["logits_to_keep"]) > 0


@pytest.mark.numerical
@pytest.mark.parametrize("num_items", [None, torch.tensor(50)], ids=["mean", "summed"])
def test_the_router_loss_and_divisor_are_those_of_the_whole_head(num_items):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=False)
    hidden = torch.randn(2, 30, 16, requires_grad=True)
    labels = torch.randint(0, 300, (2, 30))
    labels[0, :5] = labels[1, 20:] = -100
    aux = torch.tensor(0.37)
    positions = labelled_positions(labels)  # 0..28: the last position has no next token
    loss = loss_at_labelled_positions(0.02, SimpleNamespace(get_output_embeddings=lambda: head), chunk=7)
    whole = loss(SimpleNamespace(logits=head(hidden[:, positions]), aux_loss=aux), labels, num_items)
    chunked = loss(SimpleNamespace(logits=head(hidden)[:, :0], hidden_states=(hidden,), aux_loss=aux), labels, num_items)
    assert_close(chunked.detach(), whole.detach(), steps=1)
    direct = chunked_loss(head, hidden[:, positions].reshape(-1, 16), next_token_targets(labels)[:, positions].reshape(-1),
                          num_items, chunk=7)
    assert_close((direct + 0.02 * aux).detach(), whole.detach(), steps=1)


def test_heads_with_logit_transforms_are_not_chunked():
    plain = SimpleNamespace(config=SimpleNamespace(), get_output_embeddings=lambda: object())
    capped = SimpleNamespace(config=SimpleNamespace(final_logit_softcapping=30.0), get_output_embeddings=lambda: object())
    assert chunking_blocker(plain) is None
    assert "final_logit_softcapping" in chunking_blocker(capped)


LONG_ROW = 2048  # positions, all labelled
BIG_VOCAB = 50_000  # 2048 x 50,000 float32 logits: 410 MB per copy


def peak_growth_mib(chunk: int | None) -> float:
    """Peak RSS over the process's RSS before the step, for one loss step of a long row on a tiny, large-vocabulary Llama."""
    import resource

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=BIG_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=LONG_ROW))
    ids = torch.randint(0, BIG_VOCAB, (LONG_ROW,)).tolist()
    batch = keeps_labelled_positions(PadCollator(0), chunk=chunk)([{"input_ids": ids, "labels": ids}])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    labels = batch.pop("labels")
    loss_at_labelled_positions(model=model, chunk=chunk or LONG_ROW)(model(**batch), labels).backward()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before


def test_a_long_row_with_a_large_vocabulary_peaks_lower_chunked():
    def measure(chunk):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        out = subprocess.run([sys.executable, "-m", "tests.unit.test_chunked_loss", json.dumps(chunk)], capture_output=True, text=True,
                             env=env, check=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        return float(out.stdout.strip().splitlines()[-1])

    whole, chunked = measure(None), measure(256)
    copy = LONG_ROW * BIG_VOCAB * 4 / 2**20  # one float32 copy of the whole row's logits
    assert whole > 1.5 * copy  # logits, log-softmax and its gradient: at least two copies alive at the peak
    assert chunked < whole - copy


if __name__ == "__main__":
    print(peak_growth_mib(json.loads(sys.argv[1])))


@pytest.mark.numerical
def test_the_sft_trainer_spec_chunks_rows_past_the_chunk(make_recipe, tiny_llama_dir, monkeypatch):
    from ftune.model import load_tokenizer
    from ftune.recipe import load_recipe
    from ftune.training import chunked_loss as module
    from ftune.training.sft import build_sft_splits, sft_spec

    monkeypatch.setattr(module, "LOSS_CHUNK", CHUNK)  # the tiny rows are shorter than the real chunk
    recipe = load_recipe(make_recipe())
    model = lora_model(tiny_llama_dir)
    spec = sft_spec(model, load_tokenizer(recipe.model), build_sft_splits(recipe, load_tokenizer(recipe.model)), recipe)
    assert any(f"{CHUNK} positions at a time" in note for note in spec.notes)
    batch = spec.collator(long_features())
    assert batch["output_hidden_states"] and len(batch["logits_to_keep"]) == 0
    whole = keeps_labelled_positions(PadCollator(0))(long_features())
    expected, _ = loss_and_grads(model, whole, loss_at_labelled_positions())
    got, _ = loss_and_grads(model, batch, spec.loss_func)
    assert_close(got, expected, steps=forward_steps(2))
