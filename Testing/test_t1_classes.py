"""Tissue classes from a T1's intensities with a registered atlas as the prior (t1_classes.classify_t1): a prior
that is off by a few millimetres is corrected by the intensities, a bias field does not change the classes, the
lesion keeps the prior's tissue (its CSF only in the deep brain), no tissue lies outside the foreground, and an
image whose intensities are not a T1's leaves the prior unchanged with a warning."""
import numpy as np
import pytest

from TumorPersonalizationLib.atlas import load_atlas
from TumorPersonalizationLib.metrics import dice
from TumorPersonalizationLib.t1_classes import LESION_CSF_DEPTH_MM, classify_t1
from TumorPersonalizationLib.tissue import Tissue

INTENSITY = {"wm": 0.85, "gm": 0.55, "csf": 0.2}


@pytest.fixture(scope="module")
def brain():
    return load_atlas(2)


def t1_of(tissue: Tissue, rng, bias_amplitude=0.0, noise=0.02, intensity=INTENSITY):
    """Partial-volume class intensities, times a linear bias ramp along i of +/- bias_amplitude, plus noise."""
    t1 = sum(value * getattr(tissue, name).astype(np.float64) for name, value in intensity.items())
    ramp = np.linspace(-1.0, 1.0, tissue.geometry.shape_kji[2])[None, None, :]
    t1 = t1 * (1.0 + bias_amplitude * ramp) + rng.normal(0.0, noise, t1.shape)
    foreground = (tissue.wm + tissue.gm + tissue.csf) >= 0.5
    return np.where(foreground, np.maximum(t1, 0.0), 0.0), foreground


def shifted(tissue: Tissue, voxels: int) -> Tissue:
    """The tissue moved by `voxels` along i and k: a prior 2-3 voxels (4-6 mm) off, as a coarse registration leaves."""
    return Tissue(*[np.roll(getattr(tissue, n), (voxels, voxels), axis=(0, 2)) for n in ("wm", "gm", "csf")],
                  tissue.geometry)


def wm_dice(tissue: Tissue, truth: Tissue, mask) -> float:
    return dice((tissue.wm >= 0.5) & mask, (truth.wm >= 0.5) & mask)


@pytest.mark.parametrize("bias_amplitude", [0.0, 0.2])
def test_intensities_correct_a_prior_that_is_off(brain, bias_amplitude):
    rng = np.random.default_rng(3)
    t1, foreground = t1_of(brain, rng, bias_amplitude)
    prior = shifted(brain, 2)
    no_lesion = np.zeros(foreground.shape, bool)
    result = classify_t1(t1, prior, foreground, no_lesion)
    assert result.used and not result.warnings
    assert wm_dice(prior, brain, foreground) < 0.75
    assert wm_dice(result.tissue, brain, foreground) >= 0.9
    assert dice((result.tissue.gm >= 0.5) & foreground, (brain.gm >= 0.5) & foreground) >= 0.8
    assert result.means["csf"] < result.means["gm"] < result.means["wm"]
    assert result.changed_cm3 > 50.0
    outside = ~foreground
    assert not np.any(result.tissue.wm[outside]) and not np.any(result.tissue.csf[outside])
    total = result.tissue.wm + result.tissue.gm + result.tissue.csf
    np.testing.assert_allclose(total[foreground], 1.0, atol=1e-5)


def test_lesion_keeps_the_priors_tissue_and_its_deep_csf_only(brain):
    """A lesion whose T1 is a dark core (CSF-like): outside it the intensities decide, inside it the prior's WM:GM
    mix stays, with its CSF only deeper than LESION_CSF_DEPTH_MM below the brain's surface."""
    from scipy.ndimage import distance_transform_edt

    rng = np.random.default_rng(4)
    t1, foreground = t1_of(brain, rng)
    shape = foreground.shape
    k, j, i = np.indices(shape)
    centre = np.array(shape) // 2
    lesion = ((k - centre[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2] - 26) ** 2) <= 12 ** 2
    lesion &= foreground
    t1[lesion] = INTENSITY["csf"]
    result = classify_t1(t1, brain, foreground, lesion)
    tissue = result.tissue
    depth = distance_transform_edt(foreground, sampling=brain.geometry.spacing_kji_mm)
    deep, shallow = lesion & (depth > LESION_CSF_DEPTH_MM), lesion & (depth <= LESION_CSF_DEPTH_MM)
    assert deep.any() and shallow.any() and (brain.csf[shallow] > 0.2).any()
    assert not np.any(tissue.csf[shallow])
    prior_total = brain.wm + brain.gm + brain.csf
    np.testing.assert_allclose(tissue.csf[deep], (brain.csf / np.maximum(prior_total, 1e-6))[deep], atol=1e-5)
    # The lesion's dark intensities did not turn it into CSF: its WM and GM are the prior's, not the intensity's.
    assert tissue.wm[lesion].mean() == pytest.approx((brain.wm / np.maximum(prior_total, 1e-6))[lesion].mean(),
                                                     abs=0.05)
    assert (tissue.wm[lesion] + tissue.gm[lesion]).mean() > 0.7


def test_an_image_that_is_not_a_t1_leaves_the_prior_unchanged_with_a_warning(brain):
    """A T2-like image (CSF brightest, WM darkest) fails the class-order check."""
    rng = np.random.default_rng(5)
    t2, foreground = t1_of(brain, rng, intensity={"wm": 0.3, "gm": 0.45, "csf": 0.9})
    prior = shifted(brain, 2)
    result = classify_t1(t2, prior, foreground, np.zeros(foreground.shape, bool))
    assert not result.used and result.tissue is prior
    assert len(result.warnings) == 1 and "do not separate CSF, GM and WM" in result.warnings[0]


def test_shape_mismatch_is_refused(brain):
    with pytest.raises(ValueError, match="t1_scaled has shape"):
        classify_t1(np.zeros((3, 3, 3)), brain, np.zeros(brain.geometry.shape_kji, bool),
                    np.zeros(brain.geometry.shape_kji, bool))
