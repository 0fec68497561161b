"""What the library needs from a stock 3D Slicer's Python, found without importing anything heavy.

A stock Slicer ships numpy, scipy and SimpleITK (5.6/5.8: Python 3.9; 5.10 and later: Python 3.12), not matplotlib,
tqdm, cma, threadpoolctl or psutil; torch comes from Slicer's PyTorch extension. The module's dependency step asks
for exactly PIP_REQUIREMENTS (through pip, with Slicer's own numpy and SimpleITK pinned) and for torch through the
PyTorch extension. matplotlib is optional: without it the run completes and its outputs record that report.png was
skipped (pipeline.write_outputs).

Everything here reads installed distributions' metadata (importlib.metadata, importlib.util.find_spec); nothing
imports torch, so a check in Slicer's own process stays cheap and leaves the process as it was.

The module's dependency step, as a command (CI runs it in an environment with only Slicer's packages):
    python -m TumorPersonalizationLib.slicer_deps missing        # pip requirements to install, one a line
    python -m TumorPersonalizationLib.slicer_deps constraints    # pins that keep Slicer's numpy and SimpleITK
    python -m TumorPersonalizationLib.slicer_deps torch          # exit 1 with the problem when torch does not fit
"""
import importlib.util
import re
import sys
from importlib import metadata
from typing import List, Optional, Sequence, Tuple

# The library's run-time requirements, the one list: the package's dependencies (setup.py reads it for
# pyproject.toml's build) and, below, what the Slicer module asks for. Each distribution's name is the name its
# module is imported by.
RUNTIME_REQUIREMENTS = (
    # A range, so that Slicer's PyTorch extension can supply torch inside Slicer (>= 2.1: builds for Python 3.9
    # exist). Development, the Makefile and CI install the exact CPU build through constraints.txt; an
    # unconstrained install can pull a multi-GB CUDA build.
    "torch>=2.1",
    "numpy>=1.21",
    "SimpleITK>=2.2",
    "matplotlib>=3.5",
    "scipy>=1.7",
    "cma>=3.2",
    "tqdm>=4.60",
    # Keeps numpy's BLAS threads off the cores torch is using during a search (pipeline.blas_single_threaded).
    "threadpoolctl>=3.1",
)
_BY_NAME = {re.match(r"[A-Za-z0-9_.-]+", requirement).group(0): requirement for requirement in RUNTIME_REQUIREMENTS}
# torch comes from Slicer's PyTorch extension, as a version range it can satisfy.
TORCH_REQUIREMENT = _BY_NAME["torch"][len("torch"):]
TORCH_MINIMUM = tuple(int(part) for part in TORCH_REQUIREMENT.lstrip(">=").split("."))
# Used when present, never installed by the module: without matplotlib the report picture is skipped.
OPTIONAL_PACKAGES = {"matplotlib": "report.png (slices, iso-lines, plans, loss curve)"}
# Slicer's own packages: never replaced by an install (pinned to the installed versions).
SLICER_OWNED_PACKAGES = ("numpy", "SimpleITK")
# pip requirements of the library's run-time path, by the module name that is imported: the rest. Slicer ships
# scipy; the entry stays so that an install lacking it is completed.
PIP_REQUIREMENTS = {name: requirement for name, requirement in _BY_NAME.items()
                    if name != "torch" and name not in OPTIONAL_PACKAGES and name not in SLICER_OWNED_PACKAGES}


def module_available(name: str) -> bool:
    """Whether top-level module `name` can be imported, found without importing it (a module that a test or a
    blocker set to None in sys.modules counts as absent)."""
    if name in sys.modules:
        return sys.modules[name] is not None
    try:
        return importlib.util.find_spec(name) is not None
    except (ValueError, ImportError):
        return False


def missing_pip_requirements(requirements: Optional[dict] = None) -> List[str]:
    """The pip requirement strings (e.g. "cma>=3.2") of PIP_REQUIREMENTS (or `requirements`, {module: requirement})
    whose module cannot be imported here."""
    requirements = PIP_REQUIREMENTS if requirements is None else requirements
    return [requirement for module, requirement in requirements.items() if not module_available(module)]


def installed_version(distribution: str) -> Optional[str]:
    """The installed version string of a distribution (e.g. "2.13.0+cpu"), None when it is not installed."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def version_tuple(version: str) -> Tuple[int, ...]:
    """The leading numeric release of a version string: "2.13.0+cpu" -> (2, 13, 0), "2.1.0a0" -> (2, 1, 0).
    Raises ValueError when the string does not start with a number."""
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    if not match:
        raise ValueError(f"not a version: {version!r}")
    return tuple(int(part) for part in match.group(1).split("."))


def torch_problem(version: Optional[str] = None) -> Optional[str]:
    """None when torch is installed in a version the library supports, else a sentence saying what is wrong and
    what to do. version: the installed torch version to judge (default: read from the installed metadata; torch is
    not imported)."""
    version = installed_version("torch") if version is None else version
    if version is None:
        return f"PyTorch (torch {TORCH_REQUIREMENT}) is not installed"
    try:
        too_old = version_tuple(version) < TORCH_MINIMUM
    except ValueError:
        return None  # a local build with an unusual version string: let it run
    if too_old:
        minimum = ".".join(str(v) for v in TORCH_MINIMUM)
        return (f"PyTorch {version} is installed, Tumor Personalization needs {minimum} or later: open the "
                f"'PyTorch Util' module, uninstall PyTorch and install it again with the version requirement "
                f"'{TORCH_REQUIREMENT}', then restart Slicer")
    return None


def slicer_constraints(packages: Sequence[str] = SLICER_OWNED_PACKAGES) -> List[str]:
    """pip constraint lines ("numpy==1.26.4") that keep the installed versions of Slicer's own packages."""
    pins = []
    for package in packages:
        version = installed_version(package)
        if version is not None:
            pins.append(f"{package}=={version}")
    return pins


def missing_optional() -> List[str]:
    """Optional packages that are absent, each with what is skipped without it ("matplotlib: report.png ...")."""
    return [f"{name}: {use}" for name, use in OPTIONAL_PACKAGES.items() if not module_available(name)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`missing` | `constraints` | `torch` (see the module docstring); exit 2 on an unknown command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else "missing"
    if command == "missing":
        print("\n".join(missing_pip_requirements()))
        return 0
    if command == "constraints":
        print("\n".join(slicer_constraints()))
        return 0
    if command == "torch":
        problem = torch_problem()
        if problem:
            print(problem, file=sys.stderr)
            return 1
        return 0
    print(f"slicer_deps: error: unknown command {command!r} (missing, constraints, torch)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
