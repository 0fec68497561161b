"""Stand-ins for the parts of the slicer package that only the Slicer application has, for importing and running
the module file outside it: under slicer-core (the MRML libraries, Python >= 3.11) and in an environment with only
a stock Slicer's Python packages and no Slicer at all (Testing/stock_slicer, Python 3.9 and 3.12).

They live in the tests, never in the module file: the module imports the real ones inside Slicer.
"""
import sys
import types
from pathlib import Path

MODULE_FILE = Path(__file__).resolve().parents[1] / "TumorPersonalization" / "TumorPersonalization.py"


def _scripted_module_standins():
    """Small stand-ins for slicer.ScriptedLoadableModule, which only the application has (DESIGN.md): enough to
    import the module file, build its Logic and run its Test."""
    import types
    import unittest

    standins = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

        def resourcePath(self, filename):
            return str(MODULE_FILE.parent / "Resources" / filename)

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            self.moduleName = type(self).__name__[: -len("Logic")]

        def getParameterNode(self):
            import slicer

            scene = slicer.mrmlScene
            node = scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if node is None:
                node = slicer.vtkMRMLScriptedModuleNode()
                node.SetSingletonTag(self.moduleName)
                node.SetName(self.moduleName)
                node = scene.AddNode(node)
            return node

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=None):
            print(message)

    for standin in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                    ScriptedLoadableModuleTest):
        setattr(standins, standin.__name__, standin)
    return standins


def _parameter_node_wrapper_standin():
    """slicer.parameterNodeWrapper, which only the application has: the same fields, their values held in memory
    (defaults from the class), enough for the Logic and the Test."""
    import types

    standin = types.ModuleType("slicer.parameterNodeWrapper")

    def parameterNodeWrapper(cls):
        fields = list(getattr(cls, "__annotations__", {}))

        def __init__(self, parameterNode=None):
            self.parameterNode = parameterNode
            for name in fields:
                setattr(self, name, getattr(cls, name, None))

        cls.__init__ = __init__
        return cls

    class Choice:
        def __init__(self, choices):
            self.choices = tuple(choices)

    class WithinRange:
        def __init__(self, minimum, maximum):
            self.minimum, self.maximum = minimum, maximum

    standin.parameterNodeWrapper, standin.Choice, standin.WithinRange = parameterNodeWrapper, Choice, WithinRange
    return standin


def _i18n_standin():
    """slicer.i18n (Slicer 5.4 and later; not in slicer-core): tr and translate return the text untranslated."""
    import types

    standin = types.ModuleType("slicer.i18n")
    standin.tr = lambda text: text
    standin.translate = lambda context, text: text
    return standin


def install_application_standins():
    """Put the stand-ins for the application-only parts of the slicer package into sys.modules (where the package
    lacks them) and return them by name. The slicer package itself must be importable (slicer-core, or
    install_slicer_package_standin)."""
    import importlib.util

    import slicer

    standins = {"slicer.ScriptedLoadableModule": _scripted_module_standins,
                "slicer.parameterNodeWrapper": _parameter_node_wrapper_standin, "slicer.i18n": _i18n_standin}
    installed = {}
    for name, make in standins.items():
        if name not in sys.modules and importlib.util.find_spec(name) is None:
            sys.modules[name] = make()
            setattr(slicer, name.split(".")[1], sys.modules[name])
        installed[name] = sys.modules[name]
    return installed


def install_slicer_package_standin():
    """Where no slicer package exists (no slicer-core): a `slicer` package and a `vtk` module with just the names the
    module file uses at import and in its Logic's dependency and background-run code. Returns the slicer stand-in."""
    if "slicer" in sys.modules:
        return sys.modules["slicer"]
    vtk = types.ModuleType("vtk")
    vtk.vtkCommand = type("vtkCommand", (), {"ModifiedEvent": 33})
    sys.modules.setdefault("vtk", vtk)
    slicer = types.ModuleType("slicer")
    slicer.__path__ = []  # a package, so that "from slicer.x import y" looks in sys.modules
    for name in ("vtkMRMLLabelMapVolumeNode", "vtkMRMLScalarVolumeNode", "vtkMRMLSegmentationNode"):
        setattr(slicer, name, type(name, (), {}))
    util = types.ModuleType("slicer.util")

    class VTKObservationMixin:
        def __init__(self):
            self.observations = []

    def pip_install(requirements):
        raise AssertionError("a test never installs packages")

    util.VTKObservationMixin, util.pip_install = VTKObservationMixin, pip_install
    slicer.util = util
    sys.modules["slicer"], sys.modules["slicer.util"] = slicer, util
    return slicer
