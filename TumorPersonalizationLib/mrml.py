"""MRML bridge: Slicer scene nodes <-> the library's Volume, Tissue and results.

Everything that touches a Slicer node goes through this file, so the module's Logic stays a thin layer and the
same code runs inside Slicer, under Slicer's --no-main-window batch mode and under plain Python with the PyPI
package ``slicer-core``. ``slicer`` and ``vtk`` are imported inside the functions, never at module level: the rest of
the library imports without Slicer.

Geometry travels exactly: a volume node's IJK-to-RAS matrix (spacing, origin, axis directions, and a linear parent
transform if there is one) becomes a ``Geometry``, and a ``Geometry`` becomes the matrix of the node written back.
Arrays are (k, j, i) as ``slicer.util.arrayFromVolume`` returns them, and are copied on the way in (that function
returns a view into VTK memory).

Outputs: ``volume_to_node``, ``plans_to_segmentation_node``, ``seed_to_markups`` and ``table_node_from_dict`` take an
optional existing node and replace its content, so a re-run updates its outputs instead of adding new ones.
"""
import re
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .constants import DEFAULT_TUMOR_LABELS
from .errors import InputError
from .geometry import Geometry, Volume
from .tissue import Tissue, TissueLabels

# Segment names of a tissue segmentation (matched exactly first, then ignoring case and surrounding spaces).
DEFAULT_TISSUE_SEGMENT_NAMES = {"wm": "WM", "gm": "GM", "csf": "CSF"}

# The infiltration map shows concentrations from this value up; lower values are transparent, so the patient image
# stays visible around the tumor. 0.01 is well below the visible edge (c = 0.25) and keeps most of the invisible tail.
INFILTRATION_DISPLAY_THRESHOLD = 0.01
INFILTRATION_COLOR_NODE_NAME = "TumorPersonalization Inferno"
# Colour stops of an Inferno-like perceptually ordered map (black - purple - red - orange - pale yellow), at
# 0, 0.25, 0.5, 0.75, 1. The colour table interpolates linearly between them.
INFERNO_LIKE_STOPS = (
    (0.00, (0.00, 0.00, 0.02)),
    (0.25, (0.34, 0.06, 0.43)),
    (0.50, (0.73, 0.21, 0.33)),
    (0.75, (0.98, 0.56, 0.04)),
    (1.00, (0.99, 1.00, 0.64)),
)

# Colours of known plan segments (standard 15 mm margin plan, model equal-volume plan, iso-concentration plan).
PLAN_SEGMENT_COLORS = {
    "standard": (0.20, 0.60, 1.00),
    "model": (1.00, 0.45, 0.10),
    "iso": (0.40, 0.85, 0.35),
}
# Segment tag holding a plan's volume in cm^3 (also in the results table); read it with plan_volume_cm3().
PLAN_VOLUME_TAG = "TumorPersonalization.Volume_cm3"

ReferenceLike = Union[Geometry, object]  # a Geometry or a vtkMRMLVolumeNode

# Logics of the headless scene, kept alive for the process (see create_headless_scene).
_HEADLESS = {}


# ---- scene --------------------------------------------------------------------------------------------------------
def create_headless_scene():
    """A scene with the logics the bridge needs, for plain Python with slicer-core (inside Slicer use
    slicer.mrmlScene). Created once per process and returned again on later calls; also set as slicer.mrmlScene.

    The application, colour, volumes and segmentations logics are created on it (the last registers the
    segmentation converter rules, which must happen once: registering again duplicates them), and Python
    references to them are kept: when they are garbage-collected, creating a label map crashes.
    """
    import slicer
    import vtk

    if not _HEADLESS:
        scene = slicer.vtkMRMLScene()
        application_logic = slicer.vtkSlicerApplicationLogic()
        application_logic.SetMRMLScene(scene)
        logics = [application_logic]
        for logic_class in (slicer.vtkSlicerColorLogic, slicer.vtkSlicerVolumesLogic,
                            slicer.vtkSlicerSegmentationsModuleLogic):
            logic = logic_class()
            logic.SetMRMLApplicationLogic(application_logic)
            # The colour logic looks for the application's colour files, which slicer-core does not have, and logs an
            # error about it; the built-in colour tables it adds are all the bridge needs.
            quiet = logic_class is slicer.vtkSlicerColorLogic
            verbosity = vtk.vtkLogger.GetCurrentVerbosityCutoff()
            if quiet:
                vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.VERBOSITY_OFF)
            try:
                logic.SetMRMLScene(scene)
            finally:
                if quiet:
                    vtk.vtkLogger.SetStderrVerbosity(verbosity)
            logics.append(logic)
        _HEADLESS.update(scene=scene, logics=logics)
    slicer.mrmlScene = _HEADLESS["scene"]
    # Inside the application every scene has its subject hierarchy node; headless it would appear on first use.
    slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(_HEADLESS["scene"])
    return _HEADLESS["scene"]



