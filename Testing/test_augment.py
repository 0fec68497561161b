"""Anatomical augmentation: deformed tissue stays a tissue, is a function of its seed, and a known point
lands where the transform says."""
import numpy as np

from TumorPersonalizationLib.offline.augment import (DeformationPrior, border_noise, deform_tissue, random_deformation,
                                             random_rotation)

from conftest import heterogeneous_tissue, make_tissue


def test_deformed_fractions_stay_fractions_and_sum_to_at_most_one():
    tissue = heterogeneous_tissue(shape=(24, 26, 28))
    deformation = random_deformation(np.random.default_rng(3), tissue.geometry,
                                     DeformationPrior(displacement_mm=2.0, smoothness_mm=6.0))
    deformed = border_noise(deform_tissue(tissue, deformation), np.random.default_rng(4))
    stack = np.stack([deformed.wm, deformed.gm, deformed.csf])
    assert stack.min() >= 0.0 and stack.max() <= 1.0
    assert stack.sum(axis=0).max() <= 1.0 + 1e-6
    assert not np.allclose(deformed.wm, tissue.wm)  # it did deform


def test_deformation_is_deterministic_under_its_seed():
    tissue = heterogeneous_tissue(shape=(20, 20, 20))
    a = deform_tissue(tissue, random_deformation(np.random.default_rng(7), tissue.geometry))
    b = deform_tissue(tissue, random_deformation(np.random.default_rng(7), tissue.geometry))
    c = deform_tissue(tissue, random_deformation(np.random.default_rng(8), tissue.geometry))
    assert np.array_equal(a.wm, b.wm) and np.array_equal(a.gm, b.gm)
    assert not np.array_equal(a.wm, c.wm)


def test_a_known_point_lands_where_the_transform_says():
    """A small white-matter blob at atlas point p appears, in the deformed brain, around deformed_point(p)."""
    shape = (40, 40, 40)
    tissue = make_tissue(np.zeros(shape), gm=np.ones(shape), spacing=(2.0, 2.0, 2.0), origin=(-39.0, -39.0, -39.0))
    radius = np.linalg.norm(tissue.geometry.ras_grid() - np.array([12.0, -8.0, 6.0]), axis=-1)
    blob = np.clip(4.0 - radius, 0.0, 1.0).astype(np.float32)
    tissue = make_tissue(blob, gm=1.0 - blob, spacing=(2.0, 2.0, 2.0), origin=(-39.0, -39.0, -39.0))
    rng = np.random.default_rng(11)
    for prior in (DeformationPrior(displacement_mm=0.0), DeformationPrior(displacement_mm=2.0, smoothness_mm=15.0)):
        deformation = random_deformation(rng, tissue.geometry, prior)
        deformed = deform_tissue(tissue, deformation)
        weights = deformed.wm
        centre = (tissue.geometry.ras_grid() * weights[..., None]).sum(axis=(0, 1, 2)) / weights.sum()
        expected = deformation.deformed_point(np.array([12.0, -8.0, 6.0]))
        assert np.linalg.norm(centre - expected) < 1.0, (centre, expected)
        assert np.linalg.norm(deformation.atlas_points(expected) - [12.0, -8.0, 6.0]) < 0.05


def test_random_rotation_is_a_rotation_within_its_bound():
    rng = np.random.default_rng(0)
    for _ in range(20):
        rotation = random_rotation(rng, 15.0)
        assert np.allclose(rotation.T @ rotation, np.eye(3), atol=1e-12) and np.linalg.det(rotation) > 0
        angle = np.degrees(np.arccos(np.clip((np.trace(rotation) - 1) / 2, -1, 1)))
        assert angle <= 15.0 + 1e-9


# ---- per-sample anatomy of a dataset -------------------------------------------------------------------------------
def test_anatomy_off_draws_nothing_so_the_first_datasets_reproduce():
    from TumorPersonalizationLib.offline.augment import AnatomyPrior, draw_anatomy

    rng = np.random.default_rng(5)
    draw = draw_anatomy(rng, AnatomyPrior())
    assert rng.uniform() == np.random.default_rng(5).uniform()  # the stream was not touched
    assert not draw.deformed and not draw.oblique and draw.noise_seed == -1 and not draw.crop_jitter_mm.any()


