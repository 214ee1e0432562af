"""`.ci/venv` runs its command inside `.venv`, in the directory it was called from.

    .ci/venv pytest tests/unit/test_ci_venv.py
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / ".ci" / "venv"


@pytest.fixture()
def current_venv():
    """Skip unless `.venv` is the environment running these tests (so `.ci/venv` will not rebuild it)."""
    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        pytest.skip("the tests are not running in the project's .venv")


def test_runs_the_command_in_the_callers_directory_inside_the_venv(current_venv, tmp_path):
    script = "import os, sys; print(os.getcwd()); print(sys.prefix)"
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    done = subprocess.run([str(SCRIPT), "python", "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    cwd, prefix = done.stdout.split()
    assert Path(cwd).resolve() == tmp_path.resolve()
    assert Path(prefix).resolve() == (ROOT / ".venv").resolve()
    assert "creating or updating" not in done.stderr  # the stamp matched: nothing was rebuilt


def test_passes_the_commands_exit_status_through(current_venv, tmp_path):
    done = subprocess.run([str(SCRIPT), "python", "-c", "raise SystemExit(7)"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 7
