"""The package as pip builds it: every subpackage listed, and the run-time dependencies taken from the one list the
Slicer module reads too (slicer_deps.RUNTIME_REQUIREMENTS)."""
import runpy
from pathlib import Path

import setuptools
import tomllib

from TumorPersonalizationLib import slicer_deps

REPOSITORY = Path(__file__).resolve().parents[1]


def pyproject():
    return tomllib.loads((REPOSITORY / "pyproject.toml").read_text())


def test_every_package_folder_of_the_library_is_packaged():
    listed = set(pyproject()["tool"]["setuptools"]["packages"])
    library = REPOSITORY / "TumorPersonalizationLib"
    folders = {".".join(p.parent.relative_to(REPOSITORY).parts) for p in library.rglob("__init__.py")}
    wanted = {"TumorPersonalizationLib", "TumorPersonalizationLib.inversion", "TumorPersonalizationLib.offline"}
    assert wanted <= folders
    assert listed == folders


def test_the_dependencies_are_the_runtime_requirements(monkeypatch):
    project = pyproject()["project"]
    assert "dependencies" not in project and project["dynamic"] == ["dependencies"]
    given = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: given.update(kwargs))
    runpy.run_path(str(REPOSITORY / "setup.py"))
    assert given == {"install_requires": list(slicer_deps.RUNTIME_REQUIREMENTS)}
    assert "torch>=2.1" in given["install_requires"]


def test_the_module_installs_the_runtime_requirements_that_slicer_lacks():
    """torch comes from the PyTorch extension, numpy and SimpleITK are Slicer's own, matplotlib is optional: the rest
    is what the module's dependency step installs through pip, each by the name it is imported by."""
    assert slicer_deps.TORCH_REQUIREMENT == ">=2.1" and slicer_deps.TORCH_MINIMUM == (2, 1)
    assert slicer_deps.PIP_REQUIREMENTS == {"scipy": "scipy>=1.7", "cma": "cma>=3.2", "tqdm": "tqdm>=4.60",
                                            "threadpoolctl": "threadpoolctl>=3.1"}
    others = {r for r in slicer_deps.RUNTIME_REQUIREMENTS if r not in slicer_deps.PIP_REQUIREMENTS.values()}
    assert others == {"torch>=2.1", "numpy>=1.21", "SimpleITK>=2.2", "matplotlib>=3.5"}
