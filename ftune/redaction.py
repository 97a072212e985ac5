"""Secrets never reach a run's files: the values of secret-looking environment variables are masked in what ftune writes.

A Hub token, a tracker's API key or any variable whose name says it is a secret (TOKEN, KEY, SECRET, PASSWORD,
CREDENTIALS, AUTH...) can leak into an artifact by accident: the command line recorded in manifest.json, a recipe
value passed with --set, a log line. Rather than trusting every writer to leave them out, the run directory's one
text writer (``run_dir.write_text_atomic``) masks every such value it finds.
"""

from __future__ import annotations

import functools
import os
import re

# A part of a variable's name (split at "_") that marks its value secret: HF_TOKEN, WANDB_API_KEY, AWS_SECRET_ACCESS_KEY,
# DB_PASSWORD, OPENAIKEY. TOKENIZERS_PARALLELISM does not match: only a part ending in the word counts.
SECRET_NAME = re.compile(r"(TOKEN|KEY|SECRET|PASSWORD|PASSWD|PASSPHRASE|CREDENTIALS?|AUTH|PAT)$")
NOT_SECRET = {"PWD", "OLDPWD"}
MIN_LENGTH = 8  # shorter values ("1", "true") are too common in text to mask, and too short to be a credential
MASK = "***"


def is_secret_name(name: str) -> bool:
    return name.upper() not in NOT_SECRET and any(SECRET_NAME.search(part) for part in name.upper().split("_") if part)


def secret_values(environ=None) -> list[str]:
    """Values to mask, longest first (so a value containing another is masked whole): secret-named environment
    variables and the Hub token stored by ``hf auth login``."""
    environ = os.environ if environ is None else environ
    values = {value for name, value in environ.items() if is_secret_name(name) and len(value) >= MIN_LENGTH}
    stored = hub_token()
    if stored and len(stored) >= MIN_LENGTH:
        values.add(stored)
    return sorted(values, key=len, reverse=True)


@functools.cache
def hub_token() -> str | None:
    """The token huggingface_hub would send (its environment variable or its stored login), if any; read once."""
    try:
        from huggingface_hub import get_token
    except ImportError:
        return None
    try:
        return get_token()
    except Exception:  # an unreadable token file is no reason to fail a write
        return None


def redact(text: str, environ=None) -> str:
    for value in secret_values(environ):
        text = text.replace(value, MASK)
    return text
