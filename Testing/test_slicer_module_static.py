"""Static checks of the Slicer extension: the .ui against the module's code, the CMake lists against the files,
Python 3.9 compatibility of everything the extension ships, and the module file imported under slicer-core.

What the Slicer application would only find when a user opens the panel (a widget the code names but the .ui
lacks, a parameter bound to nothing, a file CMake installs that is not there, a library file left out of the
package, syntax Slicer 5.6's Python 3.9 rejects) fails here instead.
"""
import ast
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import pytest

from TumorPersonalizationLib.constants import DEFAULT_METHOD

REPOSITORY = Path(__file__).resolve().parents[1]
MODULE_DIRECTORY = REPOSITORY / "TumorPersonalization"
MODULE_FILE = MODULE_DIRECTORY / "TumorPersonalization.py"
UI_FILE = MODULE_DIRECTORY / "Resources" / "UI" / "TumorPersonalization.ui"
LIBRARY_DIRECTORY = REPOSITORY / "TumorPersonalizationLib"
BATCH_SCRIPT = REPOSITORY / "scripts" / "slicer_batch.py"


# ---- helpers ----------------------------------------------------------------------------------------------------
def _cmake_text(path: Path) -> str:
    """CMake source without comments."""
    return "\n".join(line.split("#", 1)[0] for line in path.read_text().splitlines())


def cmake_list(path: Path, variable: str):
    """The items of `set(VARIABLE item item ...)` in a CMake file, ${MODULE_NAME} expanded."""
    text = _cmake_text(path)
    match = re.search(rf"\bset\(\s*{variable}\s+([^)]*)\)", text)
    assert match, f"{path.name} has no set({variable} ...)"
    module_name = re.search(r"\bset\(\s*MODULE_NAME\s+(\S+)\s*\)", text).group(1)
    return [item.replace("${MODULE_NAME}", module_name) for item in match.group(1).split()]


def ui_widgets():
    """{widget name: (class, {property name: text})} of the .ui file."""
    widgets = {}
    for element in ET.parse(UI_FILE).getroot().iter("widget"):
        properties = {}
        for prop in element.findall("property"):
            value = prop.find("string")
            if value is None:
                value = prop.find("stringlist")
                text = [s.text for s in value.findall("string")] if value is not None else None
            else:
                text = value.text
            properties[prop.get("name")] = text
        name = element.get("name")
        assert name not in widgets, f"widget name {name} used twice in the .ui"
        widgets[name] = (element.get("class"), properties)
    return widgets


def module_tree():
    return ast.parse(MODULE_FILE.read_text(), filename=str(MODULE_FILE))


def class_node(tree, name):
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    raise AssertionError(f"class {name} not found in {MODULE_FILE.name}")


def parameter_fields():
    """{field: annotation AST} of the parameter node class."""
    cls = class_node(module_tree(), "TumorPersonalizationParameterNode")
    return {n.target.id: n.annotation for n in cls.body if isinstance(n, ast.AnnAssign)}


def expected_widget(annotation):
    """(widget class, [node classes] or None) a parameter of this annotation must be bound to; Optional[Union[A, B]]
    of nodes is a node selector showing A and B."""
    if isinstance(annotation, ast.Subscript) and isinstance(annotation.value, ast.Name):
        if annotation.value.id == "Optional":
            inner = annotation.slice
            if isinstance(inner, ast.Subscript) and getattr(inner.value, "id", "") == "Union":
                return "qMRMLNodeComboBox", [element.id for element in inner.slice.elts]
            return "qMRMLNodeComboBox", [inner.id]
        if annotation.value.id == "Annotated":
            base, *extras = annotation.slice.elts
            has_choice = any(isinstance(e, ast.Call) and getattr(e.func, "id", "") == "Choice" for e in extras)
            if has_choice:
                return "QComboBox", None
            return {"int": "QSpinBox", "float": "QDoubleSpinBox", "str": "QLineEdit"}[base.id], None
    if isinstance(annotation, ast.Name):
        return {"int": "QSpinBox", "float": "QDoubleSpinBox", "str": "QLineEdit", "bool": "QCheckBox"}[annotation.id], \
            None
    raise AssertionError(f"unexpected parameter annotation {ast.dump(annotation)}")


