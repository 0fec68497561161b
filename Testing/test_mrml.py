"""The MRML bridge (TumorPersonalizationLib.mrml) on the real Slicer MRML libraries (slicer-core, headless).

Geometry is checked where it matters: at known RAS points of a rotated, anisotropic grid, not only by comparing
matrices. Inputs are built with Slicer's own calls (labelmap import into segments), independent of the bridge's
output code, so a wrong convention on one side cannot cancel out on the other.
"""
import numpy as np
import pytest

from conftest_slicer import (  # noqa: F401  (mrml_scene: fixture; importing skips when slicer-core is absent)
    CSF_VOXEL,
    GM_VOXEL,
    ROTATED_GEOMETRY,
    WM_VOXEL,
    mrml_scene,
    reference_node as _reference_node,
    segmentation_from_masks as _segmentation_from_masks,
    slicer,
    tissue_masks as _tissue_masks,
)
from TumorPersonalizationLib import mrml
from TumorPersonalizationLib.errors import InputError
from TumorPersonalizationLib.geometry import Geometry, Volume
from TumorPersonalizationLib.tissue import Tissue, TissueLabels


def _voxel_centre_ras(geometry, kji):
    return geometry.index_kji_to_ras(np.asarray(kji, dtype=np.float64))


def _node_ras_of_index(node, kji):
    """RAS of a voxel centre as the node itself maps it (its IJK-to-RAS matrix)."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    k, j, i = kji
    return np.asarray(matrix.MultiplyPoint((float(i), float(j), float(k), 1.0))[:3])


# ---- volumes --------------------------------------------------------------------------------------------------------
def test_volume_round_trip_is_exact_in_ras_on_a_rotated_anisotropic_grid(mrml_scene):
    rng = np.random.default_rng(1)
    array = rng.uniform(0, 1, ROTATED_GEOMETRY.shape_kji).astype(np.float32)
    marker = (5, 2, 11)
    array[marker] = 7.0
    node = mrml.volume_to_node(mrml_scene, Volume(array, ROTATED_GEOMETRY), "round trip")

    # The node places the marker voxel where the library's geometry says it is.
    np.testing.assert_allclose(_node_ras_of_index(node, marker), _voxel_centre_ras(ROTATED_GEOMETRY, marker),
                               atol=1e-9)
    assert node.GetSpacing() == pytest.approx(ROTATED_GEOMETRY.spacing_ijk_mm)

    back = mrml.volume_from_node(node)
    np.testing.assert_array_equal(back.array, array)
    assert back.array.dtype == np.float32
    assert back.geometry.same_grid(ROTATED_GEOMETRY, tolerance_mm=1e-9)
    for kji in (marker, (0, 0, 0), (8, 11, 13), (3.5, 7.25, 0.5)):
        np.testing.assert_allclose(back.geometry.index_kji_to_ras(kji), ROTATED_GEOMETRY.index_kji_to_ras(kji),
                                   atol=1e-9)
    # The array is a copy: changing it leaves the node alone.
    back.array[marker] = 0.0
    assert slicer.util.arrayFromVolume(node)[marker] == 7.0


def test_volume_from_node_reads_a_reference_set_up_by_vtk(mrml_scene):
    node = _reference_node(mrml_scene)
    volume = mrml.volume_from_node(node)
    assert volume.geometry.same_grid(ROTATED_GEOMETRY, tolerance_mm=1e-9)
    for kji in ((0, 0, 0), (4, 6, 7), (8, 11, 13)):
        np.testing.assert_allclose(volume.geometry.index_kji_to_ras(kji), _node_ras_of_index(node, kji), atol=1e-9)
        assert volume.array[kji] == np.ravel_multi_index(kji, ROTATED_GEOMETRY.shape_kji)


def test_volume_from_node_follows_a_linear_parent_transform_and_refuses_empty_nodes(mrml_scene):
    import vtk

    node = _reference_node(mrml_scene)
    transform = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 10.0)
    shift.SetElement(2, 3, -4.0)
    transform.SetMatrixTransformToParent(shift)
    node.SetAndObserveTransformNodeID(transform.GetID())
    geometry = mrml.volume_from_node(node).geometry
    np.testing.assert_allclose(geometry.origin_ras_mm, np.add(ROTATED_GEOMETRY.origin_ras_mm, (10.0, 0.0, -4.0)))
    np.testing.assert_allclose(geometry.direction_ras, ROTATED_GEOMETRY.direction_ras, atol=1e-12)

    empty = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(InputError, match="'empty' holds no image data"):
        mrml.volume_from_node(empty)
    with pytest.raises(InputError, match="no volume selected"):
        mrml.volume_from_node(None)


# ---- tissue ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reference", ["explicit", "segmentation's reference volume", "stored reference geometry",
                                       "none"])
def test_segmentation_becomes_tissue_aligned_in_ras(mrml_scene, reference):
    reference_node = _reference_node(mrml_scene)
    masks = _tissue_masks()
    segmentation = _segmentation_from_masks(mrml_scene, masks, reference_node)
    if reference in ("segmentation's reference volume", "stored reference geometry"):
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(reference_node)
    if reference == "stored reference geometry":  # as for a segmentation loaded from a .seg.nrrd file
        mrml_scene.RemoveNode(reference_node)
        assert isinstance(mrml.segmentation_reference(segmentation), Geometry)
    nodes_before = mrml_scene.GetNumberOfNodes()

    tissue = mrml.tissue_from_segmentation_node(segmentation, reference_node if reference == "explicit" else None)

    assert mrml_scene.GetNumberOfNodes() == nodes_before, "temporary export nodes must be removed"
    if reference != "none":
        assert tissue.geometry.same_grid(ROTATED_GEOMETRY, tolerance_mm=1e-6)
        np.testing.assert_array_equal(tissue.wm, masks["WM"])
        np.testing.assert_array_equal(tissue.gm, masks["GM"])
        np.testing.assert_array_equal(tissue.csf, masks["CSF"])
    # At known RAS points (voxel centres of the reference), the right tissue, whatever grid was chosen.
    for kji, expected in ((WM_VOXEL, (1.0, 0.0, 0.0)), (GM_VOXEL, (0.0, 1.0, 0.0)), (CSF_VOXEL, (0.0, 0.0, 1.0))):
        assert tissue.fractions_at_ras(_voxel_centre_ras(ROTATED_GEOMETRY, kji)) == expected


def test_segment_names_are_a_mapping_and_missing_segments_are_named(mrml_scene):
    reference_node = _reference_node(mrml_scene)
    masks = _tissue_masks()
    renamed = {"white matter": masks["WM"], "Grey Matter": masks["GM"], "csf": masks["CSF"]}
    segmentation = _segmentation_from_masks(mrml_scene, renamed, reference_node)

    with pytest.raises(InputError) as error:
        mrml.tissue_from_segmentation_node(segmentation, reference_node)
    message = str(error.value)
    assert "'WM'" in message and "'GM'" in message and "'CSF'" not in message.split("(")[0], message
    assert "segments present: 'white matter', 'Grey Matter', 'csf'" in message

    # The mapping picks them up; names match ignoring case.
    tissue = mrml.tissue_from_segmentation_node(segmentation, reference_node,
                                                segment_names={"wm": "White Matter", "gm": "grey matter"})
    np.testing.assert_array_equal(tissue.gm, masks["GM"])
    with pytest.raises(InputError, match="keys must be wm, gm and csf"):
        mrml.tissue_from_segmentation_node(segmentation, reference_node, segment_names={"white": "WM"})


def test_segmentation_that_misses_the_reference_is_a_clear_error(mrml_scene):
    reference_node = _reference_node(mrml_scene)
    segmentation = _segmentation_from_masks(mrml_scene, _tissue_masks(), reference_node)
    far_away = Geometry((5, 5, 5), (1.0, 1.0, 1.0), (500.0, 500.0, 500.0))
    far_node = mrml.volume_to_node(mrml_scene, Volume(np.zeros(far_away.shape_kji, np.float32), far_away), "far")
    with pytest.raises(InputError, match="empty on the reference grid .* overlap"):
        mrml.tissue_from_segmentation_node(segmentation, far_node)
    with pytest.raises(InputError, match="do not overlap the reference grid"):
        mrml.labels_from_segmentation_node(segmentation, far_away, {"WM": 3})


def test_labelmap_and_probability_nodes_become_tissue(mrml_scene):
    masks = _tissue_masks()
    labels = (masks["CSF"] * 5 + masks["GM"] * 6 + masks["WM"] * 7).astype(np.int16)
    labelmap_node = mrml.volume_to_node(mrml_scene, Volume(labels, ROTATED_GEOMETRY), "tissue labels", labelmap=True)
    assert labelmap_node.IsA("vtkMRMLLabelMapVolumeNode")
    tissue = mrml.tissue_from_labelmap_node(labelmap_node, TissueLabels(csf=5, gm=6, wm=7))
    assert tissue.fractions_at_ras(_voxel_centre_ras(ROTATED_GEOMETRY, WM_VOXEL)) == (1.0, 0.0, 0.0)

    probability_nodes = [mrml.volume_to_node(mrml_scene, Volume(masks[n] * 0.5, ROTATED_GEOMETRY), n)
                         for n in ("WM", "GM", "CSF")]
    tissue = mrml.tissue_from_probability_nodes(*probability_nodes)
    assert tissue.fractions_at_ras(_voxel_centre_ras(ROTATED_GEOMETRY, GM_VOXEL)) == (0.0, 0.5, 0.0)
    with pytest.raises(InputError, match="no CSF probability volume"):
        mrml.tissue_from_probability_nodes(probability_nodes[0], probability_nodes[1], None)


def test_tumor_segments_map_to_labels_by_name(mrml_scene):
    reference_node = _reference_node(mrml_scene)
    masks = _tissue_masks()
    tumor = _segmentation_from_masks(mrml_scene, {"Necrotic core": masks["CSF"], "Edema": masks["WM"] | masks["GM"],
                                                  "ET": masks["GM"]}, reference_node, "tumor")
    mapping = mrml.tumor_segment_labels(tumor, labels=(1, 2, 4))
    assert mapping == {"Edema": 2, "Necrotic core": 1, "ET": 4}
    assert list(mapping)[0] == "Edema", "edema first, so core labels win where segments overlap"
    labels = mrml.labels_from_segmentation_node(tumor, ROTATED_GEOMETRY, mapping)
    assert labels.array[WM_VOXEL] == 2 and labels.array[GM_VOXEL] == 4 and labels.array[CSF_VOXEL] == 1

    brats_2023 = _segmentation_from_masks(mrml_scene, {"NETC": masks["CSF"], "SNFH": masks["WM"], "Segment_3":
                                                       masks["GM"]}, reference_node, "tumor 2023")
    assert mrml.tumor_segment_labels(brats_2023) == {"SNFH": 2, "NETC": 1, "Segment_3": 3}
    odd = _segmentation_from_masks(mrml_scene, {"Edema": masks["WM"], "blob": masks["GM"]}, reference_node, "odd")
    with pytest.raises(InputError, match="'blob'"):
        mrml.tumor_segment_labels(odd)


# ---- results -> nodes -----------------------------------------------------------------------------------------------
def _plans():
    masks = _tissue_masks()
    return {"Standard plan (15 mm)": masks["WM"] | masks["GM"], "Model plan (equal volume)": masks["WM"]}


def test_result_nodes_are_replaced_not_piled_up(mrml_scene):
    concentration = Volume(np.linspace(0, 1, np.prod(ROTATED_GEOMETRY.shape_kji), dtype=np.float32).reshape(
        ROTATED_GEOMETRY.shape_kji), ROTATED_GEOMETRY)
    values = {"mu_d_mm": 5.25, "mu_rho": 2.0, "seed_ras_mm": [28.0, -12.0, 24.5], "method": "hybrid",
              "plans": {"standard_cm3": 41.2, "model_cm3": 41.2}, "warnings": []}
    nodes = {}

    def publish(scale):
        nodes["infiltration"] = mrml.volume_to_node(mrml_scene, Volume(concentration.array * scale,
                                                                       ROTATED_GEOMETRY),
                                                    "Tumor infiltration", node=nodes.get("infiltration"))
        mrml.show_as_infiltration(nodes["infiltration"])
        nodes["plans"] = mrml.plans_to_segmentation_node(mrml_scene, _plans(), ROTATED_GEOMETRY, "Target plans",
                                                         node=nodes.get("plans"))
        nodes["seed"] = mrml.seed_to_markups(mrml_scene, np.multiply(values["seed_ras_mm"], scale),
                                             node=nodes.get("seed"))
        nodes["table"] = mrml.table_node_from_dict(mrml_scene, dict(values, mu_d_mm=values["mu_d_mm"] * scale),
                                                   node=nodes.get("table"))

    publish(1.0)
    first = dict(nodes)
    count = mrml_scene.GetNumberOfNodes()
    publish(0.5)
    assert mrml_scene.GetNumberOfNodes() == count
    assert all(nodes[key] is first[key] for key in nodes)

    # Infiltration: replaced data, same geometry, Inferno-like map with low values transparent.
    infiltration = nodes["infiltration"]
    np.testing.assert_allclose(slicer.util.arrayFromVolume(infiltration), concentration.array * 0.5)
    display = infiltration.GetDisplayNode()
    assert display.GetColorNode().GetName() == mrml.INFILTRATION_COLOR_NODE_NAME
    assert display.GetApplyThreshold() and display.GetLowerThreshold() == pytest.approx(
        mrml.INFILTRATION_DISPLAY_THRESHOLD)
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == pytest.approx((0.0, 1.0))
    assert len(slicer.util.getNodes(mrml.INFILTRATION_COLOR_NODE_NAME, useLists=True)
               [mrml.INFILTRATION_COLOR_NODE_NAME]) == 1

    # Seed: one locked point at the new position.
    seed = nodes["seed"]
    assert seed.GetNumberOfControlPoints() == 1 and seed.GetLocked()
    np.testing.assert_allclose(seed.GetNthControlPointPositionWorld(0), np.multiply(values["seed_ras_mm"], 0.5))

    # Table: the flattened values, rewritten.
    table = mrml.dict_from_table_node(nodes["table"])
    assert float(table["mu_d_mm"]) == pytest.approx(5.25 * 0.5)
    assert table["method"] == "hybrid" and table["plans.model_cm3"] == "41.2"
    assert table["seed_ras_mm"] == "28, -12, 24.5" and table["warnings"] == ""
    assert nodes["table"].GetNumberOfRows() == 7


def test_plan_segments_come_back_where_they_were_with_their_volumes(mrml_scene):
    plans = _plans()
    node = mrml.plans_to_segmentation_node(mrml_scene, plans, ROTATED_GEOMETRY, "Target plans")
    assert mrml.segment_names(node) == list(plans)
    voxel_cm3 = ROTATED_GEOMETRY.voxel_volume_mm3() / 1000.0
    for name, mask in plans.items():
        assert mrml.plan_volume_cm3(node, name) == pytest.approx(mask.sum() * voxel_cm3, abs=1e-3)
        back = mrml.labels_from_segmentation_node(node, ROTATED_GEOMETRY, {name: 1})
        np.testing.assert_array_equal(back.array, mask)
    # A re-run with one plan fewer drops the other segment.
    mrml.plans_to_segmentation_node(mrml_scene, {"Model plan (equal volume)": plans["Model plan (equal volume)"]},
                                    ROTATED_GEOMETRY, "Target plans", node=node)
    assert mrml.segment_names(node) == ["Model plan (equal volume)"]


def test_outputs_go_beside_the_input_in_the_subject_hierarchy(mrml_scene):
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(mrml_scene)
    study = hierarchy.CreateStudyItem(hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "patient"), "study")
    tumor = _reference_node(mrml_scene, name="tumor")
    hierarchy.CreateItem(study, tumor)
    output = mrml.seed_to_markups(mrml_scene, (1.0, 2.0, 3.0))
    mrml.place_beside(output, tumor)
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(output)) == study


def test_the_model_tissue_comes_back_with_the_refilled_lesion_outlined(mrml_scene):
    masks = _tissue_masks()
    shape = ROTATED_GEOMETRY.shape_kji
    tissue = Tissue(masks["WM"], masks["GM"], masks["CSF"], ROTATED_GEOMETRY)
    lesion = np.zeros(shape, bool)
    lesion[1:3, 1:3, 1:3] = True
    node = mrml.model_tissue_to_segmentation_node(mrml_scene, tissue, lesion, "Tumor model tissue")
    assert mrml.segment_names(node) == ["WM", "GM", "CSF", "Refilled lesion"]
    for name, mask in (("WM", masks["WM"]), ("Refilled lesion", lesion)):
        back = mrml.labels_from_segmentation_node(node, ROTATED_GEOMETRY, {name: 1})
        np.testing.assert_array_equal(back.array, mask)
    display = node.GetDisplayNode()
    lesion_id = node.GetSegmentation().GetSegmentIdBySegmentName("Refilled lesion")
    assert not display.GetSegmentVisibility2DFill(lesion_id) and display.GetSegmentVisibility2DOutline(lesion_id)
    # Without a lesion (tissue derived from a T1 keeps none), the segment is not there.
    again = mrml.model_tissue_to_segmentation_node(mrml_scene, tissue, None, "Tumor model tissue", node=node)
    assert again is node and mrml.segment_names(node) == ["WM", "GM", "CSF"]
