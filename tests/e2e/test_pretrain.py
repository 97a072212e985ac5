"""The pretrain stage: documents packed into full blocks without attending to each other, every token trained."""

from __future__ import annotations

import json

import pytest

from tests.conftest import invoke_ok, write_jsonl
from tests.tolerances import approx, forward_steps


@pytest.mark.numerical
def test_a_packed_block_scores_as_its_documents_one_by_one(tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from ftune.training.pretrain import BlockCollator, Blocks

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="sdpa").eval()
    a, b = list(range(5, 17)), list(range(40, 49))  # 12 and 9 tokens
    [block] = Blocks([{"input_ids": a}, {"input_ids": b}], max_length=21)
    assert len(block["input_ids"]) == 21 and list(block["documents"]) == [12, 9]
    batch = BlockCollator()([block])
    with torch.no_grad():
        packed = model(**batch).loss.item()
        alone = [model(input_ids=torch.tensor([d]), labels=torch.tensor([d])).loss.item() for d in (a, b)]
    expected = (alone[0] * (len(a) - 1) + alone[1] * (len(b) - 1)) / (len(a) + len(b) - 2)
    assert packed == approx(expected, steps=forward_steps(2))


def test_long_documents_continue_in_the_next_block():
    from ftune.training.pretrain import Blocks

    blocks = Blocks([{"input_ids": list(range(30))}, {"input_ids": [1, 2, 3]}], max_length=16)
    assert [len(b["input_ids"]) for b in blocks] == [16, 16, 1]
    assert [list(b["documents"]) for b in blocks] == [[16], [14, 2], [1]]


def test_pretrain_trains_raw_text_end_to_end(make_recipe, tmp_path):
    import torch

    from ftune.run_dir import load_run
    from ftune.tuned import load_model

    texts = [f"the {w} sat on the mat and the {w} slept" for w in ["cat", "dog", "fox", "owl", "bee", "ant"]]
    train = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in texts * 3])
    recipe = make_recipe(stage="pretrain", data={"train": str(train), "eval": [], "eval_split": 2, "max_length": 32},
                         training={"learning_rate": 2e-2})
    result = invoke_ok("train", recipe)
    assert "blocks of up to 32 tokens" in result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 4

    # The saved adapter has learned the text: at every position of the documents (nothing is a prompt in
    # pretraining, so the first words are trained too) it predicts the next token better than the base model.
    run, saved = load_run(tmp_path / "run")
    losses = {}
    for label in ("tuned", "base"):
        model, tokenizer = load_model(run, saved, tuned=label == "tuned")
        ids = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
        longest = max(map(len, ids))
        batch = torch.tensor([row + [tokenizer.pad_token_id] * (longest - len(row)) for row in ids])
        mask = torch.tensor([[1] * len(row) + [0] * (longest - len(row)) for row in ids])
        with torch.no_grad():
            logits = model(input_ids=batch, attention_mask=mask).logits[:, :-1]
        per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
        losses[label] = (per_token * mask[:, 1:]).sum(dim=0) / mask[:, 1:].sum(dim=0)  # mean loss at each position
    gained = losses["base"] - losses["tuned"]  # about 0.15 nats at the first position, 0.35 on average
    assert gained.mean() > 0.2 and (gained > 0.05).all(), gained
