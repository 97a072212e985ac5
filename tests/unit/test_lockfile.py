"""The dependency lock: pyproject.toml and requirements/ must agree, and a drifted pyproject must be caught."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("lockfile", REPO / "scripts" / "lockfile.py")
lockfile = importlib.util.module_from_spec(spec)
sys.modules["lockfile"] = lockfile  # dataclasses resolve annotations through the module registry
spec.loader.exec_module(lockfile)


@pytest.fixture
def project(tmp_path) -> Path:
    """A copy of pyproject.toml and requirements/ to edit."""
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(REPO / "requirements", tmp_path / "requirements")
    return tmp_path


def check(root: Path) -> list[str]:
    return lockfile.sync_problems(root / "pyproject.toml", root / "requirements" / "lock.txt", root / "requirements" / "torch.txt")


def test_the_committed_lock_agrees_with_pyproject():
    assert lockfile.sync_problems() == []


def test_a_dependency_the_lock_lacks_is_named(project):
    pyproject = project / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"jinja2>=3.1",', '"jinja2>=3.1",\n    "sentencepiece>=0.2",'))
    problems = check(project)
    assert len(problems) == 1 and "'sentencepiece>=0.2' from pyproject.toml is not locked" in problems[0]
    assert "scripts/upgrade-lock.sh" in problems[0]


def test_a_pin_outside_the_range_is_named(project):
    pyproject = project / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"peft>=0.17"', '"peft>=99"'))
    assert any("peft==" in p and "outside pyproject.toml's 'peft>=99'" in p for p in check(project))


def test_a_torch_pin_outside_the_range_is_named(project):
    (project / "requirements" / "torch.txt").write_text("torch==2.1.0\n")
    assert any("torch==2.1.0 is outside" in p for p in check(project))


def test_test_extras_are_locked_too(project):
    pyproject = project / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"pytest-xdist>=3.5"', '"pytest-xdist>=3.5", "pytest-timeout>=2"'))
    assert any("pytest-timeout" in p for p in check(project))


def test_lock_lines_parse_with_markers_and_versions():
    pins = lockfile.read_pins(REPO / "requirements" / "lock.txt")
    names = {p.name for p in pins}
    assert {"transformers", "peft", "datasets", "accelerate", "bitsandbytes", "pytest"} <= names
    assert "torch" not in names and not any(lockfile.TORCH_RUNTIME.match(n) for n in names)
    assert all(p.version[0].isdigit() for p in pins)
    assert any(p.marker for p in pins)  # other Pythons get their own pins


def test_installed_check_names_a_wrong_version(monkeypatch):
    from importlib import metadata

    real = list(metadata.distributions())

    class Fake:
        files = None

        def __init__(self, name, version):
            self.metadata, self.version = {"Name": name}, version

    fakes = [Fake(d.metadata["Name"], "0.0.1" if d.metadata["Name"].lower() == "peft" else d.version) for d in real]
    monkeypatch.setattr(lockfile.metadata, "distributions", lambda: fakes + [Fake("left-over", "1.0")])
    problems = lockfile.installed_problems()
    assert any(p.startswith("peft is 0.0.1, the lock says") for p in problems)
    assert "left-over==1.0 is installed but not in the lock" in problems


def test_installed_check_names_packages_without_compiled_bytecode(tmp_path):
    import py_compile
    from importlib import metadata
    from importlib.metadata import PackagePath

    class Installed:
        def __init__(self, name, module):
            (tmp_path / module).write_text("VALUE = 1\n")
            self.metadata, self.files = {"Name": name}, [PackagePath("../../bin/tool.py"), PackagePath(module)]

        def locate_file(self, path):
            return tmp_path / path

    compiled, bare = Installed("compiled", "compiled.py"), Installed("bare", "bare.py")
    py_compile.compile(str(tmp_path / "compiled.py"))
    assert lockfile.uncompiled([compiled, bare]) == ["bare"]
    installed = [metadata.distribution(name) for name in ("transformers", "peft")]
    assert lockfile.uncompiled(installed) == []  # as scripts/setup-env.sh installs them
