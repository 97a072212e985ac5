"""Read raw rows from the files a recipe names, keeping each row's origin (file and line) for error messages."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ftune.errors import FtuneError, raise_problems

@dataclass(frozen=True)
class Row:
    origin: str  # "path:line" for JSONL, "path[index]" for a JSON array
    fields: dict


def read_rows(path: str) -> list[Row]:
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FtuneError(f"{path}: cannot read dataset file: {exc}") from None
    if file.suffix == ".json":
        return _json_rows(path, text)
    rows, problems = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(value, dict):
            problems.append(f"{path}:{number}: a row must be a JSON object, got {type(value).__name__}")
            continue
        rows.append(Row(f"{path}:{number}", value))
    raise_problems(problems)
    if not rows:
        raise FtuneError(f"{path}: dataset file has no rows")
    return rows


def _json_rows(path: str, text: str) -> list[Row]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FtuneError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(value, list) or not value:
        raise FtuneError(f"{path}: a .json dataset must be a non-empty array of row objects")
    raise_problems([f"{path}[{i}]: a row must be a JSON object" for i, item in enumerate(value) if not isinstance(item, dict)])
    return [Row(f"{path}[{i}]", item) for i, item in enumerate(value)]


def fingerprint(paths: list[str]) -> str:
    """Content hash of the data files: what the manifest records and caches key on."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(Path(path).name.encode())
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()
