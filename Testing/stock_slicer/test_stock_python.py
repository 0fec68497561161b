"""Torch-free checks in an environment holding only what a stock Slicer ships, on its own Python: 3.9 (Slicer 5.6
and 5.8) or 3.12 (5.10 and 5.12), run by `make test-stock-slicer` in each.

- the environment is the stock one (the SuperBuild's numpy, scipy, SimpleITK; none of the packages Slicer lacks);
- every file the extension ships is compiled by this interpreter, and every library module runs its top level here
  (the only import allowed to fail is torch's, which the PyTorch extension provides);
- the module file imports (with stand-ins for the application-only parts of slicer) and its dependency check asks
  for exactly what is missing, without importing torch;
- Cancel ends the PythonSlicer launcher stand-in and the interpreter it started (and what that started), checked by
  process id; so does the interpreter's exit (closing Slicer).
"""
import importlib
import py_compile
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

from conftest import REPOSITORY, make_launcher, read_pids, wait_until
from slicer_standins import MODULE_FILE, install_application_standins, install_slicer_package_standin
from test_slicer_module_static import LIBRARY_DIRECTORY, shipped_python_files

# What each Slicer release ships (its SuperBuild), by the Python it embeds.
SLICER_PACKAGES = {
    (3, 9): {"numpy": "1.26.4", "scipy": "1.13.1", "SimpleITK": "2.3.1"},   # Slicer 5.8 (5.6: 1.26.1/1.11.3/2.2.1)
    (3, 12): {"numpy": "2.0.2", "scipy": "1.13.1", "SimpleITK": "2.5.2"},   # Slicer 5.10
}
NOT_IN_SLICER = ("matplotlib", "tqdm", "cma", "dask", "psutil", "threadpoolctl", "torch")


def test_this_is_a_stock_slicer_environment():
    expected = SLICER_PACKAGES.get(sys.version_info[:2])
    assert expected, f"Python {sys.version_info[:2]} is not a Python a Slicer release embeds"
    for name, version in expected.items():
        assert metadata.version(name) == version, name
    present = [name for name in NOT_IN_SLICER if importlib.util.find_spec(name) is not None]
    assert present == [], f"a stock Slicer has none of {present}"


def test_every_shipped_file_compiles_and_every_library_module_runs_here(tmp_path):
    files = shipped_python_files() + sorted((REPOSITORY / "scripts").glob("*.py"))
    for path in files:
        py_compile.compile(str(path), cfile=str(tmp_path / (path.name + "c")), doraise=True)
    stopped_at_torch, imported = [], []
    for path in sorted(p for p in LIBRARY_DIRECTORY.rglob("*.py") if "__pycache__" not in p.parts):
        parts = path.relative_to(LIBRARY_DIRECTORY).with_suffix("").parts
        name = ".".join(("TumorPersonalizationLib",) + (parts[:-1] if parts[-1] == "__init__" else parts))
        try:
            importlib.import_module(name)
            imported.append(name)
        except ModuleNotFoundError as error:
            # Only torch may be missing (Slicer's PyTorch extension installs it); anything else is a dependency the
            # module's dependency step does not provide.
            assert error.name == "torch", f"{name} needs {error.name}, which a stock Slicer lacks"
            stopped_at_torch.append(name)
    # The library's torch-free layers and the Slicer-facing helpers run completely on this Python.
    for name in ("geometry", "tissue", "imageio", "atlas", "parameters", "plans", "figures", "progress", "mrml",
                 "processes", "slicer_deps", "errors", "constants"):
        assert f"TumorPersonalizationLib.{name}" in imported, name
    assert "TumorPersonalizationLib.solver" in stopped_at_torch
    assert "torch" not in sys.modules


@pytest.fixture(scope="module")
def module():
    install_slicer_package_standin()
    install_application_standins()
    spec = importlib.util.spec_from_file_location("TumorPersonalization", MODULE_FILE)
    loaded = importlib.util.module_from_spec(spec)
    sys.modules["TumorPersonalization"] = loaded
    spec.loader.exec_module(loaded)
    return loaded


