"""Training, eval and merge of a local model make no network call the user did not ask for, even with the Hub's
offline variables unset: every connection attempt and name lookup in the ftune process is recorded and refused by a
guard installed before anything imports (a ``sitecustomize`` on the child's path)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO

GUARD = """
import socket

LOG = {log!r}


def _record(what):
    with open(LOG, "a") as log:
        log.write(what + "\\n")
    raise OSError("network blocked by the test: " + what)


_connect = socket.socket.connect


def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _record(f"connect {{address!r}}")
    return _connect(self, address)


socket.socket.connect = connect
socket.socket.connect_ex = lambda self, address: connect(self, address) or 0
socket.getaddrinfo = lambda host, *args, **kwargs: _record(f"getaddrinfo {{host!r}}")
socket.create_connection = lambda address, *args, **kwargs: _record(f"create_connection {{address!r}}")
"""


def test_train_eval_and_merge_make_no_connection_attempt(make_recipe, tmp_path):
    guard = tmp_path / "guard"
    guard.mkdir()
    log = tmp_path / "connections.log"
    (guard / "sitecustomize.py").write_text(GUARD.format(log=str(log)))
    recipe = make_recipe(training={"max_steps": 2, "batch_size": 4, "save_steps": 1, "logging_steps": 1})
    unset = {"HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"}
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env["PYTHONPATH"] = os.pathsep.join([str(guard), str(REPO), env.get("PYTHONPATH", "")])
    run = tmp_path / "run"
    for command in (["train", str(recipe)], ["eval", str(run), "--base"], ["merge", str(run)]):
        result = subprocess.run([sys.executable, "-m", "ftune", *command], env=env, cwd=tmp_path, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        assert not log.exists(), f"ftune {command[0]} tried the network: {log.read_text()}"
    # the guard is live: a lookup in a child with the same path is recorded
    probe = subprocess.run([sys.executable, "-c", "import socket; socket.getaddrinfo('huggingface.co', 443)"], env=env,
                           capture_output=True, text=True)
    assert probe.returncode != 0 and "huggingface.co" in log.read_text()
