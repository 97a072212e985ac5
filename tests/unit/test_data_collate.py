"""Packing: padding-free batches give the same loss as padded ones, token for token and through the
Trainer's loss normalisation (sum over trained tokens / trained tokens), and are refused where unsafe."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from ftune.data.collate import AutoCollator, PackCollator, PadCollator, build_collator, linear_cost_in_tokens
from ftune.data.formats import Record
from ftune.data.tokenize import IGNORE_INDEX, tokenize_records
from ftune.errors import FtuneError
from tests.tolerances import approx, assert_same_updates, forward_steps

WORDS = ["red", "blue", "green cat", "dog", "sun moon tree", "the cat", "a dog", "tree"]


@pytest.fixture(scope="module")
def examples(tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    conversations = [[{"role": "user", "content": f"Repeat {w} {i} times."}, {"role": "assistant", "content": " ".join([w] * i)}]
                     for i, w in enumerate(WORDS, start=1)]
    return tokenizer, tokenize_records(tokenizer, [Record("chat", c, f"row {i}", 0) for i, c in enumerate(conversations)], max_length=128)[0][:]


def load(tiny_llama_dir, attention="sdpa"):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation=attention)


@pytest.mark.numerical
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_loss_equals_padded_loss_in_training_mode(tiny_llama_dir, examples, attention):
    tokenizer, batch = examples
    model = load(tiny_llama_dir, attention).train()  # train mode: where a stray KV cache would merge the examples
    batching = build_collator(model, tokenizer, task="causal_lm", packing=True)
    assert isinstance(batching.collator, PackCollator)
    packed, padded = batching.collator(batch), PadCollator(tokenizer.pad_token_id)(batch)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    # The rows open alike ("Repeat "): with sdpa (ftune's, example by example) the row holds that prefix once.
    assert (packed["position_ids"] == 0).sum() == (1 if attention == "sdpa" else len(batch))
    assert (packed["labels"] != IGNORE_INDEX).sum() == (padded["labels"][:, 1:] != IGNORE_INDEX).sum()
    packed_loss, padded_loss = model(**packed).loss, model(**padded).loss
    assert packed_loss.item() == approx(padded_loss.item(), steps=forward_steps(2))


def trainer_run(tiny_llama_dir, tokenizer, batch, collator, tmp_path):
    torch.manual_seed(0)
    model = load(tiny_llama_dir)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=3, gradient_accumulation_steps=2, max_steps=2,
        learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
        remove_unused_columns=False, disable_tqdm=True, lr_scheduler_type="constant",
    )
    trainer = Trainer(model=model, args=args, train_dataset=batch, data_collator=collator, processing_class=tokenizer)
    result = trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return result.training_loss, losses, {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.numerical
def test_trainer_loss_and_updates_match_with_and_without_packing(tiny_llama_dir, examples, tmp_path):
    tokenizer, batch = examples
    packed = trainer_run(tiny_llama_dir, tokenizer, batch, PackCollator(), tmp_path / "packed")
    padded = trainer_run(tiny_llama_dir, tokenizer, batch, PadCollator(tokenizer.pad_token_id), tmp_path / "padded")
    # 2 optimizer steps, each a forward, a backward and an update of the 2-layer model.
    steps = 2 * (forward_steps(2, backward=True) + 1)
    assert packed[0] == approx(padded[0], steps=steps)
    assert packed[1] == approx(padded[1], steps=steps) and len(packed[1]) == 2
    assert_same_updates(packed[2], padded[2], lrs=[1e-3, 1e-3], steps=steps)


def test_auto_packs_a_batch_only_when_that_costs_less(tiny_llama_dir):
    model = load(tiny_llama_dir)
    assert linear_cost_in_tokens(model.config) == 288  # (2*64^2 + 2*64^2/2 + 3*64*128) / (2*64)
    auto = AutoCollator(0, 288, varlen_attention=False)
    ragged = [{"input_ids": [1] * n, "labels": [1] * n} for n in (100, 4, 4, 4, 4, 4, 4, 4)]
    uniform = [{"input_ids": [1] * 100, "labels": [1] * 100}] * 8
    assert "position_ids" in auto(ragged) and "attention_mask" in auto(uniform)  # 128 real tokens of 800 vs no waste
    assert (auto.packed_batches, auto.padded_batches) == (1, 1)
    assert "position_ids" in AutoCollator(0, 288, varlen_attention=True)(uniform)  # flash: packing never costs more


def test_packing_true_where_unsupported_names_the_key(tiny_llama_dir, examples):
    tokenizer, _ = examples
    model = load(tiny_llama_dir)
    with pytest.raises(FtuneError, match="data.packing: true, but task classification"):
        build_collator(model, tokenizer, task="classification", packing=True)
    batching = build_collator(model, tokenizer, task="classification", packing="auto")
    assert not batching.packed and isinstance(batching.collator, PadCollator)
    assert not build_collator(model, tokenizer, task="causal_lm", packing=False).packed


def test_prompt_learning_models_fall_back_to_padding(tiny_llama_dir, examples):
    from peft import PromptTuningConfig, get_peft_model

    tokenizer, _ = examples
    model = get_peft_model(load(tiny_llama_dir), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    batching = build_collator(model, tokenizer, task="causal_lm", packing="auto")
    assert not batching.packed and "virtual tokens" in batching.note


def test_pad_collator_pads_token_labels_and_stacks_class_ids():
    tokens = PadCollator(0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert tokens["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]] and tokens["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    classes = PadCollator(0)([{"input_ids": [5, 6], "labels": 2}, {"input_ids": [8], "labels": 0}])
    assert classes["labels"].tolist() == [2, 0] and classes["input_ids"].tolist() == [[5, 6], [8, 0]]
