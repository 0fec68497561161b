"""Clinical target plans: the 15 mm margin is measured in mm on any grid, the model plan has the standard plan's
volume, ties go to the voxels nearest the tumor, the brain's holes count as brain."""
import numpy as np

from conftest import make_tissue
from TumorPersonalizationLib.geometry import Geometry
from TumorPersonalizationLib.plans import (blurred_label_scores, coverage, make_plans, model_plan,
                                           planning_brain_mask, standard_plan)


def anisotropic_brain():
    """Brain everywhere on a rotated grid with 1 x 2 x 3 mm voxels (i, j, k)."""
    angle = np.deg2rad(25.0)
    direction = np.array([[np.cos(angle), 0.0, np.sin(angle)], [0.0, 1.0, 0.0], [-np.sin(angle), 0.0, np.cos(angle)]])
    shape_kji = (24, 36, 70)
    return make_tissue(np.ones(shape_kji), spacing=(1.0, 2.0, 3.0), direction=direction)


def test_standard_plan_is_the_15_mm_margin_measured_in_mm_on_an_anisotropic_grid():
    tissue = anisotropic_brain()
    core = np.zeros(tissue.geometry.shape_kji, bool)
    core[12, 18, 30:34] = True
    plan = standard_plan(core, tissue.brain_mask, tissue.geometry, 15.0)
    # Brute force in RAS mm: every voxel centre within 15 mm of a core voxel centre.
    ras = tissue.geometry.ras_grid().reshape(-1, 3)
    core_ras = ras[core.ravel()]
    nearest = np.min(np.linalg.norm(ras[:, None, :] - core_ras[None, :, :], axis=-1), axis=1)
    expected = (nearest <= 15.0 + 1e-6).reshape(core.shape)
    assert plan.sum() > 1000
    assert np.array_equal(plan, expected)
    # In voxels the margin is 15 along i, 7.5 along j and 5 along k: an index-space dilation would be wrong.
    assert plan[12, 18, 30 - 15] and not plan[12, 18, 30 - 16]
    assert plan[12, 18 + 7, 31] and not plan[12, 18 + 8, 31]
    assert plan[12 + 5, 18, 31] and not plan[12 + 6, 18, 31]


def test_model_plan_has_the_standard_volume_and_takes_the_highest_concentration():
    tissue = anisotropic_brain()
    rng = np.random.default_rng(0)
    concentration = rng.uniform(0, 1, tissue.geometry.shape_kji).astype(np.float32)
    core = np.zeros(tissue.geometry.shape_kji, bool)
    core[10:14, 15:20, 25:35] = True
    plans = make_plans(tissue, concentration, core, iso_level=0.9)
    assert plans.standard.sum() == plans.model.sum() > 0
    assert plans.volumes_cm3["standard_cm3"] == plans.volumes_cm3["model_cm3"]
    threshold = np.sort(concentration.ravel())[-int(plans.model.sum())]
    assert concentration[plans.model > 0].min() >= threshold
    assert np.array_equal(plans.iso > 0, concentration >= 0.9)


def test_ties_go_to_the_voxels_nearest_the_tumor():
    """A map that is zero beyond the tumor (a narrow front, a float16 map): the rest of the plan's volume is taken
    next to the tumor, not from the first slices of the image."""
    tissue = make_tissue(np.ones((30, 30, 30)), spacing=(2.0, 2.0, 2.0))
    tumor = np.zeros(tissue.geometry.shape_kji, bool)
    tumor[20:24, 20:24, 20:24] = True
    concentration = tumor.astype(np.float32)
    from TumorPersonalizationLib.plans import distance_mm

    distance = distance_mm(tumor, tissue.geometry)
    plan = model_plan(concentration, tissue.brain_mask, 500, distance)
    assert plan.sum() == 500 and plan[tumor].all()
    assert distance[plan].max() <= 6.0 + 1e-6  # a shell around the tumor, nothing far away
    assert not plan[:10].any()


