"""Run ``ftune`` as a real process forked from a server that has already imported the training stack.

A fresh ``python -m ftune train`` on the tiny model spends most of its time importing torch, transformers and peft
(~12 of ~17 s on 2 cores). Tests that must kill, restart or lock against real processes fork them instead from
multiprocessing's forkserver, which imports that stack once per test worker and has run no torch threads, so a
fork of it is as clean as a new interpreter. Each child gets the caller's environment and working directory.
"""

from __future__ import annotations

import functools
import importlib.util
import multiprocessing
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PRELOAD = ["torch", "transformers", "transformers.trainer", "peft", "datasets", "accelerate", "ftune.cli", "ftune.training.run",
           "tests.e2e.forked"]
_spec = importlib.util.spec_from_file_location("fault_check", REPO / "scripts" / "fault_check.py")
fault_check = importlib.util.module_from_spec(_spec)  # the fault points, and how a run's outcome is compared
_spec.loader.exec_module(fault_check)


@functools.cache
def _forkserver():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def _child(argv: list[str], environ: dict, cwd: str, stdout: str, stderr: str, fault: tuple[str, int] | None) -> None:
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    for fd, path in ((1, stdout), (2, stderr)):
        with open(path, "w") as file:
            os.dup2(file.fileno(), fd)
    if fault is not None:
        fault_check.install_fault(*fault)
    from ftune.cli import main

    sys.argv = ["ftune", *argv]
    main()  # exits through SystemExit, whose code becomes the process's exit code


def run_ftune(*argv: str, fault: tuple[str, int] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m ftune *argv`` in a forked process; ``fault`` = (point, step) makes it SIGKILL itself there
    (scripts/fault_check.py's injection points). A killed process has return code -9, as from subprocess."""
    with tempfile.TemporaryDirectory(prefix="ftune-forked-") as scratch:
        stdout, stderr = Path(scratch, "stdout"), Path(scratch, "stderr")
        process = _forkserver().Process(target=_child, args=(list(argv), dict(os.environ), os.getcwd(), str(stdout), str(stderr), fault))
        process.start()
        process.join(timeout)
        if process.exitcode is None:
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(["ftune", *argv], timeout, stdout.read_text(), stderr.read_text())
        return subprocess.CompletedProcess(["ftune", *argv], process.exitcode, stdout.read_text(), stderr.read_text())
