"""The Extensions Index's rules on TumorPersonalization.json and the CMake metadata (scripts/prepare_index_entry.py),
and the release step that writes the public address into both. Runs on Python 3.9 too (make test-stock-slicer)."""
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
SCRIPT = REPOSITORY / "scripts" / "prepare_index_entry.py"


def _script():
    if "prepare_index_entry" not in sys.modules:
        spec = importlib.util.spec_from_file_location("prepare_index_entry", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["prepare_index_entry"] = module
        spec.loader.exec_module(module)
    return sys.modules["prepare_index_entry"]


@pytest.fixture
def copy(tmp_path):
    """The files the checks read, in a folder of their own."""
    entry = _script()
    named = ("CMakeLists.txt", "TumorPersonalization.json", "LICENSE", entry.ICON_PATH) + entry.SCREENSHOT_PATHS
    for relative in named:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPOSITORY / relative, tmp_path / relative)
    return tmp_path


def test_the_committed_entry_follows_the_index_rules():
    assert _script().check_entry(REPOSITORY) == []


def test_the_release_step_writes_an_address_into_cmake_and_json_and_checks_them(copy):
    entry = _script()
    assert entry.main(["https://github.com/someone/SlicerTumorPersonalization.git", "--revision", "v1.0",
                       "--root", str(copy)]) == 0
    description = json.loads((copy / "TumorPersonalization.json").read_text())
    assert description["scm_url"] == "https://github.com/someone/SlicerTumorPersonalization"
    assert description["scm_revision"] == "v1.0"
    cmake = (copy / "CMakeLists.txt").read_text()
    assert entry.cmake_string(cmake, "EXTENSION_HOMEPAGE") == "https://github.com/someone/SlicerTumorPersonalization"
    assert entry.cmake_string(cmake, "EXTENSION_ICONURL") == (
        "https://raw.githubusercontent.com/someone/SlicerTumorPersonalization/v1.0/"
        "TumorPersonalization/Resources/Icons/TumorPersonalization.png")
    assert entry.cmake_string(cmake, "EXTENSION_SCREENSHOTURLS").endswith(
        "/v1.0/Resources/Images/TumorPersonalization_panel.png")
    assert entry.check_entry(copy) == []
    # An address the index would refuse is refused before anything is written.
    assert entry.main(["https://github.com/someone/TumorPersonalization", "--root", str(copy)]) == 2
    assert entry.main(["TumorPersonalization", "--root", str(copy)]) == 2
    assert json.loads((copy / "TumorPersonalization.json").read_text()) == description


@pytest.mark.parametrize("breakage, problem", [
    (("json", '"category": "Simulation"', '"category": "Tumor Modelling"'), "category 'Tumor Modelling' is not"),
    (("json", '"scm_url": "https://github.com/TumorPersonalization/SlicerTumorPersonalization"',
      '"scm_url": "TumorPersonalization"'), "scm_url"),
    (("json", '[\n    "PyTorch"\n  ]', '["PyTorch"]'), "build_dependencies must be written one item a line"),
    (("json", "\n", "\r\n"), "line endings"),
    (("cmake", 'set(EXTENSION_HOMEPAGE "https://', 'set(EXTENSION_HOMEPAGE "'), "EXTENSION_HOMEPAGE"),
    (("cmake", "TumorPersonalization_panel.png", "demo_tumor.png"), "EXTENSION_SCREENSHOTURLS does not follow"),
    (("cmake", 'set(EXTENSION_CATEGORY "Simulation")', 'set(EXTENSION_CATEGORY "Tumor Modelling")'),
     "EXTENSION_CATEGORY must equal"),
    (("file", "Resources/Images/TumorPersonalization_panel.png", None), "does not exist"),
])
def test_each_broken_rule_is_found(copy, breakage, problem):
    kind, old, new = breakage
    if kind == "file":
        (copy / old).unlink()
    else:
        path = copy / ("TumorPersonalization.json" if kind == "json" else "CMakeLists.txt")
        text = path.read_bytes().decode()
        assert old in text
        path.write_bytes(text.replace(old, new).encode())
    problems = _script().check_entry(copy)
    assert any(problem in p for p in problems), problems
