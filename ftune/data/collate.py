"""Batching: dynamic padding, or padding-free packing for causal LMs whose attention can keep packed examples apart.

Packed batches (transformers' ``DataCollatorWithFlattening``) put a batch's examples in one row with
position ids restarting at 0 per example and no attention mask; the model's mask builder turns the
restarts into a block-diagonal mask, so no example attends to another. Each example's first label
becomes -100, which is the position the shifted loss never targets anyway, so the Trainer's loss
(sum over trained tokens / trained tokens, ``num_items_in_batch``) is the same as with padding.

Packing is not free everywhere: transformers' sdpa and eager compute attention over the whole packed
row and mask most of it away, so a packed row of N tokens costs ~N^2 in attention where padding costs
B * longest^2. Flash attention's variable-length kernels, and ``ftune.packed_attention``'s sdpa
(which ftune switches an sdpa model to once it has checked the model's logits with it), attend within
each example only, so there every batch is packed; with sdpa a prefix all of a batch's examples open
with is also held once (``PackCollator(share_prefix=True)``). Elsewhere ``packing: auto`` takes, per
batch, whichever layout costs less: on SmolLM2 with masked sdpa on CPU packing wins for short, ragged
batches and loses from a few hundred tokens per example.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

from ftune.data.tokenize import IGNORE_INDEX
from ftune.errors import FtuneError
from ftune.recipe.tasks import CAUSAL_LM

# Attention kernels that read packed position ids (flash) or whose masks transformers builds from them.
PACKING_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


class PadCollator:
    """Right-pads a batch: pad id for inputs, IGNORE_INDEX for token labels, zeros in the attention mask.
    Integer labels (classification) become a 1-D tensor."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict:
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids, masks, labels = [], [], []
        for feature in features:
            pad = longest - len(feature["input_ids"])
            ids.append(list(feature["input_ids"]) + [self.pad_token_id] * pad)
            masks.append([1] * len(feature["input_ids"]) + [0] * pad)
            label = feature["labels"]
            labels.append(label if isinstance(label, int) else list(label) + [IGNORE_INDEX] * pad)
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "attention_mask": torch.tensor(masks, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
        }


class PackCollator:
    """One row per batch, position ids restarting per example, no attention mask.

    ``share_prefix`` (for ``ftune.packed_attention``'s sdpa only): when the examples open with the same tokens, none of
    them a target (``shared_prefix_length``), the row holds the first example whole and only the remainder of the
    others, with their position ids carrying on from the prefix. The labels are the examples' own; each example's
    first row label is -100 (the position before it is another example's), as in the plain layout.

    ``use_cache=False`` rides along: with a KV cache object present, transformers' mask builder skips
    its packed-sequence detection and the examples would attend to each other. The Trainer turns the
    cache off itself; the flag keeps the batches safe in any other forward pass too.
    """

    def __init__(self, share_prefix: bool = False) -> None:
        from transformers import DataCollatorWithFlattening

        self.flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
        self.share_prefix = share_prefix

    def __call__(self, features: list[dict]) -> dict:
        prefix = shared_prefix_length(features) if self.share_prefix and len(features) > 1 else 0
        if not prefix:
            return {**self.flatten(features), "use_cache": False}
        import torch

        first, rest = features[0], features[1:]
        ids, labels = list(first["input_ids"]), [IGNORE_INDEX, *first["labels"][1:]]
        positions = list(range(len(ids)))
        for feature in rest:
            ids += feature["input_ids"][prefix:]
            labels += [IGNORE_INDEX, *feature["labels"][prefix + 1:]]
            positions += range(prefix, len(feature["input_ids"]))
        return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]), "position_ids": torch.tensor([positions]),
                "use_cache": False}


def shared_prefix_length(features: list[dict]) -> int:
    """Tokens every example opens with, short enough that none of them is a target: the last prefix position
    predicts only the first example's next token, so the others' first target must lie after it."""
    first = features[0]["input_ids"]
    common = len(first)
    for feature in features[1:]:
        ids = feature["input_ids"]
        length = 0
        while length < min(common, len(ids)) and ids[length] == first[length]:
            length += 1
        common = length
    first_target = min(next((at for at, label in enumerate(f["labels"]) if label != IGNORE_INDEX), len(f["labels"]))
                       for f in features[1:])
    return max(0, min(common, first_target - 1))


