"""``stage: kto``: which recipes can train by Kahneman-Tversky optimisation, and the keys only it reads.

KTO tunes a causal LM on single completions labelled desirable or undesirable (no pairs): each completion's
implicit reward (beta times the policy's log-prob minus the reference's) is pushed above a KL estimate when
desirable and below it when not. The KL estimate comes from mismatched prompts and completions within a batch,
so a batch needs at least two rows. The reference is recovered like DPO's (``MethodBase.reference``).
"""

from __future__ import annotations

from ftune.recipe.method_base import ADAPTER_OFF
from ftune.recipe.methods import method_class, with_reference
from ftune.recipe.tasks import CAUSAL_LM

KTO = "kto"
KTO_KEYS = ("desirable_weight", "undesirable_weight")  # preference keys only stage: kto reads


def kto_problems(recipe, changed: list[str]) -> list[str]:
    """Why the recipe cannot train stage: kto (one fix per line), or []; ``changed`` are the preference keys set."""
    pref, data, method = recipe.preference, recipe.data, recipe.method.name
    problems = []
    if recipe.task != CAUSAL_LM:
        problems.append("stage: kto tunes a causal LM on completions labelled desirable or undesirable; set task: causal_lm")
    if "loss_type" in changed:
        problems.append("preference.loss_type: stage: kto trains with the KTO loss (loss_type is DPO's); remove it")
    reference = method_class(method).reference
    if reference is None:
        problems.append(f"method '{method}' cannot train stage: kto (its reference model cannot be recovered by switching it off); "
                        f"use one of {', '.join(with_reference())}")
    elif pref.precompute_reference and reference == ADAPTER_OFF:
        problems.append(f"preference.precompute_reference: with method '{method}' the reference is the base with the adapter "
                        "switched off, which costs no memory; remove it")
    if recipe.training.batch_size < 2:
        problems.append("training.batch_size: stage: kto estimates its KL term from the other completions of a batch, so a batch "
                        "needs 2 rows or more; set training.batch_size: 2 or more")
    if data.packing is True:
        problems.append("data.packing: true does not apply to stage: kto (each completion is scored on its own); remove it")
    if data.train_on_prompt:
        problems.append("data.train_on_prompt: stage: kto scores the completions only; remove it")
    if pref.max_prompt_length is not None and pref.max_prompt_length >= data.max_length:
        problems.append(f"preference.max_prompt_length: {pref.max_prompt_length} leaves no room for the answer within "
                        f"data.max_length {data.max_length}; lower it or raise data.max_length")
    return problems
