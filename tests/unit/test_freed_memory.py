"""Pages freed on the C heap go back to the operating system before every training step, so a step's peak memory
does not sit on top of the previous step's leftovers (glibc keeps them otherwise)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import invoke_ok

HEAP = """
import torch
from ftune.resources import current_rss_mib, return_freed_memory
before = current_rss_mib()
blocks = [torch.ones(16_384) for _ in range(8_000)]  # 64 KiB each, under glibc's mmap threshold: served from the heap
kept = blocks[::50]  # a few survivors pin the heap's top, so plain free() cannot shrink it
del blocks
held = current_rss_mib()
print(before, held, int(return_freed_memory()), current_rss_mib())
"""


def test_freed_heap_pages_go_back_to_the_system():
    # A fresh process: the heap holds nothing of an earlier test's.
    out = subprocess.run([sys.executable, "-c", HEAP], capture_output=True, text=True, check=True).stdout.split()
    before, held, trimmed, after = map(float, out)
    assert held - before > 400  # 500 MiB of blocks, about 98% of them freed and still resident
    if not trimmed:  # no glibc (musl, macOS): nothing to call, nothing promised
        return
    assert after - before < 0.2 * (held - before)


@pytest.mark.parametrize("long_rows", [True, False], ids=["long-rows", "short-rows"])
def test_every_step_of_a_long_row_run_starts_with_the_freed_pages_returned(make_recipe, monkeypatch, tmp_path, long_rows):
    # Short rows skip it: there the next step page-faults the returned pages back in, for little memory saved.
    import ftune.training.trainer

    calls = []
    monkeypatch.setattr(ftune.training.trainer, "return_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(ftune.training.trainer, "TRIMMED_LENGTH", 64 if long_rows else 65)  # the tiny recipe's max_length: 64
    recipe = make_recipe(training={"max_steps": 3, "batch_size": 2, "save_steps": 100, "logging_steps": 1})
    invoke_ok("train", recipe)
    assert len(calls) == (3 if long_rows else 0)
    assert (Path(tmp_path) / "run" / "model").is_dir()
