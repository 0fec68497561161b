"""WM/GM/CSF of a patient's brain from the T1's own intensities, the registered atlas as the prior.

The atlas registered to a T1 places tissue only as well as its deformation reaches (a B-spline on a 40 mm control
grid): the patient's own gyri, sulci and ventricles are where the atlas has them, and on a brain unlike the atlas a
tumor model grown on that tissue spreads along the atlas's white matter, not the patient's. The T1 itself shows the
classes: white matter brightest, grey matter darker, CSF darkest. classify_t1 fits a three-class Gaussian mixture to
the T1's intensities inside the brain, each voxel's class prior being the registered atlas's fractions softened
towards uniform (so the intensities decide wherever they are clear and the atlas where they are not, at partial
volume), with a smooth multiplicative bias field, and uses each voxel's posterior class probabilities as its
fractions: the model of SPM's unified segmentation and FSL FAST, in its simplest form. Inside the lesion the
intensities are the tumor's (a dark core reads as CSF, oedema as grey matter), so the atlas's fractions fill it,
its CSF kept only in the deep brain (ventricles; see _fill_lesion); outside the T1's foreground (the skull-stripped
background) there is no tissue.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import numpy as np

from .geometry import Geometry, block_mean
from .tissue import Tissue

# Class order of the mixture, darkest first on a T1.
CLASSES = ("csf", "gm", "wm")
# Weight of the atlas in a voxel's class prior (the rest uniform over the classes): 0.8 leaves every class a prior
# of at least 0.067, which a clear intensity (several standard deviations from the other classes' means) overrides.
ATLAS_PRIOR_WEIGHT = 0.8
EM_ITERATIONS = 25
# The bias field is re-estimated every BIAS_EVERY iterations after the first BIAS_START, as a Gaussian-smoothed
# log ratio of the T1 to its classes' means, on a grid of BIAS_GRID_MM (the field varies over tens of mm).
BIAS_START, BIAS_EVERY = 3, 3
BIAS_SIGMA_MM = 25.0
BIAS_GRID_MM = 6.0
# The fit is used only when the class means come out in a T1's order, each apart from the next by this many
# pooled standard deviations (a FLAIR, a T2 or a flat image given as a T1 fails it).
MIN_SEPARATION_SD = 0.5
MIN_FIT_VOXELS = 1000
# Inside the lesion the atlas's CSF stays CSF only this deep below the brain's surface: the lateral ventricles lie
# 20 mm and more below the cortex, the outer CSF layer and most of the sulci within it.
LESION_CSF_DEPTH_MM = 10.0


@dataclass
class T1Classes:
    """The result of classify_t1.

    tissue: WM/GM/CSF fractions on the T1's grid (the atlas's inside the lesion, none outside the foreground).
    used: whether the intensity fit was used (False: the atlas's tissue is returned unchanged, see warnings).
    means, sds: each class's mean and standard deviation of the bias-corrected T1 (the T1 scaled to its robust
        maximum), by class name.
    changed_cm3: volume outside the lesion whose largest class differs from the atlas's.
    warnings: one-line notes for the user.
    """
    tissue: Tissue
    used: bool
    means: Dict[str, float] = field(default_factory=dict)
    sds: Dict[str, float] = field(default_factory=dict)
    changed_cm3: float = 0.0
    warnings: List[str] = field(default_factory=list)


def classify_t1(t1_scaled: np.ndarray, prior: Tissue, foreground: np.ndarray, lesion: np.ndarray) -> T1Classes:
    """WM/GM/CSF fractions from a T1's intensities with the registered atlas's fractions as priors.

    t1_scaled: the T1 (k, j, i) on prior's grid, scaled so that white matter is near 1 (any positive scale works:
        the class means are fitted).
    prior: the atlas's tissue registered onto the T1's grid.
    foreground: boolean (k, j, i), the skull-stripped brain (non-background voxels).
    lesion: boolean (k, j, i), the lesion (its intensities are not tissue's; the prior's fractions stay there).

    Returns a T1Classes. When the fit fails its check (fewer than MIN_FIT_VOXELS healthy brain voxels, or class means
    not ordered CSF < GM < WM by MIN_SEPARATION_SD), the prior comes back unchanged with used=False and a warning.
    Raises ValueError for arrays whose shape is not the prior's grid.
    """
    geometry = prior.geometry
    for name, array in (("t1_scaled", t1_scaled), ("foreground", foreground), ("lesion", lesion)):
        if np.shape(array) != geometry.shape_kji:
            raise ValueError(f"{name} has shape {np.shape(array)}, the prior's grid {geometry.shape_kji}")
    foreground = np.asarray(foreground, bool)
    lesion = np.asarray(lesion, bool)
    fit = foreground & ~lesion
    if int(fit.sum()) < MIN_FIT_VOXELS:
        return T1Classes(prior, False, warnings=[f"the T1 has {int(fit.sum())} brain voxels outside the lesion: "
                                                 f"the atlas's tissue is used as registered"])
    intensity = np.asarray(t1_scaled, np.float64)[fit]
    atlas = np.stack([np.asarray(getattr(prior, name), np.float64)[fit] for name in CLASSES], axis=1)
    total = atlas.sum(axis=1, keepdims=True)
    # Where the registered atlas has (almost) no tissue but the T1 has brain, its prior is uniform.
    atlas = np.where(total > 0.05, atlas / np.maximum(total, 1e-12), 1.0 / len(CLASSES))
    log_prior = np.log(ATLAS_PRIOR_WEIGHT * atlas + (1.0 - ATLAS_PRIOR_WEIGHT) / len(CLASSES))

    responsibilities = atlas
    log_bias = np.zeros_like(intensity)
    means, variances = _class_statistics(intensity, responsibilities)
    for iteration in range(EM_ITERATIONS):
        corrected = intensity * np.exp(-log_bias)
        log_likelihood = (-0.5 * (corrected[:, None] - means) ** 2 / variances - 0.5 * np.log(variances)
                          + log_prior)
        log_likelihood -= log_likelihood.max(axis=1, keepdims=True)
        responsibilities = np.exp(log_likelihood)
        responsibilities /= responsibilities.sum(axis=1, keepdims=True)
        means, variances = _class_statistics(corrected, responsibilities)
        if iteration >= BIAS_START and (iteration - BIAS_START) % BIAS_EVERY == 0:
            expected = responsibilities @ means
            log_bias = _smooth_log_ratio(np.log(np.maximum(intensity, 1e-6) / np.maximum(expected, 1e-6)), fit,
                                         geometry)

    sds = np.sqrt(variances)
    stats = {"means": {n: float(m) for n, m in zip(CLASSES, means)}, "sds": {n: float(s) for n, s in zip(CLASSES, sds)}}
    pooled = float(np.sqrt(variances.mean()))
    gaps = np.diff(means) / max(pooled, 1e-12)
    if not np.all(gaps >= MIN_SEPARATION_SD):
        order = " < ".join(f"{n} {m:.2f}" for n, m in sorted(stats["means"].items(), key=lambda item: item[1]))
        return T1Classes(prior, False, **stats, warnings=[
            f"the T1's intensities do not separate CSF, GM and WM (class means {order}, in units of the robust "
            f"maximum): the atlas's tissue is used as registered; check that the image is a T1"])

    fractions = {name: np.zeros(geometry.shape_kji, np.float32) for name in CLASSES}
    for index, name in enumerate(CLASSES):
        fractions[name][fit] = responsibilities[:, index]
    _fill_lesion(fractions, prior, foreground & lesion, fit, foreground)
    tissue = Tissue(fractions["wm"], fractions["gm"], fractions["csf"], geometry)
    before = np.argmax(atlas, axis=1)
    after = np.argmax(responsibilities, axis=1)
    changed_cm3 = float((before != after).sum()) * geometry.voxel_volume_mm3() / 1000.0
    return T1Classes(tissue, True, **stats, changed_cm3=changed_cm3)


def _fill_lesion(fractions: Dict[str, np.ndarray], prior: Tissue, lesion_brain: np.ndarray, fit: np.ndarray,
                 foreground: np.ndarray) -> None:
    """The lesion's fractions, in place. The T1 says every lesion voxel is brain, and a tumor grows in WM and GM: the
    registered atlas's fractions fill it, scaled to fill the voxel, with the atlas's CSF kept only deeper than
    LESION_CSF_DEPTH_MM below the brain's surface (ventricles, which the registration places well); nearer the
    surface the atlas's CSF is its outer CSF and sulci where its brain ends short of the patient's, and the voxel
    takes the atlas's WM:GM mix there, or, where the atlas has neither, the fractions of the nearest classified
    healthy voxel holding WM+GM >= 0.5."""
    from scipy.ndimage import distance_transform_edt

    if not lesion_brain.any():
        return
    spacing = prior.geometry.spacing_kji_mm
    atlas = {name: np.asarray(getattr(prior, name), np.float64)[lesion_brain] for name in CLASSES}
    depth_mm = distance_transform_edt(foreground, sampling=spacing)[lesion_brain]
    keep_csf = depth_mm > LESION_CSF_DEPTH_MM
    atlas["csf"] = np.where(keep_csf, atlas["csf"], 0.0)
    total = sum(atlas.values())
    has_atlas = total > 0.05
    healthy_brain = fit & ((fractions["wm"] + fractions["gm"]) >= 0.5)
    if not healthy_brain.any():
        healthy_brain = fit
    nearest = distance_transform_edt(~healthy_brain, sampling=spacing, return_distances=False, return_indices=True)
    source = tuple(axis[lesion_brain] for axis in nearest)
    filled = {name: np.where(has_atlas, atlas[name] / np.maximum(total, 1e-6), fractions[name][source])
              for name in CLASSES}
    for name in CLASSES:
        fractions[name][lesion_brain] = filled[name]


def _class_statistics(intensity: np.ndarray, responsibilities: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Each class's responsibility-weighted mean and variance (the variance floored at 1e-6, a flat class)."""
    weight = np.maximum(responsibilities.sum(axis=0), 1e-12)
    means = (responsibilities * intensity[:, None]).sum(axis=0) / weight
    variances = (responsibilities * (intensity[:, None] - means) ** 2).sum(axis=0) / weight
    return means, np.maximum(variances, 1e-6)


