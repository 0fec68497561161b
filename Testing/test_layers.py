"""The library's layering, read from its source (ast): no run-time module imports the offline subpackage, the
pipeline uses no private name of another module (attribute or import), and no test touches a private name."""
import ast
from pathlib import Path

LIBRARY = Path(__file__).resolve().parents[1] / "TumorPersonalizationLib"


def runtime_modules():
    return sorted(p for p in LIBRARY.rglob("*.py")
                  if "__pycache__" not in p.parts and p.relative_to(LIBRARY).parts[0] != "offline")


def imported_modules(path: Path, source: str = None):
    """The absolute names of every module `path` (or `source`, read as that file) imports, at top level or inside
    functions."""
    package = (("TumorPersonalizationLib",) + path.relative_to(LIBRARY).parent.parts)
    names = []
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - (node.level - 1)] if node.level else ()
            module = ".".join(base + ((node.module,) if node.module else ()))
            names.append(module)
            names += [f"{module}.{alias.name}" for alias in node.names]  # `from . import offline`
    return names


def offline_imports(path: Path, source: str = None):
    return [name for name in imported_modules(path, source)
            if name == "TumorPersonalizationLib.offline" or name.startswith("TumorPersonalizationLib.offline.")]


def private_attributes(path: Path):
    """(line, expression) of every `x._name` in `path` where x is not self or cls, and of every `_name` imported
    from another module (dunder names aside)."""
    source = path.read_text()
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                out.append((node.lineno, ast.get_source_segment(source, node)))
        elif isinstance(node, ast.ImportFrom):
            out += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names
                    if alias.name.startswith("_") and not alias.name.startswith("__")]
    return out


def test_the_checks_see_what_they_look_for(tmp_path):
    """Relative imports resolve against the file's own package (a module of the inversion subpackage here, read from
    a string), and only other objects' private attributes count."""
    source = "from ..offline.dataset import RECIPES\nfrom .. import offline\nfrom ..plans import make_plans\n" \
             "from .tissue import _as_volume\nx = problem._fd.runs + self._y + type(x).__name__\n"
    assert offline_imports(LIBRARY / "inversion" / "fake.py", source) == [
        "TumorPersonalizationLib.offline.dataset", "TumorPersonalizationLib.offline.dataset.RECIPES",
        "TumorPersonalizationLib.offline"]
    probe = tmp_path / "probe.py"
    probe.write_text(source)
    assert sorted(expression for _, expression in private_attributes(probe)) == ["problem._fd", "tissue._as_volume"]


def test_no_runtime_module_imports_the_offline_subpackage():
    modules = runtime_modules()
    assert LIBRARY / "pipeline.py" in modules and LIBRARY / "inversion" / "problem.py" in modules
    assert not any("offline" in p.parts for p in modules)
    offending = {str(p.relative_to(LIBRARY)): offline_imports(p) for p in modules if offline_imports(p)}
    assert offending == {}, f"run-time modules import the offline subpackage: {offending}"


def test_the_pipeline_uses_no_private_name_of_another_module():
    found = private_attributes(LIBRARY / "pipeline.py")
    assert found == [], f"pipeline.py reads private attributes: {found}"


def test_no_test_touches_a_private_name():
    """Tests use what the library offers its users: no `x._field` on an object, no `_name` imported."""
    tests = sorted(Path(__file__).resolve().parent.rglob("*.py"))
    found = {path.name: private_attributes(path) for path in tests}
    assert {name: hits for name, hits in found.items() if hits} == {}
