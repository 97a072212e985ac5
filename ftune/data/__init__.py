"""Data: read the recipe's sources, convert rows to records, split, mix, tokenize and batch them.

The modules go in that order: ``sources`` (files, directories, hub datasets), ``formats`` (row
layouts -> records, with ``turns`` for chat turns, ``tools`` for tool schemas and calls, and
``preference`` for preference rows), ``splits`` (eval carving, mixing), ``templates`` and ``tokenize`` (chat
rendering, response masking), ``collate`` (padding and packing), ``cache``, ``heldout`` (what eval
and merge score on) and ``pipeline``, which chains them for training.
"""

from ftune.data.collate import PadCollator, build_collator
from ftune.data.pipeline import DataSplits, build_datasets, data_fingerprint, describe_splits, load_records, tokenize_splits

__all__ = ["DataSplits", "PadCollator", "build_collator", "build_datasets", "data_fingerprint", "describe_splits", "load_records", "tokenize_splits"]