def test_planning_brain_fills_enclosed_holes_and_blurred_scores_reach_past_12_mm():
    wm = np.ones((20, 20, 20), np.float32)
    wm[8:12, 8:12, 8:12] = 0.0  # a ventricle: CSF enclosed by brain
    tissue = make_tissue(wm, csf=1.0 - wm)
    assert planning_brain_mask(tissue.wm, tissue.gm)[10, 10, 10]
    visible = np.zeros((40, 1, 1), np.float32)
    visible[:2] = 1.0
    geometry = Geometry((40, 1, 1), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    scores = blurred_label_scores(visible, visible * 0, geometry)[:, 0, 0]
    assert scores[1 + 14] > 0  # 14 mm from the labels: still ranked, not a tie at zero


def test_planning_brain_filled_in_its_box_equals_filling_the_whole_image():
    """The hole filling runs in the brain's bounding box: same mask as on the whole image, for random brains that
    touch the image's faces or keep away from some, with holes open to the outside or enclosed."""
    from scipy.ndimage import binary_fill_holes, gaussian_filter

    rng = np.random.default_rng(4)
    for trial in range(6):
        noise = gaussian_filter(rng.random((24, 20, 22)), 1.5)
        wm = (noise > np.quantile(noise, 0.2)).astype(np.float32)  # scattered background, some of it enclosed
        wm[10:14, 8:12, 9:13] = 1.0
        wm[11:13, 9:11, 10:12] = 0.0  # and one enclosed for sure
        if trial % 2:
            wm[:, :2] = 0.0  # a brain that keeps away from one pair of faces
            wm[:, -2:] = 0.0
        gm = np.zeros_like(wm)
        expected = binary_fill_holes(wm >= 0.1)
        assert expected.sum() > (wm >= 0.1).sum()  # there are holes to fill
        np.testing.assert_array_equal(planning_brain_mask(wm, gm), expected)
    assert not planning_brain_mask(np.zeros((4, 4, 4)), np.zeros((4, 4, 4))).any()


def test_coverage_is_the_share_of_growth_inside_the_plan():
    growth = np.zeros((4, 4, 4), bool)
    growth[0, 0, :] = True
    plan = np.zeros_like(growth)
    plan[0, 0, :3] = True
    assert coverage(plan, growth) == 0.75
    assert np.isnan(coverage(plan, np.zeros_like(growth)))


def test_boxed_distance_and_partitioned_plan_equal_the_whole_grid_versions():
    """The speed-ups (distance transform in the tumor's box, plan edge by partition among the positive values, tie
    distances only where tied)
    give what the plain versions give: the same distances up to the margin, the same plan."""
    from TumorPersonalizationLib.plans import distance_mm

    tissue = anisotropic_brain()
    geometry = tissue.geometry
    tumor = np.zeros(geometry.shape_kji, bool)
    tumor[10:13, 15:19, 28:36] = True
    full = distance_mm(tumor, geometry)
    boxed = distance_mm(tumor, geometry, max_mm=15.0)
    near = full <= 15.0
    assert np.isinf(boxed).any() and np.all(boxed[~np.isinf(boxed)] >= 0)
    np.testing.assert_allclose(boxed[near], full[near])
    assert np.all(boxed[~near] > 15.0)
    # A map that is zero over most of the brain: a plan larger than its support is filled by distance.
    concentration = np.where(full <= 4.0, np.exp(-full / 3.0), 0.0).astype(np.float32)
    voxels = int((full <= 9.0).sum())
    reference = np.zeros(concentration.size, bool)
    reference[np.lexsort((full.ravel(), -concentration.astype(np.float64).ravel()))[:voxels]] = True
    lazy = model_plan(concentration, tissue.brain_mask, voxels, lambda tied: distance_mm(tumor, geometry, where=tied))
    assert lazy.sum() == voxels
    np.testing.assert_array_equal(lazy.ravel(), reference)
    np.testing.assert_array_equal(model_plan(concentration, tissue.brain_mask, voxels, full), lazy)
    # A plan inside the support: its edge is found among the positive values only, the same plan.
    voxels = int((full <= 2.0).sum()) + 7
    assert voxels < np.count_nonzero(concentration[tissue.brain_mask])
    reference = np.zeros(concentration.size, bool)
    reference[np.lexsort((full.ravel(), -concentration.astype(np.float64).ravel()))[:voxels]] = True
    np.testing.assert_array_equal(model_plan(concentration, tissue.brain_mask, voxels, full).ravel(), reference)
