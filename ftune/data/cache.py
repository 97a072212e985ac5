"""On-disk cache of tokenized splits under ``$FTUNE_CACHE_DIR/data/<key>/``.

The key hashes everything the tokenized output depends on: the data files' bytes (or a hub
dataset's fingerprint), the tokenizer (its serialized vocabulary, merges and special tokens), the
chat template, the task and every data option. Packing is not in the key: it only changes how
batches are collated. An entry is written to a staging folder and renamed into place, so a crash
never leaves a half-written entry that a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from ftune.data.sources import source_fingerprint
from ftune.data.tokenize import TokenizedExamples, TokenizeStats
from ftune.recipe.data import DataConfig

# Bump when the same inputs would tokenize differently (masking rules, stored layout).
CACHE_VERSION = 4  # 2: entries carry the held-out records; 3: tool schemas rendered, records carry them; 4: KTO labels, column notes
# Data options that change batching only, not the tokenized examples.
COLLATION_ONLY = ("packing", "cache")


def cache_root() -> Path:
    from ftune.model import cache_dir

    return cache_dir() / "data"


def tokenizer_fingerprint(tokenizer) -> str:
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    ids = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "unk")}
    digest.update(json.dumps([ids, tokenizer.chat_template or ""], sort_keys=True, default=str).encode())
    return digest.hexdigest()


def cache_key(config: DataConfig, task: str, tokenizer) -> str:
    options = config.model_dump(mode="json", exclude=set(COLLATION_ONLY))
    sources = {
        split: [source_fingerprint(source, f"data.{split}.{i}") for i, source in enumerate(getattr(config, split))]
        for split in ("train", "eval")
    }
    material = {"version": CACHE_VERSION, "task": task, "options": options, "sources": sources,
                "tokenizer": tokenizer_fingerprint(tokenizer)}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:32]


def load_cached(key: str) -> dict | None:
    """The cached entry (train/eval examples, stats, label names, notes), or None on a miss."""
    folder = cache_root() / key
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        return {
            "train": TokenizedExamples.load(folder / "train.npz"),
            "eval": TokenizedExamples.load(folder / "eval.npz"),
            "train_stats": TokenizeStats(**meta["train_stats"]),
            "eval_stats": TokenizeStats(**meta["eval_stats"]),
            "label_names": meta["label_names"],
            "heldout": meta["heldout"],
            "notes": meta["notes"],
            "cache_path": folder,
        }
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing or unreadable entries are simply rebuilt


def save_cached(key: str, splits) -> Path:
    from ftune.run_dir import atomic_dir

    folder = cache_root() / key
    try:
        with atomic_dir(folder) as staging:  # an unreadable entry (load_cached missed it) is replaced
            splits.train.save(staging / "train.npz")
            splits.eval.save(staging / "eval.npz")
            meta = {"train_stats": asdict(splits.train_stats), "eval_stats": asdict(splits.eval_stats),
                    "label_names": splits.label_names, "heldout": splits.heldout, "notes": splits.notes}
            (staging / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False), encoding="utf-8")
    except OSError:
        if not (folder / "meta.json").is_file():  # another process may have written the same entry first
            raise
    return folder