# ---- geometry ---------------------------------------------------------------------------------------------------
def _node_to_world_matrix(node) -> np.ndarray:
    """4x4 matrix of the node's parent transform to world (identity without one); InputError if it is non-linear."""
    import vtk

    transform_node = node.GetParentTransformNode()
    if transform_node is None:
        return np.eye(4)
    if not transform_node.IsTransformToWorldLinear():
        raise InputError(f"'{node.GetName()}' is under a non-linear transform ('{transform_node.GetName()}'): "
                         "harden the transform first (Data module, right-click, Harden transform)")
    matrix = vtk.vtkMatrix4x4()
    transform_node.GetMatrixTransformToWorld(matrix)
    return _numpy_from_vtk_matrix(matrix)


def _numpy_from_vtk_matrix(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def _vtk_matrix_from_numpy(array: np.ndarray):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def ijk_to_ras_matrix(geometry: Geometry) -> np.ndarray:
    """The 4x4 IJK-to-RAS matrix of a Geometry (what vtkMRMLVolumeNode.SetIJKToRASMatrix takes)."""
    matrix = np.eye(4)
    matrix[:3, :3] = geometry.index_to_ras_matrix
    matrix[:3, 3] = geometry.origin_ras_mm
    return matrix


def geometry_from_ijk_to_ras(matrix: np.ndarray, shape_kji: Sequence[int]) -> Geometry:
    """Geometry of a (k, j, i) grid from a 4x4 IJK-to-RAS matrix (columns: spacing times the axis directions)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    axes = matrix[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    if np.any(spacing <= 0):
        raise InputError(f"degenerate IJK-to-RAS matrix (voxel spacing {tuple(spacing)})")
    return Geometry(tuple(int(n) for n in shape_kji), tuple(spacing), tuple(matrix[:3, 3]), axes / spacing)


def geometry_from_node(node) -> Geometry:
    """Geometry of a volume node in world RAS (its IJK-to-RAS matrix after a linear parent transform)."""
    import vtk

    _require_image(node)
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    ijk_to_world = _node_to_world_matrix(node) @ _numpy_from_vtk_matrix(matrix)
    shape_kji = tuple(reversed(node.GetImageData().GetDimensions()))
    return geometry_from_ijk_to_ras(ijk_to_world, shape_kji)


def _require_image(node) -> None:
    if node is None:
        raise InputError("no volume selected")
    image = node.GetImageData() if hasattr(node, "GetImageData") else None
    if image is None or min(image.GetDimensions()) < 1 or image.GetPointData().GetScalars() is None:
        raise InputError(f"'{node.GetName()}' holds no image data")


# ---- nodes -> library types ---------------------------------------------------------------------------------------
def volume_from_node(node) -> Volume:
    """A scalar volume or label map volume node as a Volume (array copied, geometry in world RAS)."""
    import slicer

    _require_image(node)
    components = node.GetImageData().GetNumberOfScalarComponents()
    if components != 1:
        raise InputError(f"'{node.GetName()}' has {components} components per voxel; a scalar volume is needed")
    array = np.array(slicer.util.arrayFromVolume(node), copy=True)
    return Volume(array, geometry_from_node(node))


def t1_from_node(node) -> Volume:
    """A T1-weighted scalar volume node as a float32 Volume (geometry in world RAS), for personalize(t1=...).
    InputError when no node is given or it is a label map (a segmentation, not an image)."""
    if node is None:
        raise InputError("no T1-weighted image selected")
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputError(f"'{node.GetName()}' is a label map; the T1 must be a (skull-stripped) T1-weighted image")
    volume = volume_from_node(node)
    return Volume(volume.array.astype(np.float32, copy=False), volume.geometry)


def tissue_from_labelmap_node(node, labels: TissueLabels = TissueLabels()) -> Tissue:
    """Tissue from a label map volume node (CSF=1, GM=2, WM=3 unless other labels are given)."""
    return Tissue.from_labelmap(volume_from_node(node), labels)


def tissue_from_probability_nodes(wm_node, gm_node, csf_node) -> Tissue:
    """Tissue from three probability (fraction) volume nodes on one grid."""
    for name, node in (("WM", wm_node), ("GM", gm_node), ("CSF", csf_node)):
        if node is None:
            raise InputError(f"no {name} probability volume selected (all three of WM, GM and CSF are needed)")
    return Tissue.from_probabilities(volume_from_node(wm_node), volume_from_node(gm_node), volume_from_node(csf_node))


def segment_names(segmentation_node) -> List[str]:
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegment(index).GetName() for index in range(segmentation.GetNumberOfSegments())]


def segment_ids_by_name(segmentation_node, wanted_names: Iterable[str]) -> Dict[str, str]:
    """{wanted name: segment id}. Exact names first, then ignoring case and surrounding spaces; InputError naming
    every missing segment and listing those present."""
    segmentation = segmentation_node.GetSegmentation()
    present = {}
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        present.setdefault(segmentation.GetSegment(segment_id).GetName(), segment_id)
    folded = {}
    for name, segment_id in present.items():
        folded.setdefault(name.strip().casefold(), segment_id)
    found, missing = {}, []
    for name in wanted_names:
        segment_id = present.get(name) or folded.get(str(name).strip().casefold())
        if segment_id is None:
            missing.append(name)
        else:
            found[name] = segment_id
    if missing:
        listed = ", ".join(repr(n) for n in present) or "none"
        raise InputError(f"segmentation '{segmentation_node.GetName()}' has no segment named "
                         f"{', '.join(repr(n) for n in missing)} (segments present: {listed}); choose the segment "
                         "names in the tissue mapping")
    return found


def _node_ids(scene) -> List[str]:
    return [scene.GetNthNode(index).GetID() for index in range(scene.GetNumberOfNodes())]


class _TemporaryNodes:
    """Removes, on exit, every node added to the scene inside the block (the exports below create label maps,
    display nodes and colour tables as side effects), keeping the subject hierarchy and display nodes of nodes
    that were there before."""

    def __init__(self, scene):
        self.scene = scene

    def __enter__(self):
        self.before = set(_node_ids(self.scene))
        return self

    def __exit__(self, *exc_info):
        for node_id in reversed(_node_ids(self.scene)):
            if node_id in self.before:
                continue
            node = self.scene.GetNodeByID(node_id)
            if node is None or node.IsA("vtkMRMLSubjectHierarchyNode"):
                continue
            if node.IsA("vtkMRMLDisplayNode") and node.GetDisplayableNode() is not None \
                    and node.GetDisplayableNode().GetID() in self.before:
                continue
            self.scene.RemoveNode(node)
        return False


def _reference_node(scene, reference: ReferenceLike):
    """A volume node for a reference given as a node or as a Geometry (then a temporary node is added)."""
    import slicer

    if not isinstance(reference, Geometry):
        _require_image(reference)
        return reference
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "__TumorPersonalization_reference__")
    node.SetIJKToRASMatrix(_vtk_matrix_from_numpy(ijk_to_ras_matrix(reference)))
    slicer.util.updateVolumeFromArray(node, np.zeros(reference.shape_kji, dtype=np.uint8))
    return node


def _segment_masks(segmentation_node, segment_ids: Sequence[str],
                   reference: Optional[ReferenceLike]) -> Tuple[List[np.ndarray], Geometry]:
    """Binary masks (k, j, i) of the segments on one grid: the reference's, or the segments' common extent."""
    import slicer

    scene = segmentation_node.GetScene()
    if scene is None:
        raise InputError(f"segmentation '{segmentation_node.GetName()}' is not in a scene")
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    masks = []
    with _TemporaryNodes(scene):
        if reference is None:
            # No reference: the union of the segments' extents on the segmentation's own labelmap grid.
            union = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__TumorPersonalization_union__")
            if not logic.ExportSegmentsToLabelmapNode(segmentation_node, list(segment_ids), union, None) \
                    or union.GetImageData() is None:
                raise InputError(f"segmentation '{segmentation_node.GetName()}' could not be exported as a label map "
                                 "(are its segments empty?)")
            reference_node = union
        else:
            reference_node = _reference_node(scene, reference)
        geometry = geometry_from_node(reference_node)
        for segment_id in segment_ids:
            labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__TumorPersonalization_segment__")
            if not logic.ExportSegmentsToLabelmapNode(segmentation_node, [segment_id], labelmap, reference_node):
                raise InputError(f"segment '{segment_id}' of '{segmentation_node.GetName()}' could not be exported")
            mask = np.array(slicer.util.arrayFromVolume(labelmap), copy=True) > 0
            if mask.shape != geometry.shape_kji:  # defensive: the export follows the reference's grid
                raise InputError(f"segment '{segment_id}' was exported on a grid of shape {mask.shape}, expected "
                                 f"{geometry.shape_kji}")
            masks.append(mask)
    return masks, geometry


def segmentation_reference(node) -> Optional[ReferenceLike]:
    """The grid a segmentation was drawn on: its reference geometry volume node, else the reference geometry stored
    with the segmentation (kept in .seg.nrrd files), else None."""
    import slicer

    reference_node = node.GetNodeReference(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole())
    if reference_node is not None and reference_node.GetImageData() is not None:
        return reference_node
    serialized = node.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    if not serialized:
        return None
    image = slicer.vtkOrientedImageData()
    slicer.vtkSegmentationConverter.DeserializeImageGeometry(serialized, image, False)
    extent = image.GetExtent()
    if extent[1] < extent[0] or extent[3] < extent[2] or extent[5] < extent[4]:
        return None
    import vtk

    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    ijk_to_ras = _numpy_from_vtk_matrix(matrix)
    first_voxel = ijk_to_ras @ np.array([extent[0], extent[2], extent[4], 1.0])
    ijk_to_ras[:3, 3] = first_voxel[:3]
    shape_kji = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    return geometry_from_ijk_to_ras(ijk_to_ras, shape_kji)


def tissue_from_segmentation_node(node, reference_volume_node=None,
                                  segment_names: Optional[Mapping[str, str]] = None) -> Tissue:
    """Tissue from a segmentation with WM, GM and CSF segments.

    segment_names maps "wm", "gm", "csf" to the segment names (default WM, GM, CSF). The grid is the reference
    volume's if given, else the segmentation's own reference geometry (segmentation_reference), else the segments'
    common extent.
    """
    if node is None:
        raise InputError("no tissue segmentation selected")
    names = dict(DEFAULT_TISSUE_SEGMENT_NAMES, **(dict(segment_names) if segment_names else {}))
    unknown = set(names) - set(DEFAULT_TISSUE_SEGMENT_NAMES)
    if unknown:
        raise InputError(f"segment_names keys must be wm, gm and csf, got {sorted(unknown)}")
    ids = segment_ids_by_name(node, [names["wm"], names["gm"], names["csf"]])
    reference = reference_volume_node if reference_volume_node is not None else segmentation_reference(node)
    (wm, gm, csf), geometry = _segment_masks(node, [ids[names[k]] for k in ("wm", "gm", "csf")], reference)
    if not (wm.any() or gm.any()):
        raise InputError(f"segments {names['wm']!r} and {names['gm']!r} of '{node.GetName()}' are empty on the "
                         f"reference grid ({geometry.describe()}): do the segmentation and the reference volume "
                         "overlap?")
    return Tissue(wm, gm, csf, geometry)


def labels_from_segmentation_node(node, reference: Optional[ReferenceLike],
                                  segment_to_label: Mapping[str, int]) -> Volume:
    """A label map Volume on the reference grid (a volume node or a Geometry; None: the segments' common extent)
    from named segments: {segment name: label value}. Later entries win where segments overlap."""
    if node is None:
        raise InputError("no segmentation selected")
    ids = segment_ids_by_name(node, list(segment_to_label))
    masks, geometry = _segment_masks(node, [ids[name] for name in segment_to_label], reference)
    labels = np.zeros(geometry.shape_kji, dtype=np.uint8)
    empty = []
    for (name, value), mask in zip(segment_to_label.items(), masks):
        if not 0 <= int(value) <= 255:
            raise InputError(f"label value {value} for segment {name!r} is outside 0-255")
        labels[mask] = int(value)
        if not mask.any() and _segment_is_nonempty(node, ids[name]):
            empty.append(name)
    if empty:
        raise InputError(f"segment(s) {', '.join(repr(n) for n in empty)} of '{node.GetName()}' do not overlap the "
                         f"reference grid ({geometry.describe()})")
    return Volume(labels, geometry)


def _segment_is_nonempty(segmentation_node, segment_id: str) -> bool:
    import slicer

    image = slicer.vtkOrientedImageData()
    if not slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
            segmentation_node, segment_id, image):
        return False
    scalars = image.GetPointData().GetScalars()
    if scalars is None:
        return False
    # In a shared labelmap other segments' voxels share the image: count only this segment's label value.
    label = segmentation_node.GetSegmentation().GetSegment(segment_id).GetLabelValue()
    low, high = scalars.GetRange()
    return high >= label >= low and image.GetNumberOfPoints() > 0 and _count_value(image, label) > 0


def _count_value(image, value) -> int:
    from vtk.util.numpy_support import vtk_to_numpy

    return int(np.count_nonzero(vtk_to_numpy(image.GetPointData().GetScalars()) == value))


# Words in a tumor segment's name that say which tumor region it is (BraTS 2021/2023 naming and common spellings).
# Checked in this order: BraTS 2023's edema is "surrounding non-enhancing FLAIR hyperintensity" (SNFH) and its necrotic
# core "non-enhancing tumor core" (NETC), so edema words are tried before "non-enhanc". Keys of up to 4 letters must
# be whole words ("ed", "et"); longer ones may be part of a word.
_TUMOR_REGION_WORDS = (
    ("edema", ("edema", "oedema", "ed", "snfh", "flair")),
    ("necrotic", ("necro", "ncr", "net", "netc", "non-enhanc", "nonenhanc")),
    ("enhancing", ("enhanc", "et")),
)


def _tumor_region_of(segment_name: str) -> Optional[str]:
    folded = segment_name.strip().casefold().replace("_", " ")
    words = folded.replace("-", " ").split()
    for region, keys in _TUMOR_REGION_WORDS:
        if any((key in folded) if len(key) > 4 else (key in words) for key in keys):
            return region
    return None


def tumor_segment_labels(node, labels: Sequence[int] = DEFAULT_TUMOR_LABELS) -> Dict[str, int]:
    """{segment name: label value} for a tumor segmentation; labels = the (NECROTIC, EDEMA, ENHANCING) values.

    A segment is recognised by its name (necrotic/NCR/NETC, edema/ED/SNFH, enhancing/ET, any case), or, for names
    ending in a number (a label file loaded as a segmentation: "1", "Segment_2"), by that number when it is one of
    the labels. Edema comes first in the result, so core regions win where segments overlap. InputError naming any
    segment that cannot be placed.
    """
    if node is None:
        raise InputError("no tumor segmentation selected")
    region_label = dict(zip(("necrotic", "edema", "enhancing"), (int(v) for v in labels)))
    mapping, unknown = {}, []
    for name in segment_names(node):
        region = _tumor_region_of(name)
        trailing_digits = re.search(r"(\d+)\s*$", name)
        if region is not None:
            mapping[name] = region_label[region]
        elif trailing_digits and int(trailing_digits.group(1)) in region_label.values():
            mapping[name] = int(trailing_digits.group(1))
        else:
            unknown.append(name)
    if unknown or not mapping:
        listed = ", ".join(repr(n) for n in unknown) or "none found"
        raise InputError(f"cannot tell the tumor region of segment(s) {listed} in '{node.GetName()}': name them "
                         "Necrotic, Edema and Enhancing (or NCR, ED, ET), or use a tumor label map")
    return dict(sorted(mapping.items(), key=lambda item: item[1] != region_label["edema"]))


# ---- library types -> nodes ---------------------------------------------------------------------------------------
def _reuse_or_create(scene, node, class_name: str, name: str):
    """`node` renamed when it is a node of that class in the scene (a re-run replaces its outputs), else a new one."""
    if not _node_in_scene(scene, node) or not node.IsA(class_name):
        return scene.AddNewNodeByClass(class_name, name)
    node.SetName(name)
    return node


def _node_in_scene(scene, node) -> bool:
    return node is not None and node.GetScene() is scene and scene.GetNodeByID(node.GetID()) is node


def volume_to_node(scene, volume: Volume, name: str, node=None, labelmap: bool = False):
    """Write a Volume into a scalar (or label map) volume node with its exact geometry; reuses `node` when it is
    in the scene (data, geometry and name replaced), else adds a new node. Returns the node."""
    import slicer

    class_name = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    if not _node_in_scene(scene, node) or not node.IsA(class_name) or (not labelmap and node.IsA(
            "vtkMRMLLabelMapVolumeNode")):
        node = scene.AddNewNodeByClass(class_name, name)
    else:
        node.SetName(name)
    array = np.asarray(volume.array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    elif labelmap and not np.issubdtype(array.dtype, np.integer):
        array = np.rint(array).astype(np.int16)
    elif array.dtype == np.float64 or array.dtype == np.float16:
        array = array.astype(np.float32)
    # Values are written in world RAS: no parent transform may move them.
    node.SetAndObserveTransformNodeID(None)
    node.SetIJKToRASMatrix(_vtk_matrix_from_numpy(ijk_to_ras_matrix(volume.geometry)))
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array))
    node.CreateDefaultDisplayNodes()
    return node


def infiltration_color_node(scene):
    """The Inferno-like colour table for infiltration maps (one per scene, created on first use)."""
    existing = scene.GetFirstNodeByName(INFILTRATION_COLOR_NODE_NAME)
    if existing is not None and existing.IsA("vtkMRMLColorTableNode"):
        return existing
    import slicer

    node = slicer.vtkMRMLColorTableNode()
    node.SetName(INFILTRATION_COLOR_NODE_NAME)
    node.SetTypeToUser()
    entries = 256
    node.SetNumberOfColors(entries)
    positions = np.array([stop for stop, _ in INFERNO_LIKE_STOPS])
    colors = np.array([rgb for _, rgb in INFERNO_LIKE_STOPS])
    for entry in range(entries):
        x = entry / (entries - 1)
        rgb = [float(np.interp(x, positions, colors[:, channel])) for channel in range(3)]
        node.SetColor(entry, f"{x:.3f}", rgb[0], rgb[1], rgb[2], 1.0)
    node.SetAttribute("Category", "TumorPersonalization")
    scene.AddNode(node)
    return node


def show_as_infiltration(node, threshold: float = INFILTRATION_DISPLAY_THRESHOLD) -> None:
    """Display a concentration volume with the Inferno-like map over [0, 1], values below `threshold` transparent."""
    scene = node.GetScene()
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID(infiltration_color_node(scene).GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, 1.0)
    display.AutoThresholdOff()
    display.SetThreshold(float(threshold), 1.0e6)
    display.ApplyThresholdOn()


def _oriented_image_from_mask(mask: np.ndarray, geometry: Geometry):
    import slicer
    import vtk
    from vtk.util.numpy_support import vtk_to_numpy

    image = slicer.vtkOrientedImageData()
    image.SetDimensions(*reversed(geometry.shape_kji))
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    vtk_to_numpy(image.GetPointData().GetScalars()).reshape(geometry.shape_kji)[:] = (np.asarray(mask) > 0)
    image.SetImageToWorldMatrix(_vtk_matrix_from_numpy(ijk_to_ras_matrix(geometry)))
    return image


def _segment_id_for(name: str) -> str:
    """A stable segment id from a plan name, so a re-run replaces the segment instead of adding one."""
    return "".join(ch if ch.isalnum() else "_" for ch in name.strip().lower()) or "segment"


def plans_to_segmentation_node(scene, plans: Mapping[str, np.ndarray], geometry: Geometry, name: str, node=None,
                               colors: Optional[Mapping[str, Sequence[float]]] = None):
    """Target plans (name -> mask (k, j, i) on `geometry`) as segments of one segmentation node, each tagged with its
    volume in cm^3 (PLAN_VOLUME_TAG). Reuses `node` (segments not in `plans` are removed). The reference geometry is
    set to the plans' grid, so exporting (e.g. SlicerRT's RT structure set) keeps their resolution."""
    import slicer

    node = _reuse_or_create(scene, node, "vtkMRMLSegmentationNode", name)
    node.SetAndObserveTransformNodeID(None)
    node.CreateDefaultDisplayNodes()
    segmentation = node.GetSegmentation()
    wanted_ids = {_segment_id_for(plan_name): plan_name for plan_name in plans}
    for index in reversed(range(segmentation.GetNumberOfSegments())):
        segment_id = segmentation.GetNthSegmentID(index)
        if segment_id not in wanted_ids:
            segmentation.RemoveSegment(segment_id)
    reference_set = False
    for plan_name, mask in plans.items():
        mask = np.asarray(mask)
        if mask.shape != geometry.shape_kji:
            raise InputError(f"plan {plan_name!r} has shape {mask.shape}, expected {geometry.shape_kji}")
        image = _oriented_image_from_mask(mask, geometry)
        if not reference_set:
            segmentation.SetConversionParameter(
                slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(),
                slicer.vtkSegmentationConverter.SerializeImageGeometry(image))
            reference_set = True
        segment_id = _segment_id_for(plan_name)
        color = (colors or {}).get(plan_name) or _default_plan_color(plan_name)
        if segmentation.GetSegment(segment_id) is None:
            segmentation.AddEmptySegment(segment_id, plan_name, list(color))
        segment = segmentation.GetSegment(segment_id)
        segment.SetName(plan_name)
        segment.SetColor(*color)
        if not slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
                image, node, segment_id, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE):
            raise InputError(f"could not store plan {plan_name!r} in segmentation '{name}'")
        volume_cm3 = float(np.count_nonzero(mask)) * geometry.voxel_volume_mm3() / 1000.0
        segment.SetTag(PLAN_VOLUME_TAG, f"{volume_cm3:.3f}")
    return node


def plan_volume_cm3(segmentation_node, segment_name: str) -> Optional[float]:
    """The volume in cm^3 stored with a plan segment by plans_to_segmentation_node (None if not there)."""
    import vtk

    segmentation = segmentation_node.GetSegmentation()
    segment = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(segment_name))
    value = vtk.reference("")
    if segment is None or not segment.GetTag(PLAN_VOLUME_TAG, value):
        return None
    return float(str(value))


def _default_plan_color(plan_name: str) -> Tuple[float, float, float]:
    folded = plan_name.casefold()
    for key, color in PLAN_SEGMENT_COLORS.items():
        if key in folded:
            return color
    return (0.9, 0.9, 0.2)


def seed_to_markups(scene, seed_ras_mm: Sequence[float], node=None, name: str = "Tumor seed", label: str = "seed"):
    """The tumor's seed as the single, locked control point of a point list node (reused when given)."""
    node = _reuse_or_create(scene, node, "vtkMRMLMarkupsFiducialNode", name)
    node.SetAndObserveTransformNodeID(None)
    node.RemoveAllControlPoints()
    x, y, z = (float(v) for v in seed_ras_mm)
    node.AddControlPoint(x, y, z, label)
    node.SetLocked(True)
    node.CreateDefaultDisplayNodes()
    return node


def _flatten(values: Mapping, prefix: str = "") -> List[Tuple[str, object]]:
    rows = []
    for key, value in values.items():
        label = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows.extend(_flatten(value, label + "."))
        else:
            rows.append((label, value))
    return rows


def format_value(value) -> str:
    """One table cell: floats to 6 significant digits, sequences comma-separated, None empty."""
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.6g}"
    if isinstance(value, (list, tuple, np.ndarray)):
        return ", ".join(format_value(v) for v in value)
    return str(value)


