"""Geometry (index <-> RAS), tissue loading, resampling, cropping and the bundled atlas."""
import numpy as np
import pytest
import SimpleITK as sitk

from conftest import make_tissue
from TumorPersonalizationLib import InputError, Tissue, TissueLabels
from TumorPersonalizationLib.atlas import load_atlas
from TumorPersonalizationLib.geometry import Geometry, Volume


def _rotation(axis, angle_deg):
    a = np.deg2rad(angle_deg)
    c, s = np.cos(a), np.sin(a)
    m = {"x": [[1, 0, 0], [0, c, -s], [0, s, c]], "z": [[c, -s, 0], [s, c, 0], [0, 0, 1]]}[axis]
    return np.asarray(m)


def _rotated_labelmap(tmp_path):
    labels = np.zeros((9, 14, 11), np.uint8)
    labels[2:7, 3:11, 2:9] = 2
    labels[3:6, 5:9, 4:7] = 3
    labels[4, 7, 5] = 1
    image = sitk.GetImageFromArray(labels)
    image.SetSpacing((0.8, 1.1, 2.5))
    image.SetOrigin((12.0, -30.0, 7.5))
    direction_lps = _rotation("z", 30) @ _rotation("x", -20)
    image.SetDirection(tuple(direction_lps.ravel()))
    path = tmp_path / "rotated.nii.gz"
    sitk.WriteImage(image, str(path))
    return path, image


def test_ras_matches_itk_physical_points_of_rotated_anisotropic_image(tmp_path):
    path, _ = _rotated_labelmap(tmp_path)
    tissue = Tissue.from_file(path)
    reread = sitk.ReadImage(str(path))  # NIfTI stores the geometry in float32: compare with what was stored
    rng = np.random.default_rng(0)
    for _ in range(20):
        kji = rng.uniform(-1, 10, 3)
        lps = np.asarray(reread.TransformContinuousIndexToPhysicalPoint(tuple(float(x) for x in kji[::-1])))
        ras = tissue.geometry.index_kji_to_ras(kji)
        np.testing.assert_allclose(ras, lps * [-1, -1, 1], atol=1e-4)
        np.testing.assert_allclose(tissue.geometry.ras_to_index_kji(ras), kji, atol=1e-6)
    assert tissue.geometry.spacing_kji_mm == pytest.approx((2.5, 1.1, 0.8))


def test_volume_written_and_read_back_keeps_geometry(tmp_path):
    path, _ = _rotated_labelmap(tmp_path)
    tissue = Tissue.from_file(path)
    volume = Volume(tissue.wm * 0.5, tissue.geometry)
    for suffix in (".nii.gz", ".nrrd", ".mha"):
        out = tmp_path / f"c{suffix}"
        volume.save(out)
        back = Volume.load(out)
        assert back.geometry.same_grid(tissue.geometry, tolerance_mm=1e-4)
        np.testing.assert_allclose(back.array, volume.array)


def test_labelmap_labels_are_options():
    labels = np.zeros((4, 5, 6), np.int16)
    labels[1:3, 1:4, 1:5] = 7
    labels[2, 2, 2] = 9
    labels[0, 0, 0] = 8
    volume = Volume(labels, Geometry(labels.shape, (1, 1, 1), (0, 0, 0)))
    tissue = Tissue.from_labelmap(volume, TissueLabels(csf=8, gm=7, wm=9))
    assert tissue.wm.sum() == 1 and tissue.gm.sum() == 23 and tissue.csf.sum() == 1
    with pytest.raises(InputError, match="no WM"):
        Tissue.from_labelmap(volume)


def test_probability_maps_and_multicomponent_file(tmp_path):
    rng = np.random.default_rng(1)
    wm = rng.uniform(0, 0.5, (5, 6, 7)).astype(np.float32)
    gm = rng.uniform(0, 0.5, (5, 6, 7)).astype(np.float32)
    csf = (1 - wm - gm).astype(np.float32)
    geometry = Geometry(wm.shape, (1.2, 1.0, 0.9), (1, 2, 3))
    tissue = Tissue.from_probabilities(*(Volume(a, geometry) for a in (wm, gm, csf)))
    np.testing.assert_allclose(tissue.gm, gm)
    stacked = sitk.GetImageFromArray(np.stack([wm, gm, csf], -1), isVector=True)
    geometry.apply_to_sitk(stacked)
    sitk.WriteImage(stacked, str(tmp_path / "fractions.nii.gz"))
    loaded = Tissue.from_file(tmp_path / "fractions.nii.gz")
    np.testing.assert_allclose(loaded.csf, csf, atol=1e-6)
    assert loaded.geometry.same_grid(geometry)


