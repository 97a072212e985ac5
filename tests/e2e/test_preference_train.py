"""The preference stages (dpo, orpo) on the tiny model: pairs rendered once, the reference is the base with the adapter off,
held-out preference accuracy rises above the base's, and the run directory serves eval and merge."""

from __future__ import annotations

import json

import pytest

from tests.conftest import TOKENIZER_DIR, invoke_ok, write_jsonl
from tests.tolerances import approx, forward_steps

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "fish", "bird", "star", "rock"]


def pair_rows(words):
    # The preferred answer is the word itself; the rejected one wraps it in filler.
    return [{"prompt": f"Say {w}.", "chosen": w, "rejected": f"well, maybe {w} or so"} for w in words]


@pytest.fixture
def dpo_recipe(make_recipe, tmp_path):
    def build(**sections):
        train = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(WORDS[:9]))
        held = write_jsonl(tmp_path / "held.jsonl", pair_rows(WORDS[9:]))
        options = dict(stage="dpo", data={"train": str(train), "eval": str(held), "max_length": 64},
                       training={"max_steps": 12, "learning_rate": 1e-2, "save_steps": 50})
        options.update(sections)
        return make_recipe(**options)

    return build


def test_pairs_render_through_the_template_once():
    from transformers import AutoTokenizer

    from ftune.data.formats import Record
    from ftune.data.preference import tokenize_pairs

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    record = Record("preference", {"prompt": [{"role": "user", "content": "Say red."}], "chosen": "red", "rejected": "blue"}, "f:1", 0)
    [row] = tokenize_pairs(tokenizer, [record], max_length=64, max_prompt_length=None).rows
    whole = tokenizer.apply_chat_template(record.value["prompt"] + [{"role": "assistant", "content": "red"}], tokenize=False)
    assert row["prompt_ids"] + row["chosen_ids"] == tokenizer(whole, add_special_tokens=False)["input_ids"]
    ids = row["prompt_ids"] + row["chosen_ids"]
    for special in {tokenizer.bos_token_id, tokenizer.eos_token_id} - {None}:
        assert ids.count(special) <= whole.count(tokenizer.convert_ids_to_tokens(special))  # nothing added by tokenization


def test_damaged_pairs_are_named_and_refused_above_the_share():
    from transformers import AutoTokenizer

    from ftune.data.formats import Record
    from ftune.errors import FtuneError
    from ftune.data.preference import check_damage, tokenize_pairs

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    good = Record("preference", {"prompt": [{"role": "user", "content": "hi"}], "chosen": "a b", "rejected": "c d"}, "p.jsonl:1", 0)
    long = Record("preference", {"prompt": [{"role": "user", "content": "word " * 80}], "chosen": "a", "rejected": "c"}, "p.jsonl:2", 0)
    pairs = tokenize_pairs(tokenizer, [good, long], max_length=32, max_prompt_length=None)
    assert len(pairs.rows) == 1 and pairs.damaged[0].startswith("p.jsonl:2: the prompt alone")
    with pytest.raises(FtuneError, match="max_damaged_share"):
        check_damage(pairs, 2, 0.05, "data.train")
    assert "p.jsonl:2" in check_damage(pairs, 2, 0.5, "data.train")


def test_reference_from_disabled_adapter_equals_a_reference_copy(dpo_recipe, tiny_llama_dir):
    from ftune.hardware import resolve_precision
    from ftune.model import load_base_model, load_tokenizer
    from ftune.training.distributed import Strategy
    from ftune.training.preference import build_pair_splits, dpo_spec
    from ftune.training.trainer import build_trainer
    from ftune.methods import apply_method
    from ftune.recipe import load_recipe
    from ftune.run_dir import prepare_run_dir

    recipe = load_recipe(dpo_recipe())
    run = prepare_run_dir(recipe, overwrite=True, resume=False)
    tokenizer = load_tokenizer(recipe.model)
    splits = build_pair_splits(recipe, tokenizer)
    losses = []
    for explicit in (False, True):
        import torch

        torch.manual_seed(0)
        model = apply_method(load_base_model(recipe.model, recipe.quantization), recipe.method, recipe.task)
        with torch.no_grad():  # a non-zero adapter, so the policy differs from its reference
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.05)
        ref = load_base_model(recipe.model, recipe.quantization).eval() if explicit else None
        spec = dpo_spec(model, tokenizer, splits, recipe)
        spec.trainer_options["ref_model"] = ref
        trainer = build_trainer(spec, model, tokenizer, recipe, run, precision=resolve_precision("no"),
                                strategy=Strategy("single", 1, "single process"), echo=lambda *_: None)
        assert "ref" not in model.peft_config  # no second adapter copy
        batch = trainer.data_collator([splits.train[i] for i in range(4)])
        model.eval()
        with torch.no_grad():
            losses.append(trainer.compute_loss(model, batch).item())
    assert losses[0] == approx(losses[1], steps=forward_steps(2) + 1)  # the reference's forward, then the loss
    assert losses[0] != pytest.approx(0.6931471805599453, abs=1e-4)  # log 2 would mean policy == reference


@pytest.mark.parametrize("stage", ["dpo", "orpo"])
def test_preference_stage_raises_heldout_preference_accuracy_and_the_run_serves_eval_and_merge(dpo_recipe, stage):
    recipe = dpo_recipe(stage=stage)
    invoke_ok("train", recipe)
    run = recipe.parent / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert "eval_preference_accuracy" in summary
    result = invoke_ok("eval", run, "--base")
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["tuned"]["preference_accuracy"] > metrics["base"]["preference_accuracy"]
    assert metrics["tuned"]["reward_margin"] > 0 == metrics["base"]["reward_margin"]
    assert metrics["tuned"]["chosen_logp"] - metrics["tuned"]["rejected_logp"] > metrics["base"]["chosen_logp"] - metrics["base"]["rejected_logp"]
    assert "preference_accuracy" in result.output
    invoke_ok("merge", run)
    assert (run / "merged" / "config.json").is_file()
    invoke_ok("generate", run, "--prompt", "Say red.", "--max-new-tokens", "3")


def test_reward_model_ranks_heldout_chosen_above_rejected(dpo_recipe):
    recipe = dpo_recipe(stage="reward", task="classification", training={"max_steps": 12, "learning_rate": 1e-2, "save_steps": 50})
    invoke_ok("train", recipe)
    run = recipe.parent / "run"
    invoke_ok("eval", run, "--base")
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["tuned"]["pairwise_accuracy"] == 1.0 >= metrics["base"]["pairwise_accuracy"]
    assert metrics["tuned"]["reward_margin"] > max(metrics["base"]["reward_margin"], 0)
