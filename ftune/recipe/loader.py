"""Read a recipe YAML, apply ``--set`` overrides, validate, and turn every problem into one precise line.

Each line names the dotted key, the YAML line it came from (or ``--set``), what is wrong, and a
did-you-mean suggestion for misspelled keys and choices.
"""

from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ftune.errors import FtuneError
from ftune.text_files import read_utf8
from ftune.recipe.methods import method_class, method_names
from ftune.recipe.grpo import REWARD_KINDS
from ftune.recipe.paths import FINISHED_RUN
from ftune.recipe.schema import Recipe

Loc = tuple[str | int, ...]


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise FtuneError(f"{path}: recipe file not found")
    text = read_utf8(path)
    try:
        raw = yaml.safe_load(text)
        lines = _line_index(yaml.compose(text))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise FtuneError(f"{path}{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise FtuneError(f"{path}: a recipe is a mapping of sections (model, data, method, ...), got {type(raw).__name__}")
    overridden = apply_overrides(raw, overrides)
    return validate_recipe(raw, source=str(path), lines=lines, overridden=overridden)


def validate_recipe(
    raw: dict, *, source: str = "recipe", lines: dict[Loc, int] | None = None, overridden: set[Loc] = frozenset(),
    finished_run: bool = False,
) -> Recipe:
    """``finished_run``: the saved recipe of a run directory, whose data and model paths need not exist any more."""
    try:
        return Recipe.model_validate(raw, context={FINISHED_RUN: finished_run})
    except ValidationError as exc:
        problems = [_describe(err, source, lines or {}, overridden) for err in exc.errors()]
        raise FtuneError(*dict.fromkeys(problems)) from exc


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> set[Loc]:
    """Merge ``a.b.c=value`` strings into ``raw`` in place; values are parsed as YAML (1e-4, true, [a, b])."""
    touched: set[Loc] = set()
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise FtuneError(f"--set {item!r}: expected KEY=VALUE, e.g. --set training.learning_rate=1e-4")
        parts = [int(p) if p.isdigit() else p for p in key.strip().split(".")]
        node: Any = raw
        for depth, part in enumerate(parts[:-1]):
            child = node[part] if isinstance(node, list) and isinstance(part, int) and part < len(node) else None
            if isinstance(node, dict):
                child = node.setdefault(part, {})
                if child is None:
                    child = node[part] = {}
            if not isinstance(child, (dict, list)):
                prefix = ".".join(map(str, parts[: depth + 1]))
                raise FtuneError(f"--set {key}: '{prefix}' is not a section, cannot set a key inside it")
            node = child
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        if isinstance(node, list):
            if not isinstance(parts[-1], int) or parts[-1] >= len(node):
                raise FtuneError(f"--set {key}: index {parts[-1]} is out of range")
        node[parts[-1]] = parsed
        touched.add(tuple(parts))
    return touched


def _line_index(node: yaml.Node | None, path: Loc = (), out: dict[Loc, int] | None = None) -> dict[Loc, int]:
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = path + (key_node.value,)
            out[child] = key_node.start_mark.line + 1
            _line_index(value_node, child, out)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            out[path + (index,)] = item.start_mark.line + 1
            _line_index(item, path + (index,), out)
    return out


def _user_loc(loc: Loc) -> Loc:
    """Drop pydantic's union-tag segment (``method.lora.r`` -> ``method.r``, ``grpo.rewards.0.regex.pattern`` -> ``grpo.rewards.0.pattern``)."""
    if len(loc) >= 2 and loc[0] == "method" and loc[1] in method_names():
        return (loc[0],) + loc[2:]
    if len(loc) >= 4 and loc[:2] == ("grpo", "rewards") and loc[3] in REWARD_KINDS:  # grpo.rewards.0.regex.pattern
        return loc[:3] + loc[4:]
    return loc


def _describe(err: dict, source: str, lines: dict[Loc, int], overridden: set[Loc]) -> str:
    loc = _user_loc(tuple(err["loc"]))
    if err["type"] == "union_tag_not_found" and (typo := _misspelt_name(err.get("input"))):
        loc = loc + (typo,)
    dotted = ".".join(map(str, loc)) or "recipe"
    if any(loc[: len(o)] == o or o[: len(loc)] == loc for o in overridden):
        where = " (--set)"
    else:
        line = next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines), None)
        where = f" (line {line})" if line else ""
    return f"{source}: {dotted}{where}: {_message(err, loc)}"


def _message(err: dict, loc: Loc) -> str:
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "extra_forbidden":
        allowed = [f for f in _fields_at(tuple(err["loc"])[:-1]) if f != "name"]
        return f"unknown key '{loc[-1]}'{_did_you_mean(str(loc[-1]), allowed)}" + (
            f"; valid keys: {', '.join(allowed)}" if allowed and not _close(str(loc[-1]), allowed) else ""
        )
    if kind == "missing":
        return "required key is missing"
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'|(\b\d+\b)", ctx.get("expected", ""))
        options = [a or b for a, b in choices]
        return f"{value!r} is not one of {', '.join(options)}{_did_you_mean(str(value), options)}"
    if kind == "union_tag_invalid":
        return f"unknown method {ctx.get('tag')!r}{_did_you_mean(str(ctx.get('tag')), method_names())} (available: {', '.join(method_names())})"
    if kind == "union_tag_not_found":
        typo = _misspelt_name(value)
        if typo:
            return f"unknown key '{typo}'. Did you mean 'name'? (it picks the method: {', '.join(method_names())})"
        return f"'name' is required; available: {', '.join(method_names())}"
    message = err["msg"].removeprefix("Value error, ").replace("Input should be", "must be")
    if kind.endswith(("_type", "_parsing")) or kind.startswith(("greater", "less")):
        message += f", got {value!r}"
    return message


def _misspelt_name(section: Any) -> str | None:
    """The key of a method section without ``name`` that looks like a misspelt ``name``."""
    keys = [str(k) for k in section] if isinstance(section, dict) else []
    return next((k for k in keys if _close(k, ["name"])), None)


def _close(word: str, options: list[str]) -> list[str]:
    return difflib.get_close_matches(word, options, n=1, cutoff=0.6)


def _did_you_mean(word: str, options: list[str]) -> str:
    match = _close(word, options)
    return f". Did you mean '{match[0]}'?" if match else ""


def _fields_at(raw_loc: Loc) -> list[str]:
    """Field names of the schema model at pydantic's ``raw_loc`` (union tags included), for suggestions."""
    model: type[BaseModel] | None = Recipe
    parts = [p for p in raw_loc if not isinstance(p, int)]
    while parts and model is not None:
        part = parts.pop(0)
        if part == "method" and model is Recipe:
            model = method_class(parts.pop(0)) if parts else None
            continue
        field = model.model_fields.get(part)
        model = _model_in(field.annotation) if field else None
    return list(model.model_fields) if model else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None
