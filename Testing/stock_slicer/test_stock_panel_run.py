"""The panel's background run as a stock Slicer makes it: run by `make test-stock-slicer` in the test environment
(slicer-core's MRML for the scene, as Slicer's own process), with the background command going through a PythonSlicer
stand-in to STOCK_SLICER_PYTHON: Slicer 5.8's numpy, scipy and SimpleITK, torch, and only what the module's
dependency step installed (no matplotlib).

- a full panel run (the default method, the panel's exact command) completes and its outputs load into the scene;
  report.png is skipped and parameters.json says so;
- Cancel of a real run leaves no process of it alive, checked by process id (launcher and python-real);
- the module's self-test, with its background part on the stock interpreter, passes.
"""
import json
import subprocess

import numpy as np
import pytest

from conftest import make_launcher, read_pids, stock_python_for_panel_runs, wait_until
from conftest_slicer import load_module_file, mrml_scene  # noqa: F401  (fixture)
from TumorPersonalizationLib import GrowthParameters, load_atlas, mrml, simulate
from TumorPersonalizationLib.geometry import Volume
from TumorPersonalizationLib.processes import pid_alive
from TumorPersonalizationLib.figures import REPORT_SKIPPED

TRUE_SEED_RAS_MM = (28.0, -12.0, 24.0)


@pytest.fixture
def module():
    return load_module_file()


@pytest.fixture
def launcher(tmp_path, module, monkeypatch):
    """Route the Logic's background interpreter through the PythonSlicer stand-in to the stock interpreter."""
    python = stock_python_for_panel_runs()
    completed = subprocess.run([python, "-c", "import matplotlib"], capture_output=True)
    assert completed.returncode != 0, "the stock environment must not hold matplotlib"
    pid_file = tmp_path / "pids"
    path = make_launcher(tmp_path, python, pid_file)
    monkeypatch.setattr(module.TumorPersonalizationLogic, "pythonExecutable", staticmethod(lambda: str(path)))
    return pid_file


def _atlas_inputs(scene):
    atlas = load_atlas(2)
    nodes = tuple(mrml.volume_to_node(scene, Volume(getattr(atlas, n), atlas.geometry), n)
                  for n in ("wm", "gm", "csf"))
    tumor = mrml.volume_to_node(scene, simulate(atlas, GrowthParameters(TRUE_SEED_RAS_MM, 5.0, 2.0)), "tumor")
    return atlas, nodes, tumor


def test_a_full_panel_run_completes_and_its_outputs_load_into_the_scene(mrml_scene, module, launcher):  # noqa: F811
    atlas, nodes, tumor = _atlas_inputs(mrml_scene)
    logic = module.TumorPersonalizationLogic()
    run = logic.startBackgroundRun(nodes, tumor, method=module.METHODS[0], device="cpu")  # the panel's default
    command = run.process.args
    assert command[0] == str(launcher.parent / "PythonSlicer") and command[command.index("--progress") + 1] == "json"
    returncode = run.wait(timeout=600)
    assert returncode == 0, run.errorMessage()
    assert launcher.exists(), "the run went through the launcher stand-in"
    names = {p.name for p in run.outputDirectory.iterdir()}
    assert "report.png" not in names
    assert {"parameters.json", "infiltration.nii.gz", "plan_standard.nii.gz", "plan_model.nii.gz"} <= names
    written = json.loads((run.outputDirectory / "parameters.json").read_text())
    assert written["report_png"] == REPORT_SKIPPED and REPORT_SKIPPED in written["warnings"]
    summary, outputs = logic.loadOutputs(run.outputDirectory, tumor)
    run.cleanup()
    for key in ("infiltration", "plans", "seed", "table"):
        assert mrml_scene.GetNodeByID(outputs[key].GetID()) is outputs[key], key
    assert mrml.volume_from_node(outputs["infiltration"]).geometry.same_grid(atlas.geometry)
    assert np.linalg.norm(np.subtract(summary["seed_ras_mm"], TRUE_SEED_RAS_MM)) < 15.0
    assert REPORT_SKIPPED in logic.resultLabels(summary)["warnings"]


def test_cancel_of_a_real_run_leaves_no_process_alive(mrml_scene, module, launcher):  # noqa: F811
    _, nodes, tumor = _atlas_inputs(mrml_scene)
    logic = module.TumorPersonalizationLogic()
    run = logic.startBackgroundRun(nodes, tumor, device="cpu")
    pids = read_pids(launcher)
    wait_until(lambda: run.poll() or run.fraction > 0, timeout_s=300, message="the run reported no progress")
    assert run.returncode is None, run.errorMessage()
    assert all(pid_alive(pid) for pid in pids)
    run.cancel()
    alive = [pid for pid in pids if pid_alive(pid)]
    assert alive == [], f"launcher {pids[0]} / python-real {pids[1]}: {alive} still alive after Cancel"
    assert not run.workDirectory.exists()
    assert logic.outputNodes(tumor) == {}


def test_the_module_self_test_with_a_stock_background_interpreter(module, launcher):
    mrml.create_headless_scene()
    case = module.TumorPersonalizationTest("runTest")
    result = case.defaultTestResult()
    case.run(result)
    assert result.wasSuccessful() and not result.skipped, result.errors + result.failures + result.skipped
    assert launcher.exists(), "the self-test's background run went through the launcher stand-in"
