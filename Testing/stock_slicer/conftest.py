"""The module as a stock 3D Slicer runs it (Makefile target test-stock-slicer; docs/slicer.md says what runs where).

Collected only when TUMORPERSONALIZATION_STOCK_SLICER is set (Testing/conftest.py), because these tests need the
environments the Makefile builds: Python 3.9 and 3.12 with only a Slicer release's packages, and a Python with
Slicer 5.8's packages plus torch as the background interpreter of a panel run.
"""
import os
import stat
import sys
import time
from pathlib import Path

import pytest

STOCK_DIRECTORY = Path(__file__).resolve().parent
REPOSITORY = STOCK_DIRECTORY.parents[1]
for path in (REPOSITORY, REPOSITORY / "Testing"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


def make_launcher(folder: Path, real_python: str, pid_file: Path) -> Path:
    """An executable `PythonSlicer` in `folder`: runs python_slicer_standin.py with `real_python`, which starts
    `real_python` again as its child (the launcher's python-real) and writes both ids to `pid_file`. The shell
    replaces itself by the launcher (exec), so the launcher's id is the id the module sees."""
    launcher = folder / "PythonSlicer"
    launcher.write_text("#!/bin/sh\n"
                        f'export STOCK_LAUNCHER_REAL_PYTHON="{real_python}"\n'
                        f'export STOCK_LAUNCHER_PID_FILE="{pid_file}"\n'
                        f'exec "{real_python}" "{STOCK_DIRECTORY / "python_slicer_standin.py"}" "$@"\n')
    launcher.chmod(launcher.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return launcher


def read_pids(pid_file: Path, timeout_s: float = 60.0):
    """(launcher id, child id) once the launcher has written them."""
    started = time.monotonic()
    while not pid_file.exists():
        assert time.monotonic() - started < timeout_s, "the launcher stand-in did not start its child"
        time.sleep(0.05)
    launcher_pid, child_pid = (int(v) for v in pid_file.read_text().split())
    return launcher_pid, child_pid


def wait_until(condition, timeout_s: float = 60.0, message: str = "timed out") -> None:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, message
        time.sleep(0.05)


@pytest.fixture
def stock_environment_name():
    return f"Python {sys.version_info[0]}.{sys.version_info[1]}"


def stock_python_for_panel_runs() -> str:
    """The background interpreter of the panel runs: STOCK_SLICER_PYTHON (set by the Makefile)."""
    python = os.environ.get("STOCK_SLICER_PYTHON")
    assert python and Path(python).exists(), ("STOCK_SLICER_PYTHON must name the stock environment's interpreter "
                                              "(run `make test-stock-slicer`)")
    return python