def shipped_python_files():
    """Every Python file the extension installs, plus the batch script Slicer runs."""
    module_scripts = [MODULE_DIRECTORY / f for f in cmake_list(MODULE_DIRECTORY / "CMakeLists.txt",
                                                             "MODULE_PYTHON_SCRIPTS")]
    library = [LIBRARY_DIRECTORY / f for f in cmake_list(MODULE_DIRECTORY / "CMakeLists.txt", "LIBRARY_PYTHON_FILES")]
    return module_scripts + library + [BATCH_SCRIPT]


# ---- .ui <-> code -------------------------------------------------------------------------------------------------
def test_every_widget_the_code_touches_exists_in_the_ui():
    widgets = ui_widgets()
    used = {node.attr for node in ast.walk(module_tree())
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui" and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"}
    assert used, "the Widget uses no self.ui.* widgets?"
    missing = sorted(used - set(widgets))
    assert not missing, f"self.ui.{missing} are not in {UI_FILE.name}"


def test_every_parameter_is_bound_to_one_widget_of_the_right_kind():
    widgets = ui_widgets()
    bound = {}
    for name, (_, properties) in widgets.items():
        parameter = properties.get("SlicerParameterName")
        if parameter:
            assert parameter not in bound, f"{parameter} bound twice ({bound[parameter]}, {name})"
            bound[parameter] = name
    fields = parameter_fields()
    assert set(bound) == set(fields), (f"unbound parameters: {sorted(set(fields) - set(bound))}, "
                                       f"bindings to no parameter: {sorted(set(bound) - set(fields))}")
    for field, annotation in fields.items():
        widget_class, node_class = expected_widget(annotation)
        cls, properties = widgets[bound[field]]
        assert cls == widget_class, f"{field} is bound to a {cls}, expected a {widget_class}"
        if node_class:
            assert properties.get("nodeTypes") == node_class, f"{bound[field]} shows {properties.get('nodeTypes')}"


def test_the_logic_has_every_method_the_widget_calls():
    tree = module_tree()
    logic = class_node(tree, "TumorPersonalizationLogic")
    methods = {n.name for n in logic.body if isinstance(n, ast.FunctionDef)}
    widget = class_node(tree, "TumorPersonalizationWidget")
    called = {node.attr for node in ast.walk(widget)
              if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
              and node.value.attr == "logic"}
    assert called and called <= methods | {"getParameterNode"}, sorted(called - methods)


def test_no_function_rebinds_the_translation_function():
    """`_` is slicer.i18n.tr: a function that also assigns `_` (say `summary, _ = ...`) makes it a local name there,
    and every `_("...")` in that function fails, before the assignment too."""
    offenders = []
    for function in ast.walk(module_tree()):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        arguments = function.args.args + function.args.kwonlyargs + function.args.posonlyargs
        bound = [a.arg for a in arguments] + [n.id for n in ast.walk(function)
                                              if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)]
        if "_" in bound:
            offenders.append(f"{function.name} (line {function.lineno})")
    assert not offenders, f"these functions bind `_`: {offenders}"


def test_every_input_frame_and_choice_is_wired():
    """Each tissue input kind has a frame the Widget shows for it, and each lesion-tissue choice a tooltip."""
    source = MODULE_FILE.read_text()
    widgets = ui_widgets()
    for frame, index in (("tissueSegmentationFrame", 0), ("tissueLabelmapFrame", 1), ("tissueProbabilityFrame", 2),
                         ("t1Frame", 3)):
        assert frame in widgets
        assert f"self.ui.{frame}.visible = parameters.tissueInput == TISSUE_INPUTS[{index}]" in source, frame
    assert widgets["t1Selector"][1]["SlicerParameterName"] == "t1Volume"
    assert widgets["recurrenceSelector"][1]["SlicerParameterName"] == "recurrence"
    tooltip = " ".join(widgets["lesionTissueComboBox"][1]["toolTip"].split())
    for words in ("atlas (default)", "registered to the tissue", "surround", "surrounding WM/GM", "keep",
                  "kept as given"):
        assert words in tooltip, words