def packing_blocker(model, task: str) -> str | None:
    """Why ``model`` cannot train on packed batches, or None when it can."""
    if task != CAUSAL_LM:
        return f"task {task} classifies each text on its own"
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        return "prompt-learning methods prepend virtual tokens, which packed position ids do not account for"
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    attention = getattr(base.config, "_attn_implementation", None)
    if attention not in PACKING_ATTENTION:
        return f"attention implementation {attention!r} is not one of {', '.join(PACKING_ATTENTION)}"
    module = sys.modules.get(type(base).__module__)
    if not attention.startswith("flash") and not hasattr(module, "create_causal_mask"):
        return f"{type(base).__name__} builds its own attention mask, which ignores packed position ids"
    return None


@dataclass(frozen=True)
class Batching:
    collator: Callable[[list[dict]], dict]
    packed: bool
    note: str


def linear_cost_in_tokens(config) -> float:
    """Per-token cost of a layer's projections and MLP, in units of attending to one more position:
    a token attending to L positions then costs about ``linear + L`` (Llama-style layer, multiply-adds)."""
    hidden = getattr(config, "hidden_size", None)
    if not hidden:
        return 3000.0  # SmolLM2-135M's value; only used to choose a layout
    heads = getattr(config, "num_attention_heads", 1) or 1
    kv_heads = getattr(config, "num_key_value_heads", heads) or heads
    mlp = getattr(config, "intermediate_size", 4 * hidden) or 4 * hidden
    projections = 2 * hidden * hidden + 2 * hidden * hidden * kv_heads / heads + 3 * hidden * mlp
    return projections / (2 * hidden)  # attention: hidden MACs for the score, hidden for the value, per position


class AutoCollator:
    """Per batch, packed or padded, whichever costs less; the loss is the same either way."""

    def __init__(self, pad_token_id: int, linear_cost: float, varlen_attention: bool) -> None:
        self.pad, self.pack = PadCollator(pad_token_id), PackCollator()
        self.linear_cost, self.varlen_attention = linear_cost, varlen_attention
        self.packed_batches = self.padded_batches = 0

    def prefers_packing(self, lengths: list[int]) -> bool:
        if self.varlen_attention:
            return True  # each example attends within itself: packing only removes padding
        total, longest = sum(lengths), max(lengths)
        return total * (self.linear_cost + total) <= len(lengths) * longest * (self.linear_cost + longest)

    def __call__(self, features: list[dict]) -> dict:
        if self.prefers_packing([len(f["input_ids"]) for f in features]):
            self.packed_batches += 1
            return self.pack(features)
        self.padded_batches += 1
        return self.pad(features)


def build_collator(model, tokenizer, *, task: str, packing: bool | str) -> Batching:
    """The collator for the recipe's ``data.packing`` on this model (``auto``: cheaper layout per batch)."""
    blocker = packing_blocker(model, task)
    if packing is True and blocker:
        raise FtuneError(f"data.packing: true, but {blocker}; set data.packing: auto or false")
    if packing is False or blocker:
        reason = "data.packing: false" if packing is False else blocker
        return Batching(PadCollator(tokenizer.pad_token_id), False, f"Batching: dynamic padding ({reason})")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    attention = base.config._attn_implementation
    refusal = None
    if attention == "sdpa":
        from ftune.packed_attention import verify

        if (refusal := verify(model)) is None:  # the model now attends example by example
            return Batching(PackCollator(share_prefix=True), True,
                            "Batching: padding-free packing, every batch (sdpa example by example; a prefix all of a "
                            "batch's examples open with is computed once)")
    if packing is True:
        return Batching(PackCollator(), True, "Batching: padding-free packing (position ids restart per example)")
    varlen = attention.startswith("flash")
    collator = AutoCollator(tokenizer.pad_token_id, linear_cost_in_tokens(base.config), varlen)
    how = "every batch packed (flash attention)" if varlen else f"each batch packed or padded, whichever costs less with {attention}"
    return Batching(collator, True, f"Batching: padding-free packing where it pays ({how}{'; ' + refusal if refusal else ''})")
