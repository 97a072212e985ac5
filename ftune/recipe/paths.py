"""How recipe paths are checked: they must exist when a recipe is about to run, not when a finished run is reread."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import ValidationInfo

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # org/name, as the hub spells ids
FINISHED_RUN = "finished_run"  # validation context of a run directory's saved recipe


def checks_paths(info: ValidationInfo) -> bool:
    """False when re-reading a finished run's recipe: its inputs may be gone (the run was moved or
    copied elsewhere), and eval/merge/export need only what the run directory holds."""
    return not (info.context or {}).get(FINISHED_RUN, False)


def existing_path(value: str, what: str) -> str:
    path = Path(value).expanduser()
    if not path.exists():
        raise ValueError(f"{what} '{value}' does not exist (relative paths are read from the current directory)")
    return str(path.resolve())
