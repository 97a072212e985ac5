"""The kto stage: completions labelled desirable or undesirable in, TRL's KTOTrainer over the method.

Its row of ``training.stages`` reads KTO records (``data.preference``: TRL's prompt/completion/label, a chat
row's last reply with a boolean ``kto_tag`` / ``label``; preference pairs unpaired as TRL unpairs them, chosen
desirable and rejected undesirable), tokenized once by ftune; the reference model is
DPO's (``training.preference.frozen_reference``). KTO's KL estimate scores each prompt with the completion of
the row before it in its batch, so the training rows are shuffled once (seeded) and then read in order.
"""

from __future__ import annotations

import random

from ftune.data.preference import check_damage, tokenize_completions, unpaired
from ftune.recipe import Recipe
from ftune.training.preference import drop_reference_adapter, frozen_reference, pair_datasets
from ftune.training.rows import StageSplits, describe_rows, read_stage_records
from ftune.training.trainer import TrainerSpec


def build_kto_splits(recipe: Recipe, tokenizer) -> StageSplits:
    from ftune.data.heldout import heldout_rows

    records = read_stage_records(recipe, tokenizer, kinds=("kto", "preference"),
                                 trains_on="trains on completions labelled true/false (prompt/completion/label, or chat rows with a "
                                 "boolean label or kto_tag)", fix=lambda kind: "give KTO rows or set stage: sft")
    pairs = sum(r.kind == "preference" for r in records.train + records.eval)
    records.train, records.eval = unpaired(records.train), unpaired(records.eval)
    pref, notes, splits = recipe.preference, list(records.notes), {}
    if pairs:
        notes.append(f"unpaired {pairs:,} preference pairs into KTO rows: each chosen answer desirable, each rejected one undesirable")
    for split in ("train", "eval"):
        chosen = getattr(records, split)
        rows = tokenize_completions(tokenizer, chosen, max_length=recipe.data.max_length, max_prompt_length=pref.max_prompt_length)
        if chosen:
            note = check_damage(rows, len(chosen), pref.max_damaged_share, f"data.{split}", "KTO rows")
            notes += [note] if note else []
        splits[split] = rows.rows
    random.Random(f"{recipe.training.seed}:kto").shuffle(splits["train"])
    notes += [note] if (note := weight_note(splits["train"], pref.desirable_weight, pref.undesirable_weight)) else []
    return StageSplits(splits["train"], splits["eval"], heldout_rows(records.eval), notes)


def weight_note(rows: list[dict], desirable_weight: float, undesirable_weight: float) -> str | None:
    """Where the weighted desirable rows fall outside 1 to 4/3 times the weighted undesirable ones (the KTO paper's range,
    eq. 8, which TRL warns about), the weights that bring them back; None when they fit or the kinds are equal in number."""
    good = sum(r["label"] for r in rows)
    bad = len(rows) - good
    if not good or not bad or good == bad or 1 <= (desirable_weight * good) / (undesirable_weight * bad) <= 4 / 3:
        return None
    desirable, undesirable = bad * undesirable_weight / good, good * desirable_weight / bad
    return (f"preference weights: {good} desirable x desirable_weight {desirable_weight:g} against {bad} undesirable x "
            f"undesirable_weight {undesirable_weight:g} is outside KTO's 1 to 1.33 balance; set preference.desirable_weight "
            f"to {desirable:.2f}-{desirable * 4 / 3:.2f} or preference.undesirable_weight to {undesirable * 3 / 4:.2f}-{undesirable:.2f}")


def describe_kto(splits: StageSplits) -> str:
    desirable = sum(r["label"] for r in splits.train)
    tokens = sum(len(r["prompt_ids"]) + len(r["completion_ids"]) for r in splits.train)
    lines = [f"Data: {len(splits.train):,} train / {len(splits.eval):,} eval KTO rows ({desirable:,} desirable, "
             f"{len(splits.train) - desirable:,} undesirable), {tokens:,} train tokens"]
    if splits.train and desirable in (0, len(splits.train)):
        lines.append(f"  warning: every training completion is {'desirable' if desirable else 'undesirable'}; KTO learns from "
                     "the contrast, so give both kinds")
    return describe_rows(lines[0], lines[1:] + splits.notes)


def with_kl_completions(rows: list[dict], batch_size: int) -> list[dict]:
    """``rows`` with KTO's KL completions, as TRL builds them: within each batch, every prompt takes the completion of
    the row before it (the first takes the last), so the KL estimate scores prompts against answers to other prompts."""
    out = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        out += [{**row, "KL_completion_ids": other["completion_ids"]} for row, other in zip(batch, batch[-1:] + batch[:-1])]
    return out


def kto_trainer_class():
    from trl import KTOTrainer

    class RowKTOTrainer(KTOTrainer):
        """KTOTrainer over rows ftune already rendered, tokenized and gave their KL completions (TRL would render them a
        second time)."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    return RowKTOTrainer


def kto_spec(model, tokenizer, splits: StageSplits, recipe: Recipe) -> TrainerSpec:
    from trl import KTOConfig

    pref = recipe.preference
    ref_model, reference = frozen_reference(recipe)
    return TrainerSpec(
        kto_trainer_class(), *pair_datasets(splits, lambda rows: with_kl_completions(rows, recipe.training.batch_size)),
        args_class=KTOConfig,
        options=dict(beta=pref.beta, desirable_weight=pref.desirable_weight, undesirable_weight=pref.undesirable_weight,
                     max_length=recipe.data.max_length, precompute_ref_log_probs=pref.precompute_reference),
        trainer_options={"ref_model": ref_model}, after_build=lambda trainer: drop_reference_adapter(trainer.model),
        notes=(f"KTO: beta {pref.beta}, weights desirable {pref.desirable_weight} / undesirable {pref.undesirable_weight}, "
               f"reference = {reference}",),
    )
