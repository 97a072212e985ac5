"""On-disk cache of tokenized splits under ``$FTUNE_CACHE_DIR/data/<key>/``.

The key hashes everything the tokenized output depends on: the data files' bytes (or a hub
dataset's fingerprint), the tokenizer (its serialized vocabulary, merges and special tokens), the
chat template, the task and every data option. Packing is not in the key: it only changes how
batches are collated. An entry is written to a staging folder and renamed into place, so a crash
never leaves a half-written entry that a later run would trust; its manifest records each file's
size and checksum, so an entry damaged on disk later is rebuilt instead of read. Runs tokenizing the
same data at once race only on the final rename, and all end with the one entry that won it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import asdict
from pathlib import Path

from ftune import checksums
from ftune.data.sources import source_fingerprint
from ftune.data.tokenize import TokenizedExamples, TokenizeStats
from ftune.disk import staged_failure
from ftune.errors import FtuneError
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


MANIFEST = "manifest.json"  # each file's size and SHA-256; written last, so an entry without it is unfinished


def load_cached(key: str) -> dict | None:
    """The cached entry (train/eval examples, stats, label names, notes), or None on a miss. An entry whose files
    differ from its manifest (truncated, corrupted, unfinished) is a miss too: it is rebuilt, never read."""
    folder = cache_root() / key
    if entry_damage(folder) is not None:
        return None
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
        return None  # unreadable entries are simply rebuilt


def entry_damage(folder: Path) -> str | None:
    """Why the entry in ``folder`` cannot be trusted (missing, unfinished, a file changed since it was written), or None."""
    if not folder.is_dir():
        return "no entry"
    recorded = checksums.read_record(folder / MANIFEST)
    return f"{MANIFEST} is missing or damaged" if recorded is None else checksums.damage(folder, recorded)


def save_cached(key: str, splits) -> Path:
    """Write the entry for ``key`` and return its folder. Runs (or ranks) tokenizing the same data at once each
    write a private staging folder and rename it into place; the first rename wins, and the others keep the winner's
    entry once it checks out. A damaged entry in the way is moved aside and replaced."""
    folder = cache_root() / key
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=folder.parent))
    try:
        splits.train.save(staging / "train.npz")
        splits.eval.save(staging / "eval.npz")
        meta = {"train_stats": asdict(splits.train_stats), "eval_stats": asdict(splits.eval_stats),
                "label_names": splits.label_names, "heldout": splits.heldout, "notes": splits.notes}
        (staging / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False), encoding="utf-8")
        files = checksums.record(staging, sync=True)
        (staging / MANIFEST).write_text(json.dumps({"files": files}, indent=1), encoding="utf-8")
        for _ in range(3):
            try:
                os.rename(staging, folder)
                return folder
            except OSError as err:
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                if entry_damage(folder) is None:  # another process's entry got there first
                    return folder
                retire(folder)
        raise FtuneError(f"{folder}: the data cache entry keeps being replaced by another process; set data.cache: false "
                         "or run one preprocess at a time (ftune preprocess)")
    except Exception as err:
        full = staged_failure(err, staging, folder)
        if full is None:
            raise
        raise full from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def retire(folder: Path) -> None:
    """Move a damaged entry out of the way in one rename (another process may be retiring it too), then delete it."""
    aside = folder.with_name(f".{folder.name}-damaged-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(folder, aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)
