"""The preference stages' half of ``ftune train``: pairs in, TRL's DPOTrainer or ORPOTrainer over the recipe's method.

``train.build_session`` calls ``build_pair_splits`` and ``build_preference_trainer`` in place of the SFT data
and Trainer; everything around them (run directory, checkpoints, metrics, artifacts) is shared.
The reference model: with an adapter method, the base with the adapter switched off (TRL's own
"ref" adapter copy is removed, so no second set of weights is held); with full/freeze/bitfit, a
frozen copy of the base, or log-probs precomputed once when ``preference.precompute_reference``.
ORPO needs no reference at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ftune.errors import FtuneError
from ftune.preference import check_damage, tokenize_pairs
from ftune.recipe import Recipe
from ftune.recipe.method_base import BASE_COPY
from ftune.recipe.methods import method_class
from ftune.recipe.stages import ORPO, REWARD, REWARD_LABELS
from ftune.recipe.tasks import CAUSAL_LM


@dataclass
class PairSplits:
    train: list[dict]
    eval: list[dict]
    heldout: list[dict]  # the eval records as JSON rows (RUN/heldout.jsonl)
    notes: list[str] = field(default_factory=list)
    label_names: list[str] | None = None  # reward: the score head's one output


def build_pair_splits(recipe: Recipe, tokenizer) -> PairSplits:
    from ftune.data.heldout import heldout_rows
    from ftune.data.pipeline import load_records
    from ftune.data.templates import install_chat_template

    install_chat_template(tokenizer, recipe.data)
    records = load_records(recipe.data, CAUSAL_LM)  # pairs are read alike for every stage; a reward head scores them
    for split in ("train", "eval"):
        other = next((r for r in getattr(records, split) if r.kind != "preference"), None)
        if other is not None:
            raise FtuneError(
                f"data.{split}.{other.source}: stage: {recipe.stage} trains on preference pairs (prompt/chosen/rejected), "
                f"but {other.origin} is a {other.kind} row; give preference data or set stage: sft"
            )
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
    return PairSplits(splits["train"], splits["eval"], heldout_rows(records.eval), notes, labels)


def describe_pairs(splits: PairSplits) -> str:
    tokens = sum(len(r["prompt_ids"]) * 2 + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in splits.train)
    lines = [f"Data: {len(splits.train):,} train / {len(splits.eval):,} eval preference pairs, {tokens:,} train tokens"]
    return "\n".join(lines + [f"  {note}" for note in splits.notes])


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


def build_dpo_trainer(model, tokenizer, splits: PairSplits, recipe: Recipe, run, *, precision, echo=print, callbacks: tuple = (),
                      ref_model=None):
    from datasets import Dataset
    from transformers import PrinterCallback

    from ftune.training.checkpoints import checkpoint_marker
    from ftune.methods import method_callbacks
    from ftune.model import load_base_model
    from ftune.training.progress import MetricsCallback
    from ftune.training.distributed import trainer_class_for
    from ftune.training.run import build_training_arguments
    from trl import DPOConfig

    pref = recipe.preference
    base_copy = method_class(recipe.method.name).reference == BASE_COPY
    copy_reference = base_copy and not pref.precompute_reference
    if copy_reference and ref_model is None:
        ref_model = load_base_model(recipe.model, recipe.quantization, task=recipe.task).eval()
        ref_model.requires_grad_(False)
    args = build_training_arguments(
        recipe, run, has_eval=bool(splits.eval), precision=precision, model=model, args_class=DPOConfig,
        beta=pref.beta, loss_type=[pref.loss_type], max_length=recipe.data.max_length,
        precompute_ref_log_probs=pref.precompute_reference, padding_free=False,
    )
    trainer = trainer_class_for(dpo_trainer_class(), args)(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=Dataset.from_list(splits.train),
        eval_dataset=Dataset.from_list(splits.eval) if splits.eval else None,
        processing_class=tokenizer,
        callbacks=[MetricsCallback(run.metrics, echo=echo), checkpoint_marker(), *method_callbacks(model, recipe.method, run), *callbacks],
    )
    drop_reference_adapter(trainer.model)
    trainer.remove_callback(PrinterCallback)
    reference = ("precomputed log-probs" if pref.precompute_reference else "a frozen copy of the base") if base_copy \
        else "the base with the adapter switched off"
    echo(f"DPO: beta {pref.beta}, loss {pref.loss_type}, reference = {reference}")
    return trainer


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


def build_reward_trainer(model, tokenizer, splits: PairSplits, recipe: Recipe, run, *, precision, echo=print, callbacks: tuple = ()):
    from datasets import Dataset
    from transformers import PrinterCallback

    from ftune.training.checkpoints import checkpoint_marker
    from ftune.methods import method_callbacks
    from ftune.training.progress import MetricsCallback
    from ftune.training.distributed import trainer_class_for
    from ftune.training.run import build_training_arguments
    from trl import RewardConfig, RewardTrainer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.config.pad_token_id = tokenizer.pad_token_id  # the score is read at the last non-pad token
    args = build_training_arguments(recipe, run, has_eval=bool(splits.eval), precision=precision, model=model, args_class=RewardConfig,
                                    max_length=recipe.data.max_length)
    trainer = trainer_class_for(RewardTrainer, args)(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(reward_rows(splits.train)),
        eval_dataset=Dataset.from_list(reward_rows(splits.eval)) if splits.eval else None,
        processing_class=tokenizer,
        callbacks=[MetricsCallback(run.metrics, echo=echo), checkpoint_marker(), *method_callbacks(model, recipe.method, run), *callbacks],
    )
    trainer.remove_callback(PrinterCallback)
    echo("Reward model: one-output head, pairwise loss -log sigmoid(score(chosen) - score(rejected))")
    return trainer


def build_preference_trainer(model, tokenizer, splits: PairSplits, recipe: Recipe, run, *, precision, echo=print, callbacks: tuple = ()):
    if recipe.stage == REWARD:
        return build_reward_trainer(model, tokenizer, splits, recipe, run, precision=precision, echo=echo, callbacks=callbacks)
    if recipe.stage != ORPO:
        return build_dpo_trainer(model, tokenizer, splits, recipe, run, precision=precision, echo=echo, callbacks=callbacks)
    from datasets import Dataset
    from transformers import PrinterCallback

    from ftune.training.checkpoints import checkpoint_marker
    from ftune.methods import method_callbacks
    from ftune.training.progress import MetricsCallback
    from ftune.training.distributed import trainer_class_for
    from ftune.training.run import build_training_arguments
    quiet_experimental()
    from trl.experimental.orpo import ORPOConfig

    args = build_training_arguments(recipe, run, has_eval=bool(splits.eval), precision=precision, model=model, args_class=ORPOConfig,
                                    beta=recipe.preference.beta, max_length=recipe.data.max_length)
    trainer = trainer_class_for(orpo_trainer_class(), args)(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(splits.train),
        eval_dataset=Dataset.from_list(splits.eval) if splits.eval else None,
        processing_class=tokenizer,
        callbacks=[MetricsCallback(run.metrics, echo=echo), checkpoint_marker(), *method_callbacks(model, recipe.method, run), *callbacks],
    )
    trainer.remove_callback(PrinterCallback)
    echo(f"ORPO: lambda (preference.beta) {recipe.preference.beta}, no reference model")
    return trainer
