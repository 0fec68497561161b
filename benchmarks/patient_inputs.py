"""The tissue inputs a patient's personalisation gets, synthesised from the healthy brain the truth grew in.

A patient's tissue is seldom the healthy brain: a segmentation tool labels the tumor-bearing brain (dark T1 core as
CSF, oedema as GM), or the core is cut out, or a registration warps probability maps (interpolation overshoot
included), or there is no tissue at all, only a skull-stripped T1. Each function here makes one of those from the
healthy tissue (a Tissue) and the tumor's BraTS segmentation (labels on the same grid), deterministically from an
rng, so benchmarks/patients.py and Testing/test_patient_inputs.py see the same inputs.

Inputs (INPUTS, in report order):
  healthy     the brain's own WM/GM/CSF fractions (the reference)
  labels      hard labels (CSF=1, GM=2, WM=3) of the tumor-bearing brain: core (BraTS 1 + 3) labelled CSF,
              oedema (BraTS 2) labelled GM, every other voxel its healthy label
  core-cut    the same labels with the core labelled background 0
  warped      WM/GM/CSF maps pulled through a smooth random displacement (RMS WARP_RMS_MM) with linear
              interpolation, plus a smooth ringing term (interpolation overshoot), kept within [-0.02, 1.03] and
              sums <= WARP_MAX_SUM: inside the limits the library cleans (0.05 beyond [0, 1], sums up to 1.10)
  t1          a skull-stripped T1 synthesised from the tissue (see synthetic_t1)
"""
from typing import Dict, Tuple

import numpy as np

from TumorPersonalizationLib.geometry import Volume
from TumorPersonalizationLib.tissue import Tissue, TissueLabels

INPUTS = ("healthy", "labels", "core-cut", "warped", "t1")
INPUT_TITLES = {"healthy": "1. healthy tissue (reference)", "labels": "2. labels, core as CSF, oedema as GM",
                "core-cut": "3. labels, core cut out (0)", "warped": "4. warped probability maps",
                "t1": "5. T1 alone"}
# BraTS 2023 labels of the tumor segmentation.
NECROTIC, EDEMA, ENHANCING = 1, 2, 3
LABELS = TissueLabels()  # CSF=1, GM=2, WM=3

# Registration-warped maps: a residual misregistration of 1-2 mm, smooth over ~15 mm.
WARP_RMS_MM = 1.5
WARP_SMOOTHNESS_MM = 15.0
# Ringing: an unsharp-mask term (map minus its blur) like a higher-order interpolator's overshoot at edges.
RINGING_GAIN = 0.25
RINGING_SIGMA_MM = 1.5
WARP_RANGE = (-0.02, 1.03)
WARP_MAX_SUM = 1.08

# T1 synthesis: class intensities (WM brightest on T1), lesion intensities, bias and noise.
T1_INTENSITY = {"wm": 0.85, "gm": 0.55, "csf": 0.2}
# The oedema is darker than WM and, on average, than GM (what a T1 shows of vasogenic oedema); the brief's 0.6
# would sit above GM's 0.55, so 0.45 keeps the stated ordering WM > GM > oedema > core > CSF.
T1_EDEMA = 0.45
T1_CORE = 0.3
T1_BIAS = 0.10            # multiplicative bias field within 1 +/- 0.10
T1_BIAS_SMOOTHNESS_MM = 40.0
T1_NOISE = 0.03 * T1_INTENSITY["wm"]  # Gaussian noise, 3 % of the brightest tissue
T1_HEAD_FRACTION = 0.5    # skull stripping: voxels with WM+GM+CSF below this are background 0