def table_node_from_dict(scene, values: Mapping, node=None, name: str = "Tumor personalization results"):
    """A two-column table (Quantity, Value) from a dict; nested dicts become dotted names ("plans.model_cm3").
    Reuses `node` (its rows are replaced)."""
    import vtk

    node = _reuse_or_create(scene, node, "vtkMRMLTableNode", name)
    node.RemoveAllColumns()
    rows = _flatten(values)
    columns = []
    for title, cells in (("Quantity", [k for k, _ in rows]), ("Value", [format_value(v) for _, v in rows])):
        column = vtk.vtkStringArray()
        column.SetName(title)
        for cell in cells:
            column.InsertNextValue(cell)
        columns.append(column)
    for column in columns:
        node.AddColumn(column)
    node.SetUseColumnTitleAsColumnHeader(True)
    node.Modified()
    return node


def dict_from_table_node(node) -> Dict[str, str]:
    """{Quantity: Value} of a table written by table_node_from_dict (values as the strings shown)."""
    table = node.GetTable()
    names, values = table.GetColumnByName("Quantity"), table.GetColumnByName("Value")
    if names is None or values is None:
        raise InputError(f"table '{node.GetName()}' has no Quantity/Value columns")
    return {names.GetValue(row): values.GetValue(row) for row in range(table.GetNumberOfRows())}


