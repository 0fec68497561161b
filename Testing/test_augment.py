"""Anatomical augmentation (issue 9): deformed tissue stays a tissue, is a function of its seed, and a known point
lands where the transform says."""
import numpy as np

from TumorPersonalizationLib.augment import (DeformationPrior, border_noise, deform_tissue, random_deformation,
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
