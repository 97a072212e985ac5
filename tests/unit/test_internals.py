"""The library internals ftune relies on (ftune.internals.INTERNALS) still behave as ftune relies on, and the table
names every one of them.

One test per row runs the row's checks against the installed libraries; ``scripts/upgrade-lock.sh`` runs this file
on a candidate lock before the whole suite, so its failures name what an upgrade broke.

The coverage scan reads ftune/ (ftune/internals/ aside, whose checks touch the internals on purpose) with ``ast``
and finds each place that leans on a library's insides, by these rules:

* in a class with a library base, each method the class does not call itself (the library calls it: an override):
  a private one always; a public one too, unless the base is an extension point whose public hooks are the
  library's API (``PUBLIC_BASES``: TrainerCallback, nn.Module);
* ``x._name`` where ``_name`` is not ftune's own, and ``self._name`` inside a class with a library base where the
  class does not define ``_name`` itself (a library base's private method or attribute);
* ``getattr`` / ``hasattr`` / ``setattr`` / ``delattr`` with such a name as a string;
* imports of a ``_name``, or from a ``_module``, of a library;
* ``x.forward = ...`` and ``x.__class__ = ...`` on anything but ``self`` (a patched instance).

A base is a library's when it is imported from one of ``LIBRARIES`` or is not imported at all (ftune builds subclasses
over a Trainer class it is handed). ftune's own private names are those it binds itself outside class bodies
(``def``, ``class``, an assignment to a plain name or to ``self._x``, a parameter) and any attribute spelled
``_ftune...``; a method a class defines is not ftune's own name, since it may override the library's.
Each site is reported as (the ftune module's top-level name it sits in, the library name); a row covers it when the
row's ``where`` lists that top-level name and its ``internal`` spells the library name.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from ftune.internals import INTERNALS, Internal, render_markdown
from tests.conftest import REPO

PACKAGE = REPO / "ftune"
DOC = REPO / "docs" / "internals.md"
LIBRARIES = ("transformers", "peft", "accelerate", "trl", "torch", "datasets", "bitsandbytes")
PUBLIC_BASES = {"TrainerCallback", "Module"}
INSTANCE_PATCHES = {"forward", "__class__"}
ATTRIBUTE_CALLS = {"getattr", "hasattr", "setattr", "delattr"}


@dataclass(frozen=True)
class Site:
    where: str  # ftune's dotted top-level name the site sits in
    name: str  # the library's name it relies on
    location: str  # file:line, for the failure message


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def own_private_names(package: Path) -> set[str]:
    """The private names ftune binds itself, anywhere in ``package``."""
    names = set()
    for path in package.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        methods = {id(item) for node in ast.walk(tree) if isinstance(node, ast.ClassDef) for item in node.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and id(node) not in methods:
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.alias) and node.asname:
                names.add(node.asname)
            elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and isinstance(node.value, ast.Name)
                  and node.value.id == "self"):
                names.add(node.attr)
    return {name for name in names if is_private(name)}


def class_names(package: Path) -> set[str]:
    return {node.name for path in package.rglob("*.py") for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.ClassDef)}


def imported_from(tree: ast.Module) -> dict[str, str]:
    """Each name a module imports (at any depth), with the top-level package it comes from."""
    origins = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                origins[alias.asname or alias.name] = "ftune" if node.level else (node.module or "").split(".")[0]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                origins[alias.asname or alias.name.split(".")[0]] = alias.name.split(".")[0]
    return origins


class SiteFinder(ast.NodeVisitor):
    def __init__(self, module: str, path: str, own: set[str], ftune_classes: set[str], origins: dict[str, str]):
        self.module, self.path, self.own, self.ftune_classes, self.origins = module, path, own, ftune_classes, origins
        self.sites: list[Site] = []
        self.top = ""
        self.classes: list[tuple[bool, set[str]]] = []  # (has a library base, names the class defines) per enclosing class

    def add(self, node: ast.AST, name: str) -> None:
        self.sites.append(Site(f"{self.module}.{self.top}", name, f"{self.path}:{node.lineno}"))

    def library_base(self, base: ast.expr) -> tuple[bool, str]:
        root = base
        while isinstance(root, ast.Attribute):
            root = root.value
        if not isinstance(root, ast.Name):
            return False, ""
        name = base.attr if isinstance(base, ast.Attribute) else base.id
        if root.id in self.origins:
            return self.origins[root.id] in LIBRARIES, name
        return root.id not in self.ftune_classes and root.id not in vars(builtins), name

    def visit_Module(self, node: ast.Module) -> None:
        for statement in node.body:
            targets = getattr(statement, "targets", None) or [getattr(statement, "target", None)]
            self.top = getattr(statement, "name", None) or next((t.id for t in targets if isinstance(t, ast.Name)), "")
            self.visit(statement)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        bases = [self.library_base(base) for base in node.bases]
        library = any(is_library for is_library, _ in bases)
        internal_hooks = any(is_library and name not in PUBLIC_BASES for is_library, name in bases)
        on_self = [n for n in ast.walk(node) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "self"]
        called = {n.attr for n in on_self if isinstance(n.ctx, ast.Load)}
        defined = {item.name for item in node.body if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))}
        defined |= {n.attr for n in on_self if isinstance(n.ctx, ast.Store)}
        for item in node.body:
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and not item.name.startswith("__") \
                    and item.name not in called and (library and is_private(item.name) or internal_hooks):
                self.add(item, item.name)
        self.classes.append((library, defined))
        self.generic_visit(node)
        self.classes.pop()

    def visit_Attribute(self, node: ast.Attribute) -> None:
        name = node.attr
        if is_private(name) and name not in self.own and not name.startswith("_ftune"):
            on_self = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
            if not on_self or self.classes and self.classes[-1][0] and name not in self.classes[-1][1]:
                self.add(node, name)
        self.generic_visit(node)

    def visit_Assign(self, node: ast.Assign) -> None:
        for target in node.targets:
            for element in target.elts if isinstance(target, ast.Tuple) else [target]:
                if (isinstance(element, ast.Attribute) and element.attr in INSTANCE_PATCHES
                        and not (isinstance(element.value, ast.Name) and element.value.id == "self")):
                    self.add(element, element.attr)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        if isinstance(node.func, ast.Name) and node.func.id in ATTRIBUTE_CALLS and len(node.args) >= 2:
            name = node.args[1]
            if isinstance(name, ast.Constant) and isinstance(name.value, str) and is_private(name.value) \
                    and name.value not in self.own and not name.value.startswith("_ftune"):
                self.add(node, name.value)
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        parts = (node.module or "").split(".")
        if not node.level and parts[0] in LIBRARIES:
            for name in [*parts, *(alias.name for alias in node.names)]:
                if is_private(name):
                    self.add(node, name)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            parts = alias.name.split(".")
            for name in parts if parts[0] in LIBRARIES else ():
                if is_private(name):
                    self.add(node, name)


def library_sites(package: Path) -> list[Site]:
    """Every place in ``package`` that leans on a library's insides, by the rules in this file's docstring."""
    own, ftune_classes = own_private_names(package), class_names(package)
    sites = []
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package.parent)
        if relative.parts[:2] == ("ftune", "internals"):
            continue
        module = ".".join(relative.with_suffix("").parts).removesuffix(".__init__")
        tree = ast.parse(path.read_text(encoding="utf-8"))
        finder = SiteFinder(module, relative.as_posix(), own, ftune_classes, imported_from(tree))
        finder.visit(tree)
        sites += finder.sites
    return sites


def spells(internal: str, name: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", internal) is not None


def unlisted(sites: list[Site], rows=INTERNALS) -> list[Site]:
    return [site for site in sites if not any(site.where in row.where and spells(row.internal, site.name) for row in rows)]


@pytest.mark.parametrize("row", INTERNALS, ids=[row.name for row in INTERNALS])
def test_internal_still_applies(row: Internal):
    problem = row.problem()
    if problem is not None:
        pytest.fail(problem, pytrace=False)


def test_a_changed_internal_fails_its_row_by_name(monkeypatch):
    from transformers import Trainer

    row = next(row for row in INTERNALS if row.name == "track-num-input-tokens")
    monkeypatch.setattr(Trainer, "_track_num_input_tokens", lambda self, inputs, model=None: None)
    problem = row.problem()
    assert problem is not None and problem.startswith(
        f"internal track-num-input-tokens no longer applies (written against transformers {row.version}, installed ")
    assert "takes (self, inputs, model); ftune's override has (self, inputs)" in problem
    assert problem.endswith("; see its row in ftune/internals/__init__.py")
    monkeypatch.delattr(Trainer, "_track_num_input_tokens")
    assert "has no _track_num_input_tokens any more" in row.problem()


def test_rows_are_named_once_and_point_at_places_that_exist():
    lock = "".join((REPO / "requirements" / name).read_text() for name in ("lock.txt", "torch.txt"))
    assert len({row.name for row in INTERNALS}) == len(INTERNALS)
    for row in INTERNALS:
        assert re.search(rf"^{re.escape(row.library)}==", lock, re.MULTILINE), f"{row.name}: {row.library} is not in the lock"
        for dotted in row.where:
            module, _, name = dotted.rpartition(".")
            assert hasattr(importlib.import_module(module), name), f"{row.name}: {dotted} does not exist (moved? update its row)"


def test_every_library_internal_in_ftune_has_a_row():
    missing = unlisted(library_sites(PACKAGE))
    assert not missing, ("ftune/ relies on library internals that ftune.internals does not list; add a row to INTERNALS "
                         "(and regenerate docs/internals.md): " + "; ".join(f"{s.location}: {s.name} in {s.where}" for s in missing))


def test_the_scan_finds_overrides_private_reads_and_patched_instances(tmp_path):
    package = tmp_path / "ftune"
    package.mkdir()
    (package / "tuning.py").write_text(textwrap.dedent("""
        from transformers import Trainer, TrainerCallback


        def _helper(value):
            return value


        class Steps(Trainer):
            def _inner_training_loop(self, *args, **kwargs):
                return self._own(_helper(self._globalstep_last_logged))

            def _own(self, value):
                return value


        class Progress(TrainerCallback):
            def on_log(self, args, state, control, **kwargs):
                return self._format(state)

            def _format(self, state):
                return str(state)


        def attention(model, layer):
            layer.forward = print
            return model.config._attn_implementation, getattr(model, "_no_split_modules", None), layer._ftune_mark
    """))
    sites = library_sites(package)
    assert {(site.where, site.name) for site in sites} == {
        ("ftune.tuning.Steps", "_inner_training_loop"), ("ftune.tuning.Steps", "_globalstep_last_logged"),
        ("ftune.tuning.attention", "forward"), ("ftune.tuning.attention", "_attn_implementation"),
        ("ftune.tuning.attention", "_no_split_modules"),
    }
    row = Internal("inner-loop", "transformers", "transformers.Trainer._inner_training_loop", "override", ("ftune.tuning.Steps",),
                   "0", "", ())
    assert ("ftune.tuning.Steps", "_inner_training_loop") in {(s.where, s.name) for s in unlisted(sites, rows=INTERNALS)}
    assert ("ftune.tuning.Steps", "_inner_training_loop") not in {(s.where, s.name) for s in unlisted(sites, rows=(row,))}


def test_committed_doc_is_the_table():
    text = render_markdown()
    assert "| track-num-input-tokens | transformers | `transformers.Trainer._track_num_input_tokens` | override |" in text
    assert DOC.read_text() == text, "regenerate with: .venv/bin/python -m ftune.internals > docs/internals.md"


def test_importing_the_table_imports_no_library():
    code = "import sys, ftune.internals; print(sorted(m for m in ('torch', 'transformers', 'peft', 'trl') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert result.stdout.strip() == "[]"