# Names of the plan segments by the library's plan keys (TargetPlans.standard, .model, .iso; plan_KEY.nii.gz).
PLAN_SEGMENT_NAMES = {
    "standard": "Standard plan (core + 15 mm)",
    "model": "Model plan (equal volume)",
    "iso": "Iso-concentration plan",
}
# parameters.json entries too long for the results table (they stay in the file).
TABLE_OMITTED_KEYS = ("history", "provenance", "search_space")


# The tissue the model ran on, as segments; the refilled lesion is drawn as an outline over it.
MODEL_TISSUE_COLORS = {"WM": (0.94, 0.94, 0.86), "GM": (0.56, 0.56, 0.56), "CSF": (0.35, 0.55, 0.85),
                       "Refilled lesion": (0.1, 0.9, 0.3)}


def model_tissue_to_segmentation_node(scene, tissue: Tissue, lesion: Optional[np.ndarray], name: str, node=None):
    """The tissue the model ran on (each voxel's largest fraction: WM, GM or CSF) and the lesion whose tissue was
    refilled (outline only, in the slice views), as one segmentation node on the tissue's grid."""
    labels = tissue.labelmap()
    default = TissueLabels()
    masks = {"WM": labels == default.wm, "GM": labels == default.gm, "CSF": labels == default.csf}
    if lesion is not None and np.any(lesion):
        masks["Refilled lesion"] = np.asarray(lesion, bool)
    node = plans_to_segmentation_node(scene, masks, tissue.geometry, name, node=node, colors=MODEL_TISSUE_COLORS)
    display = node.GetDisplayNode()
    if display is not None:
        if "Refilled lesion" in masks:
            display.SetSegmentVisibility2DFill(_segment_id_for("Refilled lesion"), False)
        # The tissue stays in the scene to inspect, but hidden: the infiltration map is what the user came for.
        display.SetVisibility(False)
    return node


