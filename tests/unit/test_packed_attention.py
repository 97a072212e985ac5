"""Packed sdpa: its layouts read back from position ids, the shared-prefix rows the collator builds, and training on
them equal to training on padded batches (loss and every gradient), on every family whose attention can take it."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ftune.data.collate import PackCollator, PadCollator, shared_prefix_length
from ftune import packed_attention
from ftune.data.tokenize import IGNORE_INDEX
from ftune.packed_attention import PACKED_SDPA, Segment, example_tokens, segments, set_attention, verify
from tests.unit.test_families import DECODERS, save_family_model
from tests.tolerances import assert_close, forward_steps

X = IGNORE_INDEX


def test_segments_read_plain_and_shared_prefix_rows():
    assert segments([0, 1, 2, 0, 1]) == [Segment(0, 3), Segment(3, 5)]
    shared = [0, 1, 2, 3, 4, 5, 6, 4, 5, 6, 7, 4, 5]
    assert segments(shared) == [Segment(0, 7), Segment(7, 11, 0, 4), Segment(11, 13, 0, 4)]
    assert example_tokens(shared) == 7 + 8 + 6 and example_tokens([0, 1, 2, 0, 1]) == 5
    with pytest.raises(ValueError, match="row position 3 starts at 5"):
        segments([0, 1, 2, 5, 6])


def feature(ids: list[int], first_target: int) -> dict:
    return {"input_ids": ids, "labels": [X] * first_target + ids[first_target:]}


def test_the_shared_prefix_stops_before_any_example_s_first_target():
    a, b = feature([1, 2, 3, 4, 5, 6], 4), feature([1, 2, 3, 4, 9, 9, 9], 4)
    # 4 tokens in common, but position 3 predicts only the first example's token 4: b's target there would be lost.
    assert shared_prefix_length([a, b]) == 3
    assert shared_prefix_length([a, feature([1, 2, 3, 4, 9], 2)]) == 1
    assert shared_prefix_length([a, b, feature([7, 2, 3], 1)]) == 0


def test_a_shared_prefix_row_holds_every_example_s_targets_once():
    features = [feature([1, 2, 3, 4, 5, 6], 4), feature([1, 2, 3, 4, 9, 9, 9], 4), feature([1, 2, 3, 8, 8], 3)]
    collator = PackCollator(share_prefix=True)
    row = collator(features)
    # The third example's first target (position 3) caps the prefix at 2 tokens.
    assert row["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 3, 4, 9, 9, 9, 3, 8, 8]]
    assert row["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 2, 3, 4, 5, 6, 2, 3, 4]]
    assert row["labels"].tolist() == [[X, X, X, X, 5, 6, X, X, 9, 9, 9, X, 8, 8]]
    padded = PadCollator(0)(features)
    assert (row["labels"][:, 1:] != X).sum() == (padded["labels"][:, 1:] != X).sum()  # the Trainer's token count
    assert example_tokens(row["position_ids"][0].tolist()) == 6 + 7 + 5
    assert "attention_mask" not in row and row["use_cache"] is False


def prompt_rows(vocab: int, count: int = 5, prefix: int = 9) -> list[dict]:
    """Rows that open with the same prompt, then their own prompt tail and answer (the answer alone labelled)."""
    generator = torch.Generator().manual_seed(1)
    shared = torch.randint(3, vocab, (prefix,), generator=generator).tolist()
    rows = []
    for index in range(count):
        tail = torch.randint(3, vocab, (2 + index,), generator=generator).tolist()
        answer = torch.randint(3, vocab, (3 + 2 * index,), generator=generator).tolist()
        rows.append(feature(shared + tail + answer, prefix + len(tail)))
    return rows


def loss_and_grads(model, batch) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def tiny_model(model_type: str, **config):
    torch.manual_seed(0)
    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=300)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **sizes, **config), attn_implementation="sdpa").train()


@pytest.mark.numerical
@pytest.mark.parametrize("model_type, config", [("llama", {}), ("mistral", {"sliding_window": 6})], ids=["llama-gqa", "mistral-window-6"])
@pytest.mark.parametrize("share_prefix", [True, False], ids=["shared-prefix", "example-by-example"])
@pytest.mark.parametrize("masked_gqa", [True, False], ids=["gqa-in-kernel", "heads-repeated"])
def test_packed_sdpa_trains_as_padded_batches_do(model_type, config, share_prefix, masked_gqa, monkeypatch):
    # mistral's window (6) is shorter than the prefix plus most tails: the remainders' masks must cut into the prefix.
    # heads-repeated: the masked calls as CUDA makes them (key/value heads repeated instead of enable_gqa).
    monkeypatch.setattr(packed_attention, "MASKED_GQA_DEVICES", {"cpu"} if masked_gqa else set())
    model = tiny_model(model_type, **config)
    rows = prompt_rows(model.config.vocab_size)
    padded_loss, padded_grads = loss_and_grads(model, PadCollator(0)(rows))
    assert verify(model) is None and model.config._attn_implementation == PACKED_SDPA
    row = PackCollator(share_prefix=share_prefix)(rows)
    assert (row["position_ids"] == 0).sum() == (1 if share_prefix else len(rows))
    packed_loss, packed_grads = loss_and_grads(model, row)
    assert_close(packed_loss, padded_loss, steps=forward_steps(2))
    assert packed_grads.keys() == padded_grads.keys()
    for name, grad in padded_grads.items():
        assert_close(packed_grads[name], grad, steps=forward_steps(2, backward=True), msg=name)


@pytest.mark.numerical
def test_rows_that_are_not_packed_run_transformers_sdpa_unchanged():
    model = tiny_model("llama").eval()
    batch = PadCollator(0)(prompt_rows(300, count=3))
    with torch.no_grad():
        expected = model(**batch).logits
        set_attention(model, PACKED_SDPA)
        assert_close(model(**batch).logits, expected, steps=forward_steps(2))  # padded rows, their own mask
        longest = {"input_ids": batch["input_ids"][-1:], "position_ids": torch.arange(batch["input_ids"].shape[1])[None]}
        assert_close(model(**longest).logits, expected[-1:], steps=forward_steps(2))  # one example: nothing to split


def test_a_model_whose_attention_never_sees_the_position_ids_keeps_sdpa(monkeypatch):
    from transformers.models.llama import modeling_llama

    forward = modeling_llama.LlamaAttention.forward

    def without_position_ids(self, *args, **kwargs):
        kwargs.pop("position_ids", None)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward", without_position_ids)
    model = tiny_model("llama")
    assert verify(model) == "LlamaForCausalLM's attention does not see packed position ids"
    assert model.config._attn_implementation == "sdpa" and model.training


def test_eager_attention_is_left_as_it_is():
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                                  num_attention_heads=2, vocab_size=100), attn_implementation="eager")
    assert verify(model) == "attention is eager, not sdpa"


@pytest.mark.parametrize("model_type", DECODERS)
def test_every_family_that_loads_with_sdpa_takes_packed_sdpa(model_type, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(save_family_model(model_type, tmp_path))
    if model.config._attn_implementation != "sdpa":
        pytest.skip(f"{model_type} loads with {model.config._attn_implementation}")
    assert verify(model) is None and model.config._attn_implementation == PACKED_SDPA
