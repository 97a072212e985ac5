"""Training stages a recipe can run (``stage:``), the ``preference:`` section, and which combinations make sense.

``pretrain`` trains every token of raw text packed into full blocks; ``sft`` trains on responses (what a recipe did before stages existed); ``dpo`` tunes on preference
pairs against a frozen reference; ``orpo`` tunes on them with no reference (SFT loss on the chosen
answer plus an odds-ratio penalty on the rejected one); ``reward`` trains a one-output sequence
classifier (``task: classification``) to score chosen above rejected, for later RLHF; ``kto`` tunes on single completions
labelled desirable or undesirable against a frozen reference (``recipe.kto``); ``grpo`` samples completions of prompts
and learns from their rewards (``recipe.grpo``, whose rules are there). The rules here are checked by ``ftune validate``, so a recipe that
cannot run is refused before anything loads.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from ftune.recipe.grpo import GRPO, GrpoConfig, grpo_problems
from ftune.recipe.kto import KTO, KTO_KEYS, kto_problems
from ftune.recipe.method_base import ADAPTER_OFF
from ftune.recipe.methods import Strict, method_class, with_reference
from ftune.recipe.tasks import CAUSAL_LM, CLASSIFICATION

PRETRAIN, SFT, DPO, ORPO, REWARD = "pretrain", "sft", "dpo", "orpo", "reward"
StageName = Literal["pretrain", "sft", "dpo", "orpo", "reward", "grpo", "kto"]
PREFERENCE_STAGES = frozenset({DPO, ORPO, REWARD})  # stages trained on preference pairs
REWARD_LABELS = ["reward"]  # a reward model's single output, as its class name
# preference keys that only mean something where a reference model exists
REFERENCE_KEYS = ("loss_type", "precompute_reference")
# Stages transformers' own Trainer trains, which applies Liger's patch; the others compute their loss from the logits.
LIGER_STAGES = frozenset({PRETRAIN, SFT})


def liger_stage_blocker(stage: str) -> str | None:
    """Why a stage cannot train with Liger's kernels (decided from the recipe: ``ftune validate`` reports it)."""
    if stage in LIGER_STAGES:
        return None
    return f"stage {stage} computes its loss from the logits, which Liger's fused cross-entropy never materialises"


class PreferenceConfig(Strict):
    beta: float = Field(0.1, gt=0, description="dpo and kto: temperature, how far the policy may move from the reference (0.1 typical); "
                        "orpo: weight of the odds-ratio term (lambda).")
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = Field(
        "sigmoid", description="DPO loss: sigmoid (the paper's), ipo, hinge, robust (noisy labels)."
    )
    max_prompt_length: int | None = Field(
        None, gt=0, description="Keep at most this many prompt tokens (the end of the prompt); null = data.max_length decides."
    )
    precompute_reference: bool = Field(
        False,
        description="Full/freeze/bitfit: compute reference log-probs once before training instead of holding a second model copy.",
    )
    max_damaged_share: float = Field(
        0.05, ge=0, le=1,
        description="Refuse the run when more than this share of pairs is damaged (chosen == rejected, an empty side, "
        "or an answer truncation would cut away); damaged pairs are listed with file:line and left out.",
    )
    desirable_weight: float = Field(
        1.0, gt=0, description="kto: factor on the loss of desirable completions (label true); raise it when they are the "
        "fewer, so desirable_weight x desirable rows is about 1 to 1.33 x undesirable_weight x undesirable rows.",
    )
    undesirable_weight: float = Field(
        1.0, gt=0, description="kto: factor on the loss of undesirable completions (label false); lower it when they are "
        "the more numerous (the same balance as desirable_weight).",
    )

    @field_validator("precompute_reference", mode="before")
    @classmethod
    def _yaml_words(cls, value: object) -> object:
        return {"yes": True, "on": True, "no": False, "off": False}.get(value, value) if isinstance(value, str) else value


