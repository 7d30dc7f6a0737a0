"""scripts/setup.sh stops with a message that says why when it cannot install (CI logs show only the tail)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bare_venv(tmp_path_factory) -> Path:
    """A virtualenv without the workspace installed, so setup.sh goes down its install path."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    return venv


def run_setup(venv: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "VIRTUAL_ENV": str(venv), **env}
    return subprocess.run(["bash", "scripts/setup.sh"], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=120)


def test_setup_refuses_a_disk_too_small_for_the_install(bare_venv):
    result = run_setup(bare_venv, SETUP_NEED_MB=str(10**9))
    assert result.returncode == 1
    assert f"MB free on the disk of {bare_venv}; installing needs about {10**9} MB" in result.stderr
    assert "installing dependencies" not in result.stdout


def test_setup_reports_a_failed_pip_install_instead_of_going_on(bare_venv):
    # No pip in the venv: `python -m pip install -e .` fails at once, as it would on a broken index or a full disk.
    result = run_setup(bare_venv, SETUP_NEED_MB="1")
    assert result.returncode == 1
    assert "No module named pip" in result.stderr
    assert "[setup] error: 'pip install -e .' failed" in result.stderr
    assert "ModuleNotFoundError: No module named 'diffsynth_edit'" not in result.stderr