# ---- CMake <-> files ----------------------------------------------------------------------------------------------
def test_every_file_the_cmake_lists_name_exists_and_every_library_file_is_listed():
    cmake = MODULE_DIRECTORY / "CMakeLists.txt"
    for item in cmake_list(cmake, "MODULE_PYTHON_SCRIPTS") + cmake_list(cmake, "MODULE_PYTHON_RESOURCES"):
        assert (MODULE_DIRECTORY / item).is_file(), f"{item} listed in {cmake} does not exist"
    for item in cmake_list(cmake, "LIBRARY_RUNTIME_RESOURCES"):
        assert (REPOSITORY / "Resources" / item).is_file(), f"Resources/{item} listed in {cmake} does not exist"
    listed = cmake_list(cmake, "LIBRARY_PYTHON_FILES")
    assert len(listed) == len(set(listed)), "a library file is listed twice"
    present = sorted(p.relative_to(LIBRARY_DIRECTORY).as_posix() for p in LIBRARY_DIRECTORY.rglob("*.py")
                     if "__pycache__" not in p.parts)
    assert sorted(listed) == present, (f"not listed: {sorted(set(present) - set(listed))}; listed but missing: "
                                       f"{sorted(set(listed) - set(present))}")
    # The whole atlas ships, and of the models exactly those the inversion loads (registry.SHIPPED_MODELS), each
    # with its card: replaced models and earlier training stages stay in the repository only.
    from TumorPersonalizationLib.registry import SHIPPED_MODELS

    runtime = set(cmake_list(cmake, "LIBRARY_RUNTIME_RESOURCES"))
    assert {f"Atlas/{p.name}" for p in (REPOSITORY / "Resources" / "Atlas").iterdir()} <= runtime
    assert {item for item in runtime if item.startswith("Models/")} == \
        {f"Models/{model}.{suffix}" for model in SHIPPED_MODELS.values() for suffix in ("pt", "json")}


def test_module_cmake_builds_the_scripted_module_with_tests():
    text = _cmake_text(MODULE_DIRECTORY / "CMakeLists.txt")
    macro = re.search(r"slicerMacroBuildScriptedModule\((.*?)\)", text, re.S).group(1)
    for word in ("NAME ${MODULE_NAME}", "SCRIPTS ${MODULE_PYTHON_SCRIPTS} ${_library_scripts}",
                 "RESOURCES ${MODULE_PYTHON_RESOURCES}", "WITH_GENERIC_TESTS"):
        assert word in " ".join(macro.split()), f"slicerMacroBuildScriptedModule lacks {word}"
    assert re.search(r"slicer_add_python_unittest\(\s*SCRIPT\s+\$\{MODULE_NAME\}\.py\s*\)", text)