# How the tissue the model ran on was made (parameters.json "tissue" block, lesion.LesionTissue.source).
TISSUE_SOURCE_TEXTS = {
    "atlas": "lesion refilled from the registered atlas",
    "surround": "lesion refilled from the surrounding WM/GM",
    "keep": "as given (lesion kept)",
    "t1": "derived from the T1 (atlas registered to it)",
}


def refilled_lesion_mask(lesion_tissue) -> Optional[np.ndarray]:
    """The mask to outline as "Refilled lesion" over the model tissue: the lesion of a LesionTissue whose lesion was
    refilled (source "atlas" or "surround"); None without one, when the tissue was kept as given, or derived from a
    T1 (nothing was refilled there)."""
    if lesion_tissue is None or lesion_tissue.source not in ("atlas", "surround"):
        return None
    return np.asarray(lesion_tissue.lesion, bool)


def tissue_summary_text(tissue_block: Optional[Mapping]) -> str:
    """One line on the tissue the model ran on, from parameters.json's "tissue" block ({source, lesion_cm3,
    refilled_cm3, registration_quality, runtime_s}); "-" without one."""
    if not tissue_block:
        return "-"
    source = tissue_block.get("source")
    parts = [TISSUE_SOURCE_TEXTS.get(source, str(source))]
    refilled, lesion = tissue_block.get("refilled_cm3"), tissue_block.get("lesion_cm3")
    if source in ("atlas", "surround") and refilled is not None:
        parts.append(f"{float(refilled):.1f} cm\u00b3 refilled"
                     + (f" of a {float(lesion):.1f} cm\u00b3 lesion" if lesion is not None else ""))
    quality = tissue_block.get("registration_quality")
    if quality is not None:
        parts.append(f"registration quality {float(quality):.2f}")
    return ", ".join(parts)


