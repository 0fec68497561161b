"""The package's run-time dependencies, from the one list the Slicer module reads too
(TumorPersonalizationLib/slicer_deps.py, RUNTIME_REQUIREMENTS; it imports nothing outside the standard library, so
the build runs it without the package's dependencies). Everything else is in pyproject.toml."""
import runpy
from pathlib import Path

from setuptools import setup

DEPS = Path(__file__).resolve().parent / "TumorPersonalizationLib" / "slicer_deps.py"
setup(install_requires=list(runpy.run_path(str(DEPS))["RUNTIME_REQUIREMENTS"]))