def test_shifted_test_set_draws_no_training_anatomy():
    """Checked on what was drawn (deformation matrices, rotation angles), not on the random streams: even with the
    same seed position and flags for every sample, no shifted sample matches a training one."""
    from TumorPersonalizationLib.offline.augment import draw_anatomy, shared_samples
    from TumorPersonalizationLib.offline.dataset import RECIPES

    def records(recipe, stream, n):
        rng = np.random.default_rng(stream)
        draws = [draw_anatomy(rng, RECIPES[recipe]["anatomy"]) for _ in range(n)]
        fields = [d.record() for d in draws]
        out = {k: np.stack([f[k] for f in fields]) for k in fields[0]}
        out.update(seed_ras_mm=np.zeros((n, 3)), mirrored=np.zeros(n, np.int8), hard_labels=np.zeros(n, np.int8))
        return draws, out

    train_draws, train = records("anatomy", 0, 400)
    shifted_draws, shifted = records("shifted", 0, 200)  # even the same random stream
    assert all(d.deformed for d in shifted_draws) and min(d.rotation_deg for d in shifted_draws) >= 15.0
    assert max(d.rotation_deg for d in train_draws if d.deformed) <= 15.0
    assert 0.6 < np.mean([d.deformed for d in train_draws]) < 0.95
    assert 0.3 < np.mean([d.oblique for d in shifted_draws]) < 0.7
    assert shared_samples(shifted, train) == []
    # The check does find shared samples: the undeformed training samples all match each other here.
    undeformed = [i for i, d in enumerate(train_draws) if not d.deformed]
    assert (undeformed[0], undeformed[1]) in shared_samples(train, train)


def test_applied_anatomy_keeps_fractions_and_hard_labels_stay_hard():
    from TumorPersonalizationLib.offline.augment import AnatomyPrior, apply_anatomy, draw_anatomy
    from TumorPersonalizationLib.tissue import Tissue

    soft = heterogeneous_tissue(shape=(24, 26, 28))
    hard = Tissue.from_labelmap(soft.volume(soft.labelmap()))
    prior = AnatomyPrior(deformation_probability=1.0, displacement_mm=2.0, smoothness_mm=6.0,
                         border_noise_probability=1.0, oblique_probability=1.0, oblique_spacing_mm=(0.9, 0.9, 3.0))
    rng = np.random.default_rng(2)
    for tissue, is_hard in ((soft, False), (hard, True)):
        draw = draw_anatomy(rng, prior, soft=not is_hard)
        assert draw.deformed and draw.oblique and (draw.noise_seed >= 0) == (not is_hard)
        out = apply_anatomy(tissue, draw, prior, hard_labels=is_hard)
        assert out.geometry.same_grid(tissue.geometry)
        stack = np.stack([out.wm, out.gm, out.csf])
        assert stack.min() >= 0.0 and stack.sum(axis=0).max() <= 1.0 + 1e-6
        assert not np.allclose(out.wm, tissue.wm)
        again = apply_anatomy(tissue, draw, prior, hard_labels=is_hard)  # a function of the draw
        assert np.array_equal(again.wm, out.wm)


def test_oblique_grid_covers_the_image_with_thick_rotated_slices():
    from TumorPersonalizationLib.offline.augment import oblique_geometry, random_rotation

    tissue = heterogeneous_tissue(shape=(20, 22, 24))
    rotation = random_rotation(np.random.default_rng(1), 20.0)
    scan = oblique_geometry(tissue.geometry, rotation, (0.9, 0.9, 3.0))
    assert scan.spacing_ijk_mm == (0.9, 0.9, 3.0)
    np.testing.assert_allclose(scan.direction_ras, rotation @ tissue.geometry.direction_ras, atol=1e-12)
    corners = tissue.geometry.index_kji_to_ras(np.array([[0, 0, 0], [19, 21, 23], [0, 21, 0], [19, 0, 23]], float))
    index = scan.ras_to_index_kji(corners)
    assert np.all(index >= -0.5) and np.all(index <= np.asarray(scan.shape_kji) - 0.5)