def core_and_edema(segmentation: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(core, oedema) bool masks of a BraTS segmentation: core = necrotic + enhancing, oedema = label 2."""
    segmentation = np.asarray(segmentation)
    return np.isin(segmentation, (NECROTIC, ENHANCING)), segmentation == EDEMA


def lesion_labels(healthy: Tissue, segmentation: np.ndarray, core_label: int = LABELS.csf) -> np.ndarray:
    """Hard labels of the tumor-bearing brain: the healthy labels, the core set to core_label (CSF, or 0 to cut it
    out), the oedema to GM (uint8 on the tissue's grid)."""
    core, edema = core_and_edema(segmentation)
    labels = healthy.labelmap(LABELS)
    labels[edema] = LABELS.gm
    labels[core] = core_label
    return labels


def _smooth_field(rng: np.random.Generator, healthy: Tissue, smoothness_mm: float) -> np.ndarray:
    """A smooth random field on the tissue's grid, scaled to a maximum magnitude of 1."""
    from scipy.ndimage import gaussian_filter

    sigma = [smoothness_mm / s for s in healthy.geometry.spacing_kji_mm]
    field = gaussian_filter(rng.normal(size=healthy.geometry.shape_kji), sigma, mode="reflect")
    field -= field.mean()
    return field / max(float(np.abs(field).max()), 1e-12)


def warped_maps(healthy: Tissue, rng: np.random.Generator) -> Dict[str, np.ndarray]:
    """WM/GM/CSF maps as a registration delivers them: pulled through a smooth random displacement (RMS
    WARP_RMS_MM) by linear interpolation, then a ringing term (RINGING_GAIN x (map - its Gaussian blur)) that
    overshoots at edges, clipped to WARP_RANGE and with every voxel's sum held at or below WARP_MAX_SUM.
    Returns {"wm", "gm", "csf"} float32 arrays on the tissue's grid (not valid fractions: the library cleans them)."""
    from scipy.ndimage import gaussian_filter, map_coordinates

    from TumorPersonalizationLib.offline.augment import smooth_displacement

    geometry = healthy.geometry
    displacement = smooth_displacement(rng, geometry, WARP_RMS_MM, WARP_SMOOTHNESS_MM)
    points = geometry.ras_grid() + displacement
    coordinates = np.moveaxis(geometry.ras_to_index_kji(points), -1, 0)
    sigma = [RINGING_SIGMA_MM / s for s in geometry.spacing_kji_mm]
    out = {}
    for name in ("wm", "gm", "csf"):
        moved = map_coordinates(getattr(healthy, name).astype(np.float64), coordinates, order=1, mode="constant",
                                cval=0.0)
        ringing = RINGING_GAIN * (moved - gaussian_filter(moved, sigma))
        out[name] = np.clip(moved + ringing, *WARP_RANGE)
    total = out["wm"] + out["gm"] + out["csf"]
    # Above WARP_MAX_SUM the positive parts are scaled down together (the overshoot of three maps at one edge).
    over = total > WARP_MAX_SUM
    if np.any(over):
        positive = sum(np.maximum(out[n], 0.0) for n in out)
        scale = np.ones_like(total)
        scale[over] = (positive[over] - (total[over] - WARP_MAX_SUM)) / positive[over]
        for name in out:
            out[name] = np.where(out[name] > 0, out[name] * scale, out[name])
    return {name: array.astype(np.float32) for name, array in out.items()}


def synthetic_t1(healthy: Tissue, segmentation: np.ndarray, rng: np.random.Generator) -> Volume:
    """A skull-stripped T1 of the tumor-bearing brain on the tissue's grid.

    Partial volume: each voxel is its fractions' weighted class intensity (T1_INTENSITY); the core is T1_CORE and
    the oedema T1_EDEMA; times a smooth bias field within 1 +/- T1_BIAS; plus Gaussian noise (sd T1_NOISE); voxels
    whose tissue fractions sum below T1_HEAD_FRACTION are background 0 (skull-stripped)."""
    core, edema = core_and_edema(segmentation)
    intensity = sum(T1_INTENSITY[name] * getattr(healthy, name).astype(np.float64) for name in T1_INTENSITY)
    intensity[edema] = T1_EDEMA
    intensity[core] = T1_CORE
    bias = 1.0 + T1_BIAS * _smooth_field(rng, healthy, T1_BIAS_SMOOTHNESS_MM)
    t1 = intensity * bias + rng.normal(0.0, T1_NOISE, healthy.geometry.shape_kji)
    head = (healthy.wm + healthy.gm + healthy.csf) >= T1_HEAD_FRACTION
    t1 = np.where(head, np.maximum(t1, 0.0), 0.0)
    return Volume(t1.astype(np.float32), healthy.geometry)


def make_input(name: str, healthy: Tissue, segmentation: np.ndarray, rng: np.random.Generator):
    """The named input (INPUTS): a Tissue for "healthy", a label Volume for "labels"/"core-cut", the dict of warped
    maps as Volumes for "warped" (to go through Tissue.from_probabilities, which decides whether it accepts them),
    the T1 Volume for "t1". ValueError for an unknown name."""
    if name == "healthy":
        return healthy
    if name == "labels":
        return Volume(lesion_labels(healthy, segmentation, LABELS.csf), healthy.geometry)
    if name == "core-cut":
        return Volume(lesion_labels(healthy, segmentation, 0), healthy.geometry)
    if name == "warped":
        return {n: Volume(a, healthy.geometry) for n, a in warped_maps(healthy, rng).items()}
    if name == "t1":
        return synthetic_t1(healthy, segmentation, rng)
    raise ValueError(f"unknown input {name!r}: choose one of {', '.join(INPUTS)}")