def test_the_module_file_imports_and_its_dependency_check_asks_for_what_is_missing(module):
    logic_class = module.TumorPersonalizationLogic
    assert logic_class.missingPythonPackages() == ["cma>=3.2", "tqdm>=4.60", "threadpoolctl>=3.1"]
    assert logic_class.torchProblem() == "PyTorch (torch >=2.1) is not installed"
    with pytest.raises(RuntimeError, match=r"needs PyTorch \(torch >=2.1, from the PyTorch extension\), cma>=3.2, "
                                           r"tqdm>=4.60, threadpoolctl>=3.1: install them with pip"):
        logic_class().ensureDependencies()
    assert "matplotlib" not in " ".join(logic_class.missingPythonPackages())  # optional: report.png is skipped
    assert "torch" not in sys.modules, "the check imported torch"
    pins = module.slicer_deps.slicer_constraints()
    assert pins == [f"numpy=={metadata.version('numpy')}", f"SimpleITK=={metadata.version('SimpleITK')}"]


# ---- Cancel through the launcher -------------------------------------------------------------------------------------
# The work the launcher's child does: start a worker of its own (as torch's compile workers do), write its id, wait.
WORK = textwrap.dedent("""
    import subprocess, sys, time
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    open(sys.argv[1] + ".part", "w").write(str(worker.pid))
    __import__("os").replace(sys.argv[1] + ".part", sys.argv[1])
    time.sleep(600)
""")


def _start_run(module, tmp_path, start):
    launcher = make_launcher(tmp_path, sys.executable, tmp_path / "pids")
    worker_file = tmp_path / "worker"
    process = start([str(launcher), "-c", WORK, str(worker_file)])
    launcher_pid, child_pid = read_pids(tmp_path / "pids")
    wait_until(worker_file.exists, message="the child did not start its worker")
    work = tmp_path / "work"
    work.mkdir()
    run = module.BackgroundRun(process, work, work / "output")
    return run, [launcher_pid, child_pid, int(worker_file.read_text())]


def test_cancel_ends_the_launcher_the_interpreter_it_started_and_its_workers(module, tmp_path):
    processes = module.processes
    run, pids = _start_run(module, tmp_path, lambda command: processes.start_tree(command))
    assert pids[0] == run.process.pid and all(processes.pid_alive(pid) for pid in pids)
    assert processes.descendant_pids(run.process.pid) == pids[1:]
    run.cancel()
    alive = [pid for pid in pids if processes.pid_alive(pid)]
    assert alive == [], f"processes of the cancelled run still alive: {alive}"
    assert not run.workDirectory.exists()


def test_ending_the_launcher_alone_leaves_the_work_running(module, tmp_path):
    """Why the whole tree is ended: the launcher forwards no signal (what Cancel did before)."""
    processes = module.processes
    run, pids = _start_run(module, tmp_path, lambda command: processes.start_tree(command))
    try:
        run.process.kill()
        run.process.wait(timeout=30)
        assert not processes.pid_alive(pids[0])
        assert processes.pid_alive(pids[1]) and processes.pid_alive(pids[2]), "the launcher's child ran on"
    finally:
        processes.end_tree(run.process)  # the process group outlives its leader
    assert [pid for pid in pids if processes.pid_alive(pid)] == []


def test_runs_left_when_the_interpreter_exits_are_ended(tmp_path):
    """Closing Slicer: processes.end_all runs at interpreter exit and ends every run still going."""
    launcher = make_launcher(tmp_path, sys.executable, tmp_path / "pids")
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPOSITORY)!r})
        from TumorPersonalizationLib import processes
        processes.start_tree([{str(launcher)!r}, "-c", "import time; time.sleep(600)"])
        import time, os
        while not os.path.exists({str(tmp_path / 'pids')!r}):
            time.sleep(0.05)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    from TumorPersonalizationLib.processes import pid_alive

    pids = read_pids(tmp_path / "pids")
    wait_until(lambda: not any(pid_alive(pid) for pid in pids), timeout_s=10,
               message=f"processes {pids} survived the interpreter's exit")
