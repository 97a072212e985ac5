"""Read raw rows from the sources a recipe names: local JSONL/JSON/CSV/Parquet files, directories of
them, and hub datasets. Each row keeps its origin (``file:line`` or ``file[row N]``) for error messages.

A malformed line is a row problem (the caller fails or skips it per ``data.on_error``); a missing or
unreadable source is an error naming the recipe entry (``data.train.1.path``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ftune.errors import FtuneError, raise_problems
from ftune.recipe.data import DATA_SUFFIXES, DatasetSource
from ftune.text_files import read_utf8


@dataclass(frozen=True)
class Row:
    origin: str  # "path:line" for line-based files, "path[row N]" (0-based) otherwise
    fields: dict


def shown_path(path: Path | str) -> str:
    """A path as the user would write it: relative to the working directory when inside it."""
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


def source_name(source: DatasetSource) -> str:
    if source.hub is not None:
        return f"{source.hub}" + (f" ({source.config})" if source.config else "") + f" [{source.split or 'train'}]"
    return shown_path(source.path)


def _text(path: Path) -> str:
    return read_utf8(path, shown=shown_path(path))  # spreadsheet exports often start with a BOM: dropped


def _json_lines(name: str, text: str, problems: list[str]) -> list[Row]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{name}:{number}: not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(value, dict):
            problems.append(f"{name}:{number}: a row must be a JSON object, got {type(value).__name__}")
            continue
        rows.append(Row(f"{name}:{number}", value))
    return rows


def _jsonl_rows(path: Path, problems: list[str]) -> list[Row]:
    return _json_lines(shown_path(path), _text(path), problems)


def _json_rows(path: Path, problems: list[str]) -> list[Row]:
    name, text = shown_path(path), _text(path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # one object per line under a .json name
            return _json_lines(name, text, problems)
        raise FtuneError(f"{name}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(value, list):
        raise FtuneError(f"{name}: a .json dataset must be an array of row objects (or JSON Lines), got {type(value).__name__}")
    rows = []
    for index, item in enumerate(value):
        if isinstance(item, dict):
            rows.append(Row(f"{name}[row {index}]", item))
        else:
            problems.append(f"{name}[row {index}]: a row must be a JSON object, got {type(item).__name__}")
    return rows


def _csv_rows(path: Path, problems: list[str]) -> list[Row]:
    name, rows = shown_path(path), []
    reader = csv.DictReader(io.StringIO(_text(path)))
    reader.fieldnames  # reads the header, so line_num counts from it
    line = reader.line_num + 1
    for record in reader:
        if None in record:
            problems.append(f"{name}:{line}: the row has more cells than the header has columns")
        elif any(value is None for value in record.values()):
            problems.append(f"{name}:{line}: the row has fewer cells than the header has columns")
        else:
            rows.append(Row(f"{name}:{line}", record))
        line = reader.line_num + 1
    return rows


def _parquet_rows(path: Path, problems: list[str]) -> list[Row]:
    import pyarrow.parquet as pq

    name = shown_path(path)
    return [Row(f"{name}[row {index}]", item) for index, item in enumerate(pq.read_table(path).to_pylist())]


READERS = {".jsonl": _jsonl_rows, ".json": _json_rows, ".csv": _csv_rows, ".parquet": _parquet_rows}
assert READERS.keys() == set(DATA_SUFFIXES)


def read_file(path: Path, problems: list[str], *, where: str) -> list[Row]:
    """Rows of one local file; bad lines are appended to ``problems``; file errors start with ``where``."""
    try:
        return READERS[path.suffix](path, problems)
    except FtuneError as exc:
        raise FtuneError(*(f"{where}: {p}" for p in exc.problems)) from exc
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise FtuneError(f"{where}: cannot read {shown_path(path)}: {exc}") from exc
    except Exception as exc:  # pyarrow raises its own error types for corrupt files
        raise FtuneError(f"{where}: cannot read {shown_path(path)} as {path.suffix[1:]}: {exc}") from exc


def source_files(path: Path) -> list[Path]:
    """The data files a path stands for: itself, or a directory's supported files sorted by name."""
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and p.suffix in DATA_SUFFIXES)
    return [path]


def load_hub_dataset(source: DatasetSource, key: str):
    from datasets import load_dataset

    try:
        return load_dataset(source.hub, source.config, split=source.split or "train", revision=source.revision)
    except Exception as exc:  # network, auth, unknown config/split: all mean "cannot get this dataset"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FtuneError(
            f"{key}.hub: cannot load '{source.hub}' (config {source.config or 'default'}, split {source.split or 'train'}): "
            f"{reason}; this needs network access, or download the data and point {key}.path to the files"
        ) from exc


def read_source(source: DatasetSource, problems: list[str], *, key: str) -> list[Row]:
    """Rows of one recipe entry (``key`` is its dotted recipe path, e.g. ``data.train.1``)."""
    if source.hub is not None:
        dataset = load_hub_dataset(source, key)
        where = f"{source.hub}[{source.split or 'train'}]"
        return [Row(f"{where}[row {index}]", dict(item)) for index, item in enumerate(dataset)]
    path = Path(source.path)
    if not path.exists():
        raise FtuneError(f"{key}.path: {shown_path(path)} does not exist")
    rows = []
    for file in source_files(path):
        rows.extend(read_file(file, problems, where=f"{key}.path"))
    if not rows and not problems:
        raise FtuneError(f"{key}.path: {shown_path(path)} has no rows")
    return rows


def read_rows(path: str, *, where: str = "--split") -> list[Row]:
    """Rows of one local file or directory, failing on any bad line (for one-off files such as ``eval --split``)."""
    problems: list[str] = []
    rows = []
    for file in source_files(Path(path)):
        rows.extend(read_file(file, problems, where=where))
    raise_problems(problems)
    if not rows:
        raise FtuneError(f"{path}: dataset file has no rows")
    return rows


_file_digests: dict[tuple[str, int, int], str] = {}


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, memoised per (path, size, mtime) within the process."""
    stat = path.stat()
    memo = (str(path), stat.st_size, stat.st_mtime_ns)
    if memo not in _file_digests:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _file_digests[memo] = digest.hexdigest()
    return _file_digests[memo]


def source_fingerprint(source: DatasetSource, key: str = "data") -> str:
    """Content hash of one entry: its files' bytes (names relative to the entry), or the hub dataset's fingerprint."""
    if source.hub is not None:
        dataset = load_hub_dataset(source, key)
        return hashlib.sha256(f"hub:{source.hub}:{source.config}:{dataset._fingerprint}".encode()).hexdigest()
    path = Path(source.path)
    digest = hashlib.sha256()
    for file in source_files(path):
        digest.update(file.name.encode() + b"\0" + file_digest(file).encode())
    return digest.hexdigest()


def fingerprint(sources: list[DatasetSource]) -> str:
    """Content hash of all data a recipe reads: what the manifest records."""
    digest = hashlib.sha256()
    for source in sources:
        digest.update(source_fingerprint(source).encode())
    return digest.hexdigest()
