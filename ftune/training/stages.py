"""The training stages, one row each: how a stage reads its data and which Trainer it trains with.

``session.build_session`` looks the recipe's ``stage`` up here and does the rest the same way for all
of them (tokenizer, model, method, kernels, compilation, the Trainer builder). A new stage is a new row:
its data reader, the line that describes its data, and a ``TrainerSpec`` builder. Which recipe settings a
stage accepts is the recipe's business (``recipe.stages``), checked before anything here runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ftune.recipe.grpo import GRPO
from ftune.recipe.stages import DPO, KTO, ORPO, PRETRAIN, REWARD, SFT
from ftune.training import grpo, kto, preference, pretrain, sft


@dataclass(frozen=True)
class Stage:
    build_splits: Callable[[Any, Any], Any]  # (recipe, tokenizer) -> splits with train, eval, heldout, label_names
    describe: Callable[[Any], str]  # splits -> the "Data: ..." lines printed before loading the model
    spec: Callable[..., Any]  # (model, tokenizer, splits, recipe, liger=) -> TrainerSpec


def _without_liger(spec):
    """A spec builder for a stage whose TRL trainer computes its loss from the logits, so Liger never serves it
    (``recipe.stages.LIGER_STAGES``; ``training.kernels`` resolves to none for it)."""
    return lambda model, tokenizer, splits, recipe, liger=False: spec(model, tokenizer, splits, recipe)


_PAIRS = dict(build_splits=preference.build_pair_splits, describe=preference.describe_pairs)

STAGES: dict[str, Stage] = {
    SFT: Stage(sft.build_sft_splits, sft.describe_sft_splits, sft.sft_spec),
    PRETRAIN: Stage(pretrain.build_block_splits, pretrain.describe_blocks, pretrain.pretrain_spec),
    DPO: Stage(**_PAIRS, spec=_without_liger(preference.dpo_spec)),
    ORPO: Stage(**_PAIRS, spec=_without_liger(preference.orpo_spec)),
    REWARD: Stage(**_PAIRS, spec=_without_liger(preference.reward_spec)),
    KTO: Stage(kto.build_kto_splits, kto.describe_kto, _without_liger(kto.kto_spec)),
    GRPO: Stage(grpo.build_prompt_splits, grpo.describe_prompts, _without_liger(grpo.grpo_spec)),
}
