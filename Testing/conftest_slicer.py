"""Headless Slicer MRML for the tests, on the PyPI package ``slicer-core`` (Python >= 3.11).

Not a conftest.py: test files that need a scene import the fixture from here (``from conftest_slicer import
mrml_scene``). The scene is the library's own headless set-up (TumorPersonalizationLib.mrml.create_headless_scene,
as DESIGN.md describes it): application, colour, volumes and segmentations logics created once per process on one
scene, ``slicer.mrmlScene`` set, Python references to the logics kept for the whole session.
"""
import sys
from pathlib import Path

import numpy as np
import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
if str(REPOSITORY) not in sys.path:
    sys.path.insert(0, str(REPOSITORY))

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML libraries, Python >= 3.11) not installed")

from slicer_standins import install_application_standins  # noqa: E402
from TumorPersonalizationLib.geometry import Geometry  # noqa: E402

MODULE_FILE = REPOSITORY / "TumorPersonalization" / "TumorPersonalization.py"


# ---- test inputs on a rotated, anisotropic grid ------------------------------------------------------------------
def rotation_ras():
    """A proper rotation (30 deg about S, then -20 deg about R): no image axis along a RAS axis."""
    a, b = np.deg2rad(30.0), np.deg2rad(-20.0)
    about_s = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    about_r = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return about_s @ about_r


ROTATED_GEOMETRY = Geometry(shape_kji=(9, 12, 14), spacing_ijk_mm=(0.9, 1.3, 2.5), origin_ras_mm=(-11.0, 20.5, 4.0),
                            direction_ras=rotation_ras())
# Voxels (k, j, i) of each tissue class in the test segmentation.
WM_VOXEL, GM_VOXEL, CSF_VOXEL = (4, 6, 7), (2, 3, 3), (6, 9, 10)


def tissue_masks(geometry=ROTATED_GEOMETRY):
    wm, gm, csf = (np.zeros(geometry.shape_kji, np.uint8) for _ in range(3))
    wm[3:6, 5:8, 6:9] = 1
    gm[1:4, 2:5, 2:5] = 1
    csf[6:8, 9:11, 10:12] = 1
    return {"WM": wm, "GM": gm, "CSF": csf}


def reference_node(scene, geometry=ROTATED_GEOMETRY, name="reference"):
    """A scalar volume node on `geometry`, its matrix set through VTK directly (not through the bridge)."""
    import vtk

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    matrix = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            matrix.SetElement(r, c, geometry.direction_ras[r, c] * geometry.spacing_ijk_mm[c])
        matrix.SetElement(r, 3, geometry.origin_ras_mm[r])
    node.SetIJKToRASMatrix(matrix)
    slicer.util.updateVolumeFromArray(node, np.arange(np.prod(geometry.shape_kji), dtype=np.float32).reshape(
        geometry.shape_kji))
    return node


def segmentation_from_masks(scene, masks, reference_node, name="tissue segmentation"):
    """Segments imported from label map nodes on the reference grid, the way Slicer's own helpers do it."""
    import vtk

    segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    segmentation_node.CreateDefaultDisplayNodes()
    for index, (segment_name, mask) in enumerate(masks.items()):
        segment_id = f"segment_{index}"
        segmentation_node.GetSegmentation().AddEmptySegment(segment_id, segment_name, [0.5, 0.5, 0.5])
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "import")
        labelmap.CopyOrientation(reference_node)
        slicer.util.updateVolumeFromArray(labelmap, mask.astype(np.uint8))
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation_node,
                                                                                         ids)
        display = labelmap.GetDisplayNode()
        scene.RemoveNode(labelmap)
        if display is not None:
            scene.RemoveNode(display)
    return segmentation_node


# ---- the module file under slicer-core ---------------------------------------------------------------------------
def load_module_file():
    """Import TumorPersonalization/TumorPersonalization.py under slicer-core with the stand-ins installed
    (once per process; the module is then sys.modules["TumorPersonalization"])."""
    import importlib.util

    if "TumorPersonalization" in sys.modules:
        return sys.modules["TumorPersonalization"]
    from TumorPersonalizationLib.mrml import create_headless_scene

    create_headless_scene()  # the module's Logic and Test use slicer.mrmlScene
    install_application_standins()
    spec = importlib.util.spec_from_file_location("TumorPersonalization", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["TumorPersonalization"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["TumorPersonalization"]
        raise
    return module


# ---- the scene -----------------------------------------------------------------------------------------------------
@pytest.fixture
def mrml_scene():
    """The process-wide headless scene (TumorPersonalizationLib.mrml.create_headless_scene), emptied of the previous
    test's nodes; default colour tables and the subject hierarchy node stay."""
    from TumorPersonalizationLib.mrml import create_headless_scene

    scene = create_headless_scene()
    scene.Clear(0)
    create_headless_scene()  # adds back the subject hierarchy node that a scene in the application always has
    return scene