def test_bad_tissue_inputs_are_refused():
    geometry = Geometry((3, 3, 3), (1, 1, 1), (0, 0, 0))
    nan_map = np.full((3, 3, 3), 0.5, np.float32)
    nan_map[1, 1, 1] = np.nan
    with pytest.raises(InputError, match="NaN"):
        Tissue(nan_map, np.zeros_like(nan_map), np.zeros_like(nan_map), geometry)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        Tissue(np.full((3, 3, 3), 2.0), np.zeros((3, 3, 3)), np.zeros((3, 3, 3)), geometry)
    other = Geometry((3, 3, 4), (1, 1, 1), (0, 0, 0))
    with pytest.raises(InputError, match="does not match"):
        Tissue.from_probabilities(Volume(np.zeros((3, 3, 3), np.float32), geometry),
                                  Volume(np.zeros((3, 3, 4), np.float32), other),
                                  Volume(np.zeros((3, 3, 3), np.float32), geometry))


def test_resample_block_average_and_crop_cube():
    wm = np.zeros((8, 8, 8), np.float32)
    wm[:4] = 1.0
    tissue = make_tissue(wm, spacing=(1, 1, 1), origin=(10, 20, 30))
    coarse = tissue.resample(2.0)
    assert coarse.geometry.shape_kji == (4, 4, 4)
    assert coarse.wm.sum() * 8 == pytest.approx(wm.sum())  # area averaging keeps the amount of tissue
    # Same physical extent: the coarse voxel (0,0,0) centre sits between the first two fine centres.
    np.testing.assert_allclose(coarse.geometry.index_kji_to_ras((0, 0, 0)), [10.5, 20.5, 30.5])
    cube = tissue.crop_cube(tissue.geometry.index_kji_to_ras((1, 4, 4)), 6.0)
    assert cube.geometry.shape_kji == (6, 6, 6)
    assert cube.wm[:2].sum() == 0  # outside the image: background
    np.testing.assert_allclose(cube.geometry.index_kji_to_ras((3, 3, 3)), tissue.geometry.index_kji_to_ras((1, 4, 4)))


