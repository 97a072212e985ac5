"""The grpo stage: prompts in, completions sampled and scored by the recipe's rewards, TRL's GRPOTrainer over the method.

Its row of ``training.stages`` reads prompts with ``build_prompt_splits`` (the chat/alpaca/messages rows ftune
reads, cut before their last assistant turn, which is kept as the reference answer; rows with tool schemas are
rendered with them as text) and builds the Trainer with
``grpo_spec``. The rewards are ``ftune.rewards``' callables, weighted by GRPOTrainer. The reference policy: with an
adapter method the base with the adapter switched off (TRL's "ref" adapter copy is dropped, as for DPO); with
full fine-tuning, the frozen copy of the base that GRPOTrainer loads itself. ``training.batch_size`` counts
completions, so a step of batch 4 with ``num_generations: 2`` covers two prompts.
"""

from __future__ import annotations

import math

from ftune.errors import FtuneError
from ftune.recipe import Recipe
from ftune.training.preference import drop_reference_adapter
from ftune.training.rows import StageSplits, describe_rows, read_stage_records
from ftune.training.trainer import TrainerSpec


def build_prompt_splits(recipe: Recipe, tokenizer) -> StageSplits:
    from ftune.data.heldout import heldout_rows
    from ftune.rewards import prompt_rows

    check_vllm(recipe.grpo.use_vllm)  # before the data and the model load
    records = read_stage_records(recipe, tokenizer, kinds=("chat",), trains_on="reads prompts from chat or instruction rows",
                                 fix=lambda kind: "give chat/alpaca/messages data")
    notes, splits = list(records.notes), {}
    room = recipe.data.max_length - recipe.grpo.max_new_tokens
    for split in ("train", "eval"):
        chosen = getattr(records, split)
        rows = [dict(r, prompt=own_special_tokens(tokenizer, r["prompt"])) if isinstance(r["prompt"], str) else r
                for r in prompt_rows(chosen, tokenizer)]
        kept = [r for r in rows if prompt_tokens(tokenizer, r["prompt"]) <= room]
        if len(kept) < len(rows):
            notes.append(f"data.{split}: left out {len(rows) - len(kept)} prompts longer than data.max_length - grpo.max_new_tokens "
                         f"({room} tokens)")
        splits[split] = kept
    if not splits["train"]:
        raise FtuneError("data.train: no prompt fits data.max_length - grpo.max_new_tokens; raise data.max_length")
    files = [r.function.rpartition(":")[0] for r in recipe.grpo.rewards if r.kind == "function"]
    return StageSplits(splits["train"], splits["eval"], heldout_rows(records.eval), notes, reward_files=files)


def prompt_tokens(tokenizer, prompt: list[dict] | str) -> int:
    if isinstance(prompt, str):  # rendered with its tools already (``rewards.prompt_rows``); TRL adds special tokens
        return len(tokenizer(prompt)["input_ids"])
    text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def own_special_tokens(tokenizer, text: str) -> str:
    """``text`` without the template's leading BOS where the tokenizer adds its own: GRPOTrainer tokenizes a text
    prompt with the tokenizer's special tokens, and a second BOS is a sequence the model never saw."""
    bos = tokenizer.bos_token
    adds_bos = bos is not None and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
    return text[len(bos):] if adds_bos and text.startswith(bos) else text


def describe_prompts(splits: StageSplits) -> str:
    return describe_rows(f"Data: {len(splits.train):,} train / {len(splits.eval):,} eval prompts (reference = each row's last "
                         "assistant reply)", splits.notes)


def check_vllm(use_vllm: bool) -> None:
    import importlib.util

    import torch

    if not use_vllm:
        return
    if not torch.cuda.is_available():
        raise FtuneError("grpo.use_vllm: vLLM generates on CUDA GPUs only and this machine has none; set grpo.use_vllm: false")
    if importlib.util.find_spec("vllm") is None:
        raise FtuneError("grpo.use_vllm: the vllm package is not installed; pip install vllm, or set grpo.use_vllm: false")


def grpo_spec(model, tokenizer, splits: StageSplits, recipe: Recipe) -> TrainerSpec:
    from accelerate import PartialState
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from ftune.rewards import build_rewards

    grpo, train = recipe.grpo, recipe.training
    rewards = build_rewards(grpo.rewards, device=str(PartialState().device))
    held = splits.eval[: recipe.evaluation.max_samples or None]  # every eval prompt costs a group of sampled completions
    # Eval draws its groups from batches of training.batch_size completions, so its group is the largest that fits.
    eval_generations = math.gcd(train.batch_size, grpo.num_generations)
    options = dict(num_generations=grpo.num_generations, num_generations_eval=eval_generations, max_completion_length=grpo.max_new_tokens,
                   temperature=grpo.temperature, beta=grpo.beta, reward_weights=[r.weight for r in grpo.rewards],
                   use_vllm=grpo.use_vllm, log_completions=False)
    reference = "none (grpo.beta 0)" if grpo.beta == 0 else (
        "the base with the adapter switched off" if hasattr(model, "peft_config") else "a frozen copy of the base")
    names = ", ".join(f"{getattr(f, '__name__', 'reward')} x{r.weight:g}" for f, r in zip(rewards, grpo.rewards))
    return TrainerSpec(
        GRPOTrainer, Dataset.from_list(splits.train), Dataset.from_list(held) if held else None,
        args_class=GRPOConfig, options=options, trainer_options={"reward_funcs": rewards},
        after_build=lambda trainer: drop_reference_adapter(trainer.model),
        notes=(f"GRPO: {grpo.num_generations} completions per prompt, up to {grpo.max_new_tokens} new tokens at temperature "
               f"{grpo.temperature:g}, KL weight (grpo.beta) {grpo.beta:g}, reference = {reference}",
               f"Rewards: {names}"),
    )