def test_extension_cmake_json_readme_and_license():
    text = _cmake_text(REPOSITORY / "CMakeLists.txt")
    assert re.search(r"\bproject\(\s*TumorPersonalization\s*\)", text)
    for variable in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                     "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert re.search(rf"\bset\(\s*{variable}\s", text), f"{variable} is not set"
    assert re.search(r"\bset\(\s*EXTENSION_DEPENDS\s+PyTorch\s*\)", text)
    ordered = ["find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})",
               "add_subdirectory(TumorPersonalization)", "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
               "include(${Slicer_EXTENSION_CPACK})"]
    positions = [text.find(statement) for statement in ordered]
    assert -1 not in positions and positions == sorted(positions), dict(zip(ordered, positions))
    category = re.search(r'set\(\s*EXTENSION_CATEGORY\s+"([^"]+)"', text).group(1)

    description = json.loads((REPOSITORY / "TumorPersonalization.json").read_text())
    assert description["category"] == category == "Simulation"
    assert description["build_dependencies"] == ["PyTorch"]
    assert description["scm_url"].startswith("https://") and "Slicer" in description["scm_url"].rsplit("/", 1)[1]
    assert (REPOSITORY / "README.md").is_file()
    license_text = (REPOSITORY / "LICENSE").read_text()
    assert "BSD 3-Clause" in license_text and "2026, TumorPersonalization contributors" in license_text


# ---- Python 3.9 -----------------------------------------------------------------------------------------------------
def _python310_runtime_features(tree):
    """Constructs that parse on 3.9 but fail when run there."""
    found = []
    future_annotations = any(isinstance(n, ast.ImportFrom) and n.module == "__future__"
                             and any(a.name == "annotations" for a in n.names) for n in tree.body)
    annotations = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            annotations += [a.annotation for a in node.args.args + node.args.kwonlyargs + node.args.posonlyargs]
            annotations.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
        elif isinstance(node, ast.Call):
            name = getattr(node.func, "id", getattr(node.func, "attr", ""))
            keywords = {k.arg for k in node.keywords}
            if name == "dataclass" and keywords & {"slots", "kw_only", "match_args"}:
                found.append(f"line {node.lineno}: dataclass({', '.join(keywords)}) needs 3.10")
            if name == "zip" and "strict" in keywords:
                found.append(f"line {node.lineno}: zip(strict=...) needs 3.10")
    if not future_annotations:
        for annotation in filter(None, annotations):
            for node in ast.walk(annotation):
                if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
                    found.append(f"line {node.lineno}: 'X | Y' annotation needs 3.10")
    return found


def test_every_file_the_extension_ships_parses_and_runs_on_python_3_9():
    files = shipped_python_files()
    assert BATCH_SCRIPT.is_file() and MODULE_FILE in files
    for path in files:
        source = path.read_text()
        try:
            tree = ast.parse(source, filename=str(path), feature_version=(3, 9))
        except SyntaxError as error:
            pytest.fail(f"{path.relative_to(REPOSITORY)} does not parse on Python 3.9: {error}")
        problems = _python310_runtime_features(tree)
        assert not problems, f"{path.relative_to(REPOSITORY)}: {problems}"


def test_the_python_3_9_check_catches_what_it_is_for():
    newer = ("def f(x: int | None) -> str | None: ...\n"
             "@dataclass(slots=True)\nclass A: ...\n"
             "pairs = zip(a, b, strict=True)\n")
    assert len(_python310_runtime_features(ast.parse(newer))) == 4
    assert _python310_runtime_features(ast.parse("from __future__ import annotations\ndef f(x: int | None): ...")) \
        == []
    with pytest.raises(SyntaxError):
        ast.parse("match x:\n    case 1:\n        pass\n", feature_version=(3, 9))


def test_the_library_imports_no_slicer_or_qt_at_module_level():
    for path in LIBRARY_DIRECTORY.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert name.split(".")[0] not in ("slicer", "qt", "ctk", "vtk", "PythonQt"), \
                    f"{path.name} imports {name} at module level"


# ---- the module file under slicer-core ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def module():
    pytest.importorskip("slicer", reason="slicer-core (Python >= 3.11) not installed")
    from conftest_slicer import load_module_file

    return load_module_file()


def test_module_imports_under_slicer_core_and_describes_itself(module):
    parent = SimpleNamespace()
    module.TumorPersonalization(parent)
    assert parent.title == "Tumor Personalization"
    assert parent.categories == ["Simulation"]
    assert parent.contributors
    help_text = " ".join(parent.helpText.split()).lower()
    for words in ("research use only", "not for clinical decisions", "patient ras millimetres",
                  "mu_d</b> = sqrt(d_wm &middot; t), in mm", "mu_rho</b> = sqrt(rho &middot; t), dimensionless"):
        assert words in help_text, words
    acknowledgement = " ".join(parent.acknowledgementText.split())
    for words in ("Weidner", "Ezhov", "A learnable prior improves inverse tumor growth modeling",
                  "IEEE Transactions on Medical Imaging, 2024", "arXiv"):
        assert words in acknowledgement, words


def test_logic_and_parameter_node_under_slicer_core(module):
    logic_class = module.TumorPersonalizationLogic
    for method in ("personalize", "startBackgroundRun", "loadOutputs", "showOutputs", "ensureDependencies",
                   "tissueFromNode", "tumorVolumeFromNode", "inputsFromParameterNode", "getParameterNode"):
        assert callable(getattr(logic_class, method, None)), method
    for name in ("TumorPersonalizationWidget", "TumorPersonalizationTest", "BackgroundRun"):
        assert hasattr(module, name)
    parameters = logic_class().getParameterNode()
    assert parameters.method == DEFAULT_METHOD and parameters.device == "auto"
    assert (parameters.necroticLabel, parameters.edemaLabel, parameters.enhancingLabel) == (1, 2, 3)
    assert (parameters.csfLabel, parameters.gmLabel, parameters.wmLabel) == (1, 2, 3)
    assert (parameters.wmSegmentName, parameters.gmSegmentName, parameters.csfSegmentName) == ("WM", "GM", "CSF")
    assert module.METHODS[0] == DEFAULT_METHOD and set(module.METHODS) == {
        "hybrid", "hybrid-fd", "gb-surrogate", "direct", "cma-surrogate", "cma-solver"}
    assert logic_class.missingInputs(parameters) == ["tissue segmentation", "concentration map"]