def test_block_mean_is_the_mean_of_each_block():
    """The strided sums equal a reshape's mean (float32 rounding), for unequal factors, odd leftovers cut off."""
    from TumorPersonalizationLib.geometry import block_mean, resample_fraction

    rng = np.random.default_rng(3)
    for shape, factors in (((8, 6, 10), (2, 2, 2)), ((10, 7, 9), (3, 1, 2)), ((4, 4, 4), (1, 1, 1)),
                           ((6, 6, 6), (3, 3, 3))):
        array = rng.random(shape)
        blocks = tuple(n // f for n, f in zip(shape, factors))
        cut = array[:blocks[0] * factors[0], :blocks[1] * factors[1], :blocks[2] * factors[2]]
        expected = cut.reshape(blocks[0], factors[0], blocks[1], factors[1], blocks[2], factors[2]).mean(axis=(1, 3, 5))
        result = block_mean(array, factors, blocks)
        assert result.dtype == np.float32 and result.shape == blocks
        np.testing.assert_allclose(result, expected, rtol=0, atol=1e-6)
        # The reference path (the surrogate frame's, which made the training data) is the reshape mean to the bit.
        source = Geometry(shape, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
        target = source.with_spacing(tuple(float(f) for f in factors[::-1]))
        assert target.shape_kji == blocks
        np.testing.assert_allclose(resample_fraction(array, source, target), expected, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(resample_fraction(array, source, target, reference_mean=True),
                                      cut.astype(np.float32).reshape(expected.shape[0], factors[0], expected.shape[1],
                                                                     factors[1], expected.shape[2], factors[2])
                                      .mean(axis=(1, 3, 5)))
    constant = np.full((6, 6, 6), 0.7, np.float32)  # a block of equal values keeps its value
    np.testing.assert_array_equal(block_mean(constant, (3, 3, 3), (2, 2, 2)), np.full((2, 2, 2), 0.7, np.float32))
    with pytest.raises(ValueError, match="do not fit"):
        block_mean(np.zeros((1, 4, 4)), (2, 2, 2), (1, 2, 2))


def test_mask_box_is_the_bounding_box_grown_and_clipped():
    from TumorPersonalizationLib.geometry import mask_box

    mask = np.zeros((6, 7, 8), bool)
    mask[1, 2:4, 5] = True
    assert mask_box(mask) == (slice(1, 2), slice(2, 4), slice(5, 6))
    assert mask_box(mask, 2) == (slice(0, 4), slice(0, 6), slice(3, 8))  # clipped at both ends
    assert mask_box(mask, [0, 1, 3]) == (slice(1, 2), slice(1, 5), slice(2, 8))


def test_mirroring_swaps_hemispheres():
    wm = np.zeros((2, 2, 6), np.float32)
    wm[..., :2] = 1.0
    tissue = make_tissue(wm)
    mirrored = tissue.mirrored_left_right()
    assert mirrored.wm[..., -2:].sum() == 8 and mirrored.wm[..., :2].sum() == 0


def test_bundled_atlas_is_plausible_adult_brain():
    atlas1, atlas2 = load_atlas(1), load_atlas(2)
    assert atlas1.geometry.spacing_ijk_mm == (1.0, 1.0, 1.0)
    volumes = {name: getattr(atlas1, name).sum() / 1000.0 for name in ("wm", "gm", "csf")}
    assert 400 < volumes["wm"] < 900 and 600 < volumes["gm"] < 1200 and 100 < volumes["csf"] < 400, volumes
    assert np.all(atlas1.wm + atlas1.gm + atlas1.csf <= 1.0 + 2 / 255)
    # Ventricles are CSF: MNI (+/-15, -15, 20) mm lies in the lateral ventricles' bodies.
    assert (atlas1.fractions_at_ras((-16.0, -20.0, 22.0))[2] > 0.5
            or atlas1.fractions_at_ras((16.0, -20.0, 22.0))[2] > 0.5)
    # 2 mm is the block average of 1 mm (up to 8-bit rounding).
    np.testing.assert_allclose(atlas1.resample(2.0).wm, atlas2.wm, atol=1.5 / 255)
    assert atlas2.geometry.same_grid(atlas1.geometry.with_spacing(2.0))


def test_oblique_anisotropic_tissue_resamples_to_a_working_grid_without_tripping_the_fraction_check():
    """A hard-label brain on an oblique 0.9 x 0.9 x 3 mm grid, as a clinical scan gives it: resampling it to the 2 mm
    working grid (Gaussian pre-filter + linear) once overshot to -0.0024 and the Tissue check refused its own output."""
    from TumorPersonalizationLib.geometry import Geometry
    from TumorPersonalizationLib.tissue import Tissue

    angle = np.deg2rad(17.0)
    direction = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(angle), -np.sin(angle)], [0.0, np.sin(angle), np.cos(angle)]])
    geometry = Geometry((16, 90, 90), (0.9, 0.9, 3.0), (-40.0, -40.0, -24.0), direction)
    radius = np.linalg.norm(geometry.ras_grid() - geometry.index_kji_to_ras((7.5, 44.5, 44.5)), axis=-1)
    labels = np.where(radius < 20, 3, np.where(radius < 28, 2, np.where(radius < 32, 1, 0))).astype(np.uint8)
    tissue = Tissue.from_labelmap(Volume(labels, geometry))
    work = tissue.resample(2.0)
    for fractions in (work.wm, work.gm, work.csf):
        assert fractions.min() >= 0.0 and fractions.max() <= 1.0
    assert work.geometry.spacing_ijk_mm == (2.0, 2.0, 2.0)
    assert abs(work.wm.sum() * 8.0 - tissue.wm.sum() * 0.9 * 0.9 * 3.0) / (tissue.wm.sum() * 2.43) < 0.05
