"""The preference stages (dpo, orpo, reward): pairs in, TRL's DPOTrainer, ORPOTrainer or RewardTrainer over the method.

Their rows of ``training.stages`` read pairs with ``build_pair_splits`` and build their Trainer with a
``dpo_spec`` / ``orpo_spec`` / ``reward_spec``; everything around them (run directory, checkpoints,
metrics, artifacts, the Trainer builder) is shared with the other stages.
The reference model: with an adapter method, the base with the adapter switched off (TRL's own
"ref" adapter copy is removed, so no second set of weights is held); with full/freeze/bitfit, a
frozen copy of the base, or log-probs precomputed once when ``preference.precompute_reference``.
ORPO needs no reference at all.
"""

from __future__ import annotations

import os

from ftune.data.preference import check_damage, tokenize_pairs
from ftune.recipe import Recipe
from ftune.recipe.method_base import BASE_COPY
from ftune.recipe.methods import method_class
from ftune.recipe.stages import REWARD, REWARD_LABELS
from ftune.training.rows import StageSplits, describe_rows, read_stage_records
from ftune.training.trainer import TrainerSpec


def build_pair_splits(recipe: Recipe, tokenizer) -> StageSplits:
    from ftune.data.heldout import heldout_rows

    # pairs are read alike for every stage; a reward head scores them
    records = read_stage_records(recipe, tokenizer, kinds=("preference",), trains_on="trains on preference pairs (prompt/chosen/rejected)",
                                 fix=lambda kind: f"give preference data or set stage: {'kto' if kind == 'kto' else 'sft'}")
    pref = recipe.preference
    notes = list(records.notes)
    splits = {}
    for split in ("train", "eval"):
        chosen = getattr(records, split)
        pairs = tokenize_pairs(tokenizer, chosen, max_length=recipe.data.max_length, max_prompt_length=pref.max_prompt_length)
        if chosen:
            note = check_damage(pairs, len(chosen), pref.max_damaged_share, f"data.{split}")
            notes += [note] if note else []
        splits[split] = pairs.rows
    labels = REWARD_LABELS if recipe.stage == REWARD else None
    return StageSplits(splits["train"], splits["eval"], heldout_rows(records.eval), notes, labels)


def describe_pairs(splits: StageSplits) -> str:
    tokens = sum(len(r["prompt_ids"]) * 2 + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in splits.train)
    return describe_rows(f"Data: {len(splits.train):,} train / {len(splits.eval):,} eval preference pairs, {tokens:,} train tokens",
                         splits.notes)


def dpo_trainer_class():
    from trl import DPOTrainer

    class PairDPOTrainer(DPOTrainer):
        """DPOTrainer over pairs ftune already rendered and tokenized (TRL would render them a second time)."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    return PairDPOTrainer


def drop_reference_adapter(model) -> None:
    """TRL copies a peft model's adapter as a frozen "ref" adapter; a fresh adapter's reference is the base itself,
    which peft computes with the adapter switched off, so the copy only costs memory."""
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")
        model.set_adapter("default")


def frozen_reference(recipe: Recipe) -> tuple:
    """(reference model or None, what the reference is): a frozen copy of the base where the method changes base weights
    (None when its log-probs are precomputed instead); None with an adapter, which is switched off to score."""
    from ftune.model import load_base_model

    pref = recipe.preference
    base_copy = method_class(recipe.method.name).reference == BASE_COPY
    ref_model = None
    if base_copy and not pref.precompute_reference:
        ref_model = load_base_model(recipe.model, recipe.quantization, task=recipe.task).eval()
        ref_model.requires_grad_(False)
    reference = ("precomputed log-probs" if pref.precompute_reference else "a frozen copy of the base") if base_copy \
        else "the base with the adapter switched off"
    return ref_model, reference


def dpo_spec(model, tokenizer, splits: StageSplits, recipe: Recipe) -> TrainerSpec:
    from trl import DPOConfig

    pref = recipe.preference
    ref_model, reference = frozen_reference(recipe)
    return TrainerSpec(
        dpo_trainer_class(), *pair_datasets(splits), args_class=DPOConfig,
        options=dict(beta=pref.beta, loss_type=[pref.loss_type], max_length=recipe.data.max_length,
                     precompute_ref_log_probs=pref.precompute_reference, padding_free=False),
        trainer_options={"ref_model": ref_model}, after_build=lambda trainer: drop_reference_adapter(trainer.model),
        notes=(f"DPO: beta {pref.beta}, loss {pref.loss_type}, reference = {reference}",),
    )


def pair_datasets(splits: StageSplits, rows=lambda rows: rows) -> tuple:
    """The train and eval pairs as datasets (eval None when there is none), each row passed through ``rows`` first."""
    from datasets import Dataset

    return Dataset.from_list(rows(splits.train)), Dataset.from_list(rows(splits.eval)) if splits.eval else None


def quiet_experimental() -> None:
    # ORPO lives in trl.experimental, which warns on every import; the lock pins the TRL version it was tested with.
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def orpo_trainer_class():
    quiet_experimental()
    from trl.experimental.orpo import ORPOTrainer

    class PairORPOTrainer(ORPOTrainer):
        """ORPOTrainer over pairs ftune already rendered and tokenized: rows become its padded-batch fields as they are,
        so no BOS or EOS is added a second time; answers are cut at the end to fit ``max_length``."""

        def tokenize_row(self, feature, model=None) -> dict:
            prompt = list(feature["prompt_ids"])
            batch = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
            for side in ("chosen", "rejected"):
                answer = list(feature[f"{side}_ids"])[: max(0, self.max_length - len(prompt))]
                ids = prompt + answer
                batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": [1] * len(ids),
                              f"{side}_labels": [-100] * len(prompt) + answer})
            return batch

    return PairORPOTrainer


def reward_rows(rows: list[dict]) -> list[dict]:
    """Pairs as the reward trainer reads them: each side a whole sequence, prompt included."""
    return [{"chosen_ids": r["prompt_ids"] + r["chosen_ids"], "rejected_ids": r["prompt_ids"] + r["rejected_ids"]} for r in rows]


def reward_spec(model, tokenizer, splits: StageSplits, recipe: Recipe) -> TrainerSpec:
    from trl import RewardConfig, RewardTrainer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.config.pad_token_id = tokenizer.pad_token_id  # the score is read at the last non-pad token
    return TrainerSpec(
        RewardTrainer, *pair_datasets(splits, reward_rows), args_class=RewardConfig, options=dict(max_length=recipe.data.max_length),
        notes=("Reward model: one-output head, pairwise loss -log sigmoid(score(chosen) - score(rejected))",),
    )


def orpo_spec(model, tokenizer, splits: StageSplits, recipe: Recipe) -> TrainerSpec:
    quiet_experimental()
    from trl.experimental.orpo import ORPOConfig

    return TrainerSpec(
        orpo_trainer_class(), *pair_datasets(splits), args_class=ORPOConfig,
        options=dict(beta=recipe.preference.beta, max_length=recipe.data.max_length),
        notes=(f"ORPO: lambda (preference.beta) {recipe.preference.beta}, no reference model",),
    )
