"""ftune's commands send no usage pings unless the user asks: TRL's trainers ping the Hub each time one is built, and
huggingface_hub fixes whether it may when it is first imported, so ``main`` decides before any command runs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = """
import sys
sys.argv = ["ftune", "--version"]
from ftune.cli import main
try:
    main()
except SystemExit:
    pass
import huggingface_hub.constants as constants
print("telemetry off:", constants.HF_HUB_DISABLE_TELEMETRY)
"""


@pytest.mark.parametrize(("setting", "off"), [(None, True), ("0", False), ("1", True)])
def test_usage_pings_are_off_unless_the_user_turns_them_on(setting, off):
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_TELEMETRY"}
    if setting is not None:
        env["HF_HUB_DISABLE_TELEMETRY"] = setting
    output = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True).stdout
    assert f"telemetry off: {off}" in output