def stage_problems(recipe) -> list[str]:
    """Why the recipe's stage does not fit its other sections (one fix per line), or []."""
    stage, pref, data, method = recipe.stage, recipe.preference, recipe.data, recipe.method.name
    changed = sorted(name for name, field in PreferenceConfig.model_fields.items() if getattr(pref, name) != field.default)
    if stage != KTO and (kto_only := [key for key in KTO_KEYS if key in changed]):
        return [f"preference.{key}: only stage: kto weighs completions (now '{stage}'); set stage: kto or remove it" for key in kto_only]
    if stage != GRPO and recipe.grpo != GrpoConfig():
        return [f"grpo: the section only applies to stage: grpo (now '{stage}'); set stage: grpo or remove it"]
    if stage == KTO:
        return kto_problems(recipe, changed)
    if stage == GRPO:
        refused = [f"preference.{name}: stage: grpo does not read the preference section; remove it" for name in changed]
        return refused + grpo_problems(recipe, reference_kind=method_class(method).reference)
    if stage not in PREFERENCE_STAGES:
        if changed:
            return [f"preference.{', preference.'.join(changed)} only apply to stage: dpo or orpo (now '{stage}'); "
                    "set stage: dpo or remove them"]
        return pretrain_problems(recipe) if stage == PRETRAIN else []
    problems = []
    if stage == ORPO:
        for key in (k for k in REFERENCE_KEYS if k in changed):
            problems.append(f"preference.{key}: stage: orpo has no reference model; remove it or use stage: dpo")
    if stage == REWARD:
        for key in (k for k in ("beta", *REFERENCE_KEYS) if k in changed):
            problems.append(f"preference.{key}: stage: reward trains a scoring head with a pairwise loss and no reference; remove it")
        if recipe.task != CLASSIFICATION:
            problems.append("stage: reward trains a one-output sequence classifier; set task: classification")
        if data.labels is not None:
            problems.append("data.labels: a reward model has one output (the score); remove data.labels")
    elif recipe.task != CAUSAL_LM:
        problems.append(f"stage: {stage} tunes a causal LM on preference pairs; set task: causal_lm")
    reference = method_class(method).reference
    if stage == DPO and reference is None:
        problems.append(
            f"method '{method}' cannot train stage: {stage} (its reference model cannot be recovered by switching it off); "
            f"use one of {', '.join(with_reference())}"
        )
    if stage == DPO and pref.precompute_reference and reference == ADAPTER_OFF:
        problems.append(
            f"preference.precompute_reference: with method '{method}' the reference is the base with the adapter switched off, "
            "which costs no memory; remove it"
        )
    if data.packing is True and stage != REWARD:  # classification refuses it already
        problems.append(f"data.packing: true does not apply to stage: {stage} (pairs are batched chosen beside rejected); remove it")
    if data.train_on_prompt:
        problems.append(f"data.train_on_prompt: stage: {stage} scores the responses only; remove it")
    if pref.max_prompt_length is not None and pref.max_prompt_length >= data.max_length:
        problems.append(
            f"preference.max_prompt_length: {pref.max_prompt_length} leaves no room for the answer within data.max_length "
            f"{data.max_length}; lower it or raise data.max_length"
        )
    return problems


def pretrain_problems(recipe) -> list[str]:
    data, problems = recipe.data, []
    if recipe.task != CAUSAL_LM:
        problems.append("stage: pretrain trains a causal LM on raw text; set task: causal_lm")
    for split in ("train", "eval"):
        for index, source in enumerate(getattr(data, split)):
            if source.format not in ("auto", "text"):
                problems.append(f"data.{split}.{index}.format: stage: pretrain trains on raw text; use format: text, or stage: sft")
    if data.packing is False:
        problems.append("data.packing: false does not apply to stage: pretrain (it always packs full blocks); remove it")
    if data.train_on_prompt:
        problems.append("data.train_on_prompt: stage: pretrain trains every token already; remove it")
    if data.truncation == "drop":
        problems.append("data.truncation: drop does not apply to stage: pretrain (long documents continue in the next block); remove it")
    return problems