def result_nodes(scene, summary: Mapping, concentration: Volume, plans: Mapping[str, Optional[np.ndarray]],
                 base_name: str = "Tumor", previous: Optional[Mapping] = None, tissue: Optional[Tissue] = None,
                 lesion: Optional[np.ndarray] = None) -> Dict[str, object]:
    """The nodes of one personalisation: {"infiltration": volume (Inferno-like, low values transparent),
    "plans": segmentation (one segment per plan key of `plans` with a mask), "seed": point list, "table": table of
    `summary` (the parameters.json content), and with `tissue` "tissue": segmentation of the tissue the model ran on
    with the refilled `lesion` outlined (model_tissue_to_segmentation_node)}. Nodes in `previous` (same keys) are
    updated instead of added."""
    previous = previous or {}
    nodes = {}
    if tissue is not None:
        nodes["tissue"] = model_tissue_to_segmentation_node(scene, tissue, lesion, f"{base_name} model tissue",
                                                            node=previous.get("tissue"))
    nodes["infiltration"] = volume_to_node(scene, concentration, f"{base_name} infiltration",
                                           node=previous.get("infiltration"))
    show_as_infiltration(nodes["infiltration"])
    masks = {PLAN_SEGMENT_NAMES.get(key, key): mask for key, mask in plans.items() if mask is not None}
    nodes["plans"] = plans_to_segmentation_node(scene, masks, concentration.geometry, f"{base_name} target plans",
                                                node=previous.get("plans"))
    nodes["seed"] = seed_to_markups(scene, summary["seed_ras_mm"], node=previous.get("seed"),
                                    name=f"{base_name} seed")
    table_values = {key: value for key, value in summary.items() if key not in TABLE_OMITTED_KEYS}
    nodes["table"] = table_node_from_dict(scene, table_values, node=previous.get("table"),
                                          name=f"{base_name} personalization")
    return nodes


def place_beside(node, anchor_node) -> None:
    """Put `node` under the same subject-hierarchy parent as `anchor_node` (the patient/study of the input)."""
    import slicer

    if node is None or anchor_node is None or node.GetScene() is None:
        return
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(node.GetScene())
    if hierarchy is None:
        return
    anchor_item = hierarchy.GetItemByDataNode(anchor_node)
    if not anchor_item:
        return
    parent_item = hierarchy.GetItemParent(anchor_item)
    item = hierarchy.GetItemByDataNode(node)
    if item:
        hierarchy.SetItemParent(item, parent_item)
    else:  # without the subject hierarchy module (headless), nodes get no item by themselves
        hierarchy.CreateItem(parent_item, node)