def _smooth_log_ratio(values: np.ndarray, mask: np.ndarray, geometry: Geometry) -> np.ndarray:
    """A smooth field through `values` (given at the mask's voxels), back at those voxels: normalised Gaussian
    smoothing (sigma BIAS_SIGMA_MM) on a BIAS_GRID_MM block grid, read back by linear interpolation; mean 0."""
    from scipy.ndimage import gaussian_filter, map_coordinates

    spacing = np.asarray(geometry.spacing_kji_mm, float)
    factors = [max(1, int(round(BIAS_GRID_MM / s))) for s in spacing]
    full = np.zeros(geometry.shape_kji, np.float32)
    full[mask] = values
    # Voxels beyond the last whole block are dropped by block_mean; pad so that every voxel falls in a block.
    pad = [(0, (-n) % f) for n, f in zip(geometry.shape_kji, factors)]
    shape = [(n + p[1]) // f for n, p, f in zip(geometry.shape_kji, pad, factors)]
    weight = block_mean(np.pad(mask.astype(np.float32), pad), factors, shape)
    total = block_mean(np.pad(full, pad), factors, shape)
    sigma = [BIAS_SIGMA_MM / (s * f) for s, f in zip(spacing, factors)]
    smooth = gaussian_filter(total.astype(np.float64), sigma, mode="nearest") / np.maximum(
        gaussian_filter(weight.astype(np.float64), sigma, mode="nearest"), 1e-6)
    # A fine voxel's centre sits at (index + 0.5) / factor - 0.5 in block units.
    index = np.argwhere(mask).astype(np.float64)
    coordinates = [(index[:, axis] + 0.5) / factors[axis] - 0.5 for axis in range(3)]
    field = map_coordinates(smooth, coordinates, order=1, mode="nearest")
    return field - field.mean()
