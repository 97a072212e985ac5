"""The pretrain stage: documents packed into full blocks without attending to each other, every token trained."""

from __future__ import annotations

import json

import pytest

from tests.conftest import invoke_ok, write_jsonl


def test_a_packed_block_scores_as_its_documents_one_by_one(tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from ftune.pretrain import BlockCollator, Blocks

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="sdpa").eval()
    a, b = list(range(5, 17)), list(range(40, 49))  # 12 and 9 tokens
    [block] = Blocks([{"input_ids": a}, {"input_ids": b}], max_length=21)
    assert len(block["input_ids"]) == 21 and list(block["documents"]) == [12, 9]
    batch = BlockCollator()([block])
    with torch.no_grad():
        packed = model(**batch).loss.item()
        alone = [model(input_ids=torch.tensor([d]), labels=torch.tensor([d])).loss.item() for d in (a, b)]
    expected = (alone[0] * (len(a) - 1) + alone[1] * (len(b) - 1)) / (len(a) + len(b) - 2)
    assert packed == pytest.approx(expected, abs=1e-5)


def test_long_documents_continue_in_the_next_block():
    from ftune.pretrain import Blocks

    blocks = Blocks([{"input_ids": list(range(30))}, {"input_ids": [1, 2, 3]}], max_length=16)
    assert [len(b["input_ids"]) for b in blocks] == [16, 16, 1]
    assert [list(b["documents"]) for b in blocks] == [[16], [14, 2], [1]]


def test_pretrain_trains_raw_text_end_to_end(make_recipe, tmp_path):
    docs = [{"text": f"the {w} sat on the mat and the {w} slept"} for w in ["cat", "dog", "fox", "owl", "bee", "ant"] * 3]
    train = write_jsonl(tmp_path / "docs.jsonl", docs)
    recipe = make_recipe(stage="pretrain", data={"train": str(train), "eval": [], "eval_split": 2, "max_length": 32})
    result = invoke_ok("train", recipe)
    assert "blocks of up to 32 tokens" in result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["train_loss"] > 0
