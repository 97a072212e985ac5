"""The tokenized-data cache shared by runs and ranks: two processes tokenizing the same data at the same moment both
succeed and leave one entry; an entry damaged on disk (a flipped byte that still loads) is detected by its manifest
and rebuilt, never read."""

from __future__ import annotations

import multiprocessing

import numpy as np
import pytest

import ftune.data.cache as cache
from ftune.data.cache import MANIFEST, entry_damage, load_cached
from ftune.data.tokenize import TokenizedExamples
from tests.unit.test_data_cache import build, cache_dir, files  # noqa: F401  (fixtures)


def tokenize_together(barrier, data_files, results) -> None:
    """In a child: tokenize (a cache miss), wait until the other process has too, then both save at once."""
    save = cache.save_cached

    def save_together(key, splits):
        barrier.wait(timeout=60)
        return save(key, splits)

    cache.save_cached = save_together
    splits = build(data_files)
    results.put((str(splits.cache_path), splits.from_cache, splits.train.input_ids.tolist()))


def test_two_processes_tokenizing_the_same_data_at_once_leave_one_entry(cache_dir, files):  # noqa: F811
    context = multiprocessing.get_context("fork")  # the children inherit the tokenizer already imported here
    barrier, results = context.Barrier(2), context.Queue()
    children = [context.Process(target=tokenize_together, args=(barrier, files, results)) for _ in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(120)
    assert [child.exitcode for child in children] == [0, 0]
    (path_a, cached_a, ids_a), (path_b, cached_b, ids_b) = results.get(timeout=5), results.get(timeout=5)
    assert path_a == path_b and not cached_a and not cached_b and ids_a == ids_b  # both tokenized, both got the entry
    assert [p.name for p in (cache_dir / "data").iterdir()] == [path_a.rsplit("/", 1)[-1]]  # one entry, no staging left
    assert entry_damage(cache_dir / "data" / path_a.rsplit("/", 1)[-1]) is None
    again = build(files)
    assert again.from_cache and again.train.input_ids.tolist() == ids_a


@pytest.mark.parametrize("damaged", ["train.npz", "meta.json"])
def test_a_corrupted_entry_is_rebuilt_never_read(cache_dir, files, monkeypatch, damaged):  # noqa: F811
    first = build(files)
    entry = first.cache_path
    raw = bytearray((entry / damaged).read_bytes())
    if damaged == "meta.json":  # still valid JSON, so only the manifest can tell: one count changed
        raw = bytearray(bytes(raw).replace(b'"tokens": ', b'"tokens": 1', 1))
    else:  # one bit of a stored token id
        ids = TokenizedExamples.load(entry / "train.npz").input_ids
        raw[bytes(raw).find(ids.tobytes())] ^= 0x01
    (entry / damaged).write_bytes(bytes(raw))
    assert entry_damage(entry).startswith(f"{damaged} is damaged")

    with monkeypatch.context() as patch:
        patch.setattr(TokenizedExamples, "load", lambda path: pytest.fail(f"read the damaged entry {path}"))
        assert load_cached(entry.name) is None
    again = build(files)
    assert not again.from_cache and again.cache_path == entry
    assert np.array_equal(again.train.input_ids, first.train.input_ids) and again.train_stats == first.train_stats
    assert entry_damage(entry) is None and build(files).from_cache
    assert sorted(p.name for p in entry.parent.iterdir()) == [entry.name]  # the damaged copy is gone


def test_an_entry_without_its_manifest_is_unfinished(cache_dir, files):  # noqa: F811
    first = build(files)
    (first.cache_path / MANIFEST).unlink()
    assert load_cached(first.cache_path.name) is None
    assert not build(files).from_cache and build(files).from_cache
