"""Reading the text files users hand ftune (recipes, data): UTF-8, and a decoding error names the line."""

from __future__ import annotations

from pathlib import Path

from ftune.errors import FtuneError


def read_utf8(path: Path, *, shown: str | None = None) -> str:
    """The text of ``path``, without a leading byte-order mark; a non-UTF-8 byte is an error naming its line."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise FtuneError(
            f"{shown or path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x} at column {column}); save the file as UTF-8"
        ) from err
