"""The pretrain stage: raw text, every token trained, packed into full ``data.max_length`` blocks.

Documents (each ending with EOS) are laid end to end and cut into blocks of ``max_length`` tokens, so
no token is padding and a long document continues in the next block instead of being truncated.
Within a block, the collator splits the pieces of different documents apart and hands them to the
padding-free packing collator SFT uses (position ids restart per piece, the model's mask builder makes
the attention block-diagonal), so no document attends to another: the loss of a packed block equals
the token-weighted loss of its documents trained one by one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ftune.errors import FtuneError


class Blocks(Sequence):
    """Tokenized documents as consecutive ``max_length`` blocks (the last one may be shorter)."""

    def __init__(self, documents, max_length: int) -> None:
        pieces = [np.asarray(doc["input_ids"], dtype=np.int64) for doc in documents]
        self.ids = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
        self.starts = np.cumsum([0] + [len(p) for p in pieces])[:-1]  # where each document begins
        self.max_length = max_length

    def __len__(self) -> int:
        return -(-len(self.ids) // self.max_length)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not 0 <= index < len(self):
            raise IndexError(index)
        start = index * self.max_length
        end = min(start + self.max_length, len(self.ids))
        inner = self.starts[(self.starts > start) & (self.starts < end)] - start
        block = self.ids[start:end]
        return {"input_ids": block, "labels": block.copy(), "documents": np.diff([0, *inner.tolist(), len(block)])}

    def lengths(self) -> np.ndarray:
        return np.asarray([min(self.max_length, len(self.ids) - i * self.max_length) for i in range(len(self))])


class BlockCollator:
    """Packed batch of blocks, each block split at its document boundaries so documents stay apart."""

    def __init__(self) -> None:
        from ftune.data.collate import PackCollator

        self.pack = PackCollator()

    def __call__(self, blocks: list[dict]) -> dict:
        pieces = []
        for block in blocks:
            at = 0
            for length in block["documents"]:
                pieces.append({"input_ids": list(block["input_ids"][at:at + length]), "labels": list(block["labels"][at:at + length])})
                at += length
        return self.pack(pieces)


def pretrain_spec(model, tokenizer, splits, recipe, *, liger: bool = False):
    """Full blocks, documents kept apart; every token is a target, so the model's own loss over all positions is it
    (computed a chunk of positions at a time in blocks longer than the loss chunk)."""
    from transformers import Trainer

    from ftune.data.collate import packing_blocker
    from ftune.recipe.tasks import CAUSAL_LM
    from ftune.training.chunked_loss import LOSS_CHUNK, chunking_blocker
    from ftune.training.label_positions import keeps_labelled_positions, labelled_positions_blocker, loss_at_labelled_positions, \
        router_aux_loss_coefficient
    from ftune.training.trainer import TrainerSpec

    if blocker := packing_blocker(model, CAUSAL_LM):
        raise FtuneError(f"stage: pretrain packs documents into blocks, but {blocker}; use a method and model that support packing")
    loss = ("Loss: Liger's fused linear cross-entropy (the logits are never materialised)",) if liger else ()
    collator, loss_func = BlockCollator(), None
    if not liger and recipe.data.max_length > LOSS_CHUNK and chunking_blocker(model) is None and \
            labelled_positions_blocker(model, recipe.method.name) is None:  # blocks past the chunk: the head a chunk at a time
        collator = keeps_labelled_positions(collator, LOSS_CHUNK)
        loss_func = loss_at_labelled_positions(router_aux_loss_coefficient(model), model)
        loss = (f"Loss: LM head and cross-entropy {LOSS_CHUNK} positions at a time",)
    return TrainerSpec(Trainer, splits.train, splits.eval or None, options={"use_liger_kernel": liger}, collator=collator,
                       loss_func=loss_func, counts_example_tokens=True,
                       notes=("Batching: full blocks, documents kept apart (position ids restart per document)", *loss))


@dataclass
class BlockSplits:
    train: Blocks
    eval: Blocks
    stats: object
    heldout: list
    notes: list
    label_names: None = None


def build_block_splits(recipe, tokenizer):
    """The recipe's raw text as blocks; documents are tokenized whole (never truncated) and must all be text rows."""
    from ftune.data import build_datasets

    whole = recipe.data.model_copy(update={"max_length": 2**31 - 1})  # blocks cut documents, tokenization must not
    splits = build_datasets(whole, tokenizer, recipe.task)
    if not all(np.array_equal(e["input_ids"], e["labels"]) for split in (splits.train, splits.eval) for e in split):
        raise FtuneError("stage: pretrain trains on raw text (format: text, a 'text' column); chat or instruction rows belong in "
                         "stage: sft")
    length = recipe.data.max_length
    return BlockSplits(Blocks(splits.train, length), Blocks(splits.eval, length), splits.train_stats, splits.heldout, splits.notes)


def describe_blocks(splits: BlockSplits) -> str:
    from ftune.training.rows import describe_rows

    return describe_rows(f"Data: {len(splits.train):,} train / {len(splits.eval):,} eval blocks of up to {splits.train.max_length} "
                         f"tokens, {len(splits.train.ids):,} train tokens (100% trained)", splits.notes)
