"""Each file's size and SHA-256, recorded once a folder is complete and checked before the folder is trusted again.

A checkpoint's completion marker and a data-cache entry's manifest hold this record, so a file truncated or
corrupted after it was written (a failing disk, a copy cut short, a stray edit) is named instead of loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

CHUNK = 1 << 20


def digest(path: Path, *, sync: bool = False) -> str:
    """SHA-256 of ``path``; ``sync`` also flushes it to the device (one pass over a file just written)."""
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            sha.update(chunk)
        if sync:
            os.fsync(handle.fileno())
    return sha.hexdigest()


def record(folder: Path, *, skip: tuple[str, ...] = (), sync: bool = False) -> dict:
    """``{relative path: {"size", "sha256"}}`` of every file under ``folder`` but ``skip``."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() not in skip)
    return {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": digest(p, sync=sync)} for p in files}


def damage(folder: Path, recorded: dict) -> str | None:
    """What differs from ``recorded`` (the first damaged file, named), or None when every file is as it was written."""
    for name, expected in recorded.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{name} is damaged ({size:,} bytes, {expected['size']:,} when written)"
    for name, expected in recorded.items():  # sizes first: a truncation is named without reading every file
        if digest(folder / name) != expected["sha256"]:
            return f"{name} is damaged (its SHA-256 differs from the one recorded when it was written)"
    return None


def read_record(path: Path) -> dict | None:
    """The file record stored in the JSON file ``path`` (under "files"), None when it holds none (an older marker)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    files = data.get("files") if isinstance(data, dict) else None
    return files if isinstance(files, dict) else None
