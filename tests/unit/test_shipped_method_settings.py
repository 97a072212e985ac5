"""Method defaults are the settings that work, so a shipped recipe names only what it changes: every key of a shipped
recipe's method section is either at the method's default or carries a comment on its line saying why it differs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ftune.recipe.methods import method_class

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))


def method_lines(text: str) -> dict[str, str]:
    """The method section's lines by dotted key (``lora.r`` for a nested key)."""
    lines = text.splitlines()
    if "method:" not in lines:
        return {}
    found: dict[str, str] = {}
    parents: list[tuple[int, str]] = []
    for line in lines[lines.index("method:") + 1:]:
        if line.strip().startswith("#") or not line.strip():
            continue
        if not line.startswith(" "):
            break
        indent = len(line) - len(line.lstrip())
        key = line.split(":", 1)[0].strip()
        while parents and parents[-1][0] >= indent:
            parents.pop()
        found[".".join([*(k for _, k in parents), key])] = line
        parents.append((indent, key))
    return found


def leaves(section: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in section.items():
        if isinstance(value, dict):
            out.update(leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def differing_without_a_comment(text: str) -> list[str]:
    section = yaml.safe_load(text).get("method")
    if not section:
        return []
    cls = method_class(section["name"])
    defaults = leaves(cls.model_validate({"name": section["name"]}).model_dump())
    chosen = leaves(cls.model_validate(section).model_dump())
    lines = method_lines(text)
    written = leaves(section)
    return [key for key in written if key != "name" and chosen[key] != defaults[key] and "#" not in lines[key]]


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(REPO / "recipes")) for p in RECIPES])
def test_each_method_key_is_the_default_or_says_why_not(path):
    assert differing_without_a_comment(path.read_text()) == [], f"{path}: comment why these method keys differ from the defaults"


def test_the_check_sees_an_uncommented_change_and_nested_keys():
    text = "method:\n  name: unipelt\n  lora:\n    r: 4\n    alpha: 16  # the default\n  gates: true\ntraining:\n  batch_size: 8\n"
    assert differing_without_a_comment(text) == ["lora.r"]
    assert differing_without_a_comment(text.replace("r: 4", "r: 4  # smaller for the tiny task")) == []
    assert differing_without_a_comment("method:\n  name: mam\n  bottleneck: 64\n") == []  # at the default: no comment needed
