"""The recipe reference, generated from the schema so the docs can never drift from what is validated."""

from __future__ import annotations

import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from ftune.recipe.methods import METHOD_CLASSES, method_names
from ftune.recipe.schema import Recipe


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(repr(a) if isinstance(a, str) else str(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " \\| ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is list:
        return f"list[{_type_name(typing.get_args(annotation)[0])}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return "(section)"
    return "null" if value is None else repr(value)


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        nested = next((a for a in (field.annotation, *typing.get_args(field.annotation)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if nested is not None and name != "method":
            rows.extend(_rows(nested, f"{prefix}{name}."))
            continue
        if name == "method":
            continue
        rows.append(f"| `{prefix}{name}` | {_type_name(field.annotation)} | {_default(field)} | {field.description or ''} |")
    return rows


def render_reference() -> str:
    header = "| key | type | default | meaning |\n| --- | --- | --- | --- |"
    parts = ["# Recipe reference", "", "Generated from the schema by `ftune reference`.", "", header, *_rows(Recipe, "")]
    for name, cls in zip(method_names(), METHOD_CLASSES):
        parts += ["", f"## method: {name}", "", cls.summary, ""]
        rows = [row for row in _rows(cls, "method.") if not row.startswith("| `method.name`")]
        parts += [header, *rows] if rows else ["No options."]
    return "\n".join(parts) + "\n"
