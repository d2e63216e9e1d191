"""Importing the project's packages prints nothing and loads no torchao (whose .so warnings a user would see):
torchao is imported only when FP8 is switched on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = [
    "models",
    "models.parallel",
    "callbacks",
    "datamodules",
    "lightning_modules",
    "lightning_modules.cli",
    "sweeps",
]


def test_imports_are_quiet_and_leave_torchao_out():
    env = {k: v for k, v in os.environ.items() if k != "TORCHAO_FORCE_SKIP_LOADING_SO_FILES"}
    code = f"import sys\nfor m in {PACKAGES!r}: __import__(m)\nprint('torchao' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert run.stdout == "False\n" and run.stderr == ""
