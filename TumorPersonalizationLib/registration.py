"""The bundled healthy atlas registered to a patient, the lesion left out of the registration metric.

A patient's own tissue segmentation is of a tumor-bearing brain: segmentation tools label the tumor core CSF or
background, and a growth model run on that tissue cannot enter the tumor it has to explain. The field's answer (the
seed paper's preprocessing, the PREDICT-GBM benchmark) is a healthy atlas registered to the patient with the lesion
masked out of the metric, whose tissue then stands in for the lesion's. Two entry points:

  register_atlas_to_tissue(tissue, lesion_mask)   the atlas's WM/GM/CSF registered to the patient's own tissue maps;
                                                  the caller refills the lesion from AtlasRegistration.tissue.
  tissue_from_t1(t1, lesion_mask)                 no tissue at all: the atlas's T1 template registered to the
                                                  patient's skull-stripped T1, the atlas's WM/GM/CSF warped onto it
                                                  and then corrected by the T1's own intensities (t1_classes.py).

Both register affine (the T1 rigid first) then deformable (a cubic B-spline on a 40 mm control grid) with
SimpleITK, on a 3 mm copy of the patient's image in the patient's own orientation, initialised by matching the
images' centres of mass (moments), so that any orientation and field of view of the patient's grid is handled. The
lesion (dilated by LESION_MARGIN_MM) is outside the metric's fixed mask, so nothing inside it pulls on the
transform and the B-spline carries the surrounding brain's deformation across it. Transforms map patient points to
atlas points (fixed = patient, moving = atlas), in SimpleITK's physical (LPS) coordinates; the atlas's fractions
are pulled back onto the patient's own grid by linear interpolation (fractions stay fractions: a convex combination
of fractions summing to at most 1).
The moving images are the bundled 2 mm atlas (the template T1 and the tissue maps share its grid).

Each result carries a quality figure measured outside the lesion and `passed` (quality at or above a documented
threshold): a failed registration is reported, not silently used.
"""
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .atlas import load_atlas, load_atlas_t1
from .errors import InputError
from .geometry import Geometry, Volume, block_mean, resample_fraction, resample_linear
from .metrics import dice, ncc
from .progress import Cancelled, check_cancel, is_cancelled, report, sub_progress
from .t1_classes import classify_t1
from .tissue import Tissue

# ---- settings ----------------------------------------------------------------------------------------------------
# Synthetic intensity of a tissue map: WM 1.0, GM 0.6, CSF 0.15, background 0, i.e. the order and rough contrast of
# a T1. One scalar image for both sides lets a plain mean-squares metric compare them: the two images are on the
# same scale by construction (both are fractions through the same weights), so no mutual information is needed, and
# a single channel costs a third of a three-channel metric. A hard label map and the atlas's soft fractions give
# the same intensities away from borders.
SYNTHETIC_INTENSITY = {"wm": 1.0, "gm": 0.6, "csf": 0.15}
# Voxel size of the copy of the patient's image that is registered: 3 mm keeps a 1 mm brain within the time target
# (the deformable stage works at the scale of its control grid, tens of mm, far coarser than this).
REGISTRATION_SPACING_MM = 3.0
# B-spline control point spacing. ITK's metrics evaluate a B-spline's Jacobian over all its parameters at each
# sample, so the cost grows with the number of control points: 40 mm (about 1200 parameters for a brain) took half
# the time of 30 mm and recovered a known deformation's WM as well (Dice 0.974 against 0.970, atlas T1 deformed by
# rotation, scaling and a smooth 3 mm field), and its support (4 x 40 mm) bridges a lesion of several centimetres.
BSPLINE_CONTROL_SPACING_MM = 40.0
# The lesion mask is grown by this before it leaves the metric: the tumor's rim (edema, mass effect) is not healthy
# tissue either, and the coarse grid's partial voxels at its border are neither.
LESION_MARGIN_MM = 3.0
# The region the registration sees: the patient's brain (or head) box grown by this.
BOX_MARGIN_MM = 15.0
# Spacing of the displacement field a registration's transform is sampled on before the atlas is warped.
FIELD_SPACING_MM = 4.0
# Quality thresholds (see the benchmark benchmarks/registration.py and Testing/test_registration.py for the figures
# they sit between).
TISSUE_QUALITY_THRESHOLD = 0.6
T1_QUALITY_THRESHOLD = 0.5
# A skull-stripped brain (with its CSF) fills 1.0-2.0 litres (the template's own mask, a large brain: 1.89 l; scaled
# by 1.05 along each axis, 2.2 l); a head with its skull and scalp 3.5 l and more. Above SKULL_VOLUME_L, or a
# foreground longer than SKULL_EXTENT_MM along a RAS axis (a brain is at most ~200 mm long, a head with its neck well
# over 230 mm), the image is taken to hold the skull.
SKULL_VOLUME_L = 2.8
SKULL_EXTENT_MM = 230.0
# Foreground of a T1 scaled to its robust maximum (99.5th percentile of non-zero voxels): the darkest brain voxels
# (CSF in the ventricles) of the template sit near 0.1-0.2, air and the stripped background at 0.
T1_FOREGROUND_LEVEL = 0.06
# Seed of the metrics' random sampling: the same input gives the same answer.
SAMPLING_SEED = 20240601


@dataclass
class AtlasRegistration:
    """The bundled atlas registered to a patient's tissue.

    tissue: the atlas's WM/GM/CSF fractions on the patient's tissue grid (linear interpolation, clipped to [0, 1]).
    quality: Pearson correlation (NCC) of the synthetic intensities (SYNTHETIC_INTENSITY) of the patient's tissue and
        the registered atlas, over the patient's head region (tissue grown by 6 mm) outside the grown lesion, on the
        3 mm registration grid. 1 is a perfect match; a good registration of another brain reaches ~0.8-0.9.
    passed: quality >= TISSUE_QUALITY_THRESHOLD.
    runtime_s: wall-clock seconds of the whole call.
    transform: SimpleITK CompositeTransform (affine, then B-spline applied first) mapping patient physical points
        (LPS mm) to atlas physical points: the transform sitk.Resample needs to bring the atlas onto the patient.
    warnings: one-line notes for the user (a failed quality check, a large lesion).
    metrics: further figures outside the lesion: brain Dice (WM+GM >= 0.5), WM Dice (WM >= 0.5), NCC before the
        deformable stage (affine only).
    """

    tissue: Tissue
    quality: float
    passed: bool
    runtime_s: float
    transform: Any
    warnings: List[str] = field(default_factory=list)
    metrics: Dict[str, float] = field(default_factory=dict)


@dataclass
class T1Tissue:
    """Tissue of a patient derived from the T1 alone: the atlas's T1 template registered to the patient's T1.

    tissue: WM/GM/CSF fractions on the T1's own grid (the T1's intensity classes, the atlas's in the lesion).
    quality: NCC of the patient's T1 and the registered template T1 (both scaled to their robust maximum) over the
        patient's brain (foreground grown by 6 mm) outside the grown lesion, on the 3 mm registration grid.
    passed: quality >= T1_QUALITY_THRESHOLD.
    runtime_s, transform, warnings, metrics: as in AtlasRegistration (metrics: brain-mask Dice of the T1's
        foreground and the registered atlas's brain, NCC after the affine stage; classes_used (1.0 when the
        intensity classes replaced the warped atlas outside the lesion), classes_changed_cm3 and the fitted class
        means class_mean_csf/gm/wm).
    registered: the atlas's fractions as the registration warped them, before the intensity classes.
    """

    tissue: Tissue
    quality: float
    passed: bool
    runtime_s: float
    transform: Any
    warnings: List[str] = field(default_factory=list)
    metrics: Dict[str, float] = field(default_factory=dict)
    registered: Optional[Tissue] = None


# ---- public entry points -----------------------------------------------------------------------------------------
def register_atlas_to_tissue(tissue: Tissue, lesion_mask: Optional[np.ndarray], spacing_mm: int = 2,
                             progress=None, cancel=None) -> AtlasRegistration:
    """Register the bundled atlas's tissue to a patient's tissue, the lesion excluded from the metric.

    tissue: the patient's Tissue (any orientation and voxel size).
    lesion_mask: boolean (k, j, i) array on the tissue's grid, True inside the lesion (e.g. the tumor core, or the
        whole tumor); None or all False for none.
    spacing_mm: which bundled atlas level is registered and warped (1 or 2 mm; 2 mm suffices to refill a lesion).
    progress, cancel: the project's progress protocol (progress.py); Cancelled is raised when cancelled.

    Both sides are registered as one synthetic T1-like image, WM 1.0 + GM 0.6 + CSF 0.15 (SYNTHETIC_INTENSITY),
    by mean squares: the atlas and the patient pass through the same weights, so their intensities agree where their
    tissues do, and one channel costs a third of three. Mutual information is not needed (no contrast to learn) and
    would cost more in the deformable stage.

    Returns an AtlasRegistration. Raises InputError when the tissue holds no brain, the mask's shape differs from
    the tissue's grid, or the lesion covers most of the brain (nothing healthy left to register on).
    """
    import SimpleITK as sitk

    start = time.perf_counter()
    report(progress, 0.0, "atlas registration: preparing")
    if not isinstance(tissue, Tissue):
        raise InputError(f"register_atlas_to_tissue needs a Tissue, got {type(tissue).__name__}")
    geometry = tissue.geometry
    lesion = _check_lesion(lesion_mask, geometry, "tissue")
    brain = tissue.brain_mask
    if brain.sum() * geometry.voxel_volume_mm3() < 50_000:
        raise InputError(f"the tissue holds {brain.sum() * geometry.voxel_volume_mm3() / 1000:.1f} cm^3 of WM+GM: "
                         f"not a brain to register the atlas to")
    warnings = _lesion_warnings(lesion, brain | (tissue.csf > 0.5))

    # The patient's image on the 3 mm grid, cut to the head's box: fixed image, fixed mask, initialisation image.
    intensity = _synthetic_intensity(tissue.wm, tissue.gm, tissue.csf)
    coarse = geometry.with_spacing(REGISTRATION_SPACING_MM)
    head_all = _mask_on_grid((tissue.wm + tissue.gm + tissue.csf) > 0.1, geometry, coarse, level=0.5)
    grid, box = _registration_grid(coarse, head_all)
    fixed = resample_fraction(intensity, geometry, coarse)[box]
    head = head_all[box]
    lesion_coarse = _mask_on_grid(lesion, geometry, coarse)[box]
    fixed_image, mask_image, init_image = _fixed_images(fixed, head, lesion_coarse, grid, np.mean, 0.5)

    atlas = load_atlas(spacing_mm)
    atlas_intensity = _synthetic_intensity(atlas.wm, atlas.gm, atlas.csf)
    moving_image = Volume(atlas_intensity, atlas.geometry).to_sitk()
    check_cancel(cancel)
    report(progress, 0.05, "atlas registration: affine")

    def metric(method):
        method.SetMetricAsMeanSquares()

    affine = _affine_stage(init_image, fixed_image, mask_image, moving_image, metric, rigid_first=False,
                           progress=sub_progress(progress, 0.05, 0.35, "atlas registration: affine"), cancel=cancel)
    affine_ncc = _quality_ncc(fixed, lesion_coarse, head, grid, moving_image, affine)
    # Mean squares of intensities in [0, 1] has gradients of order 1e-4: a tolerance of 1e-6 lets L-BFGS-B work
    # instead of stopping at its first steps. 5 % of the 3 mm voxels suffice for a noise-free synthetic image (the
    # 1 mm benchmark case: NCC 0.9992 against 0.9994 with 10 %, a third less time).
    bspline = _bspline_stage(fixed_image, mask_image, moving_image, affine, metric,
                             progress=sub_progress(progress, 0.35, 0.85, "atlas registration: deformable"),
                             cancel=cancel, iterations=20, gradient_tolerance=1e-6,
                             sampling=0.05)
    transform = sitk.CompositeTransform([affine, bspline])

    report(progress, 0.85, "atlas registration: warping the atlas")
    registered = warp_atlas_tissue(atlas, transform, geometry)
    quality = _quality_ncc(fixed, lesion_coarse, head, grid, moving_image, transform)
    healthy = ~lesion
    metrics = {
        "ncc": quality,
        "ncc_affine": affine_ncc,
        "brain_dice": dice((registered.brain_fraction >= 0.5) & healthy, (tissue.brain_fraction >= 0.5) & healthy),
        "wm_dice": dice((registered.wm >= 0.5) & healthy, (tissue.wm >= 0.5) & healthy),
    }
    passed = bool(quality >= TISSUE_QUALITY_THRESHOLD)
    if not passed:
        warnings.append(f"the atlas registration is poor (NCC {quality:.2f} outside the lesion, below "
                        f"{TISSUE_QUALITY_THRESHOLD}): check the tissue maps (labels, orientation)")
    report(progress, 1.0, "atlas registration: done")
    return AtlasRegistration(registered, quality, passed, time.perf_counter() - start, transform, warnings, metrics)


def tissue_from_t1(t1, lesion_mask: Optional[np.ndarray] = None, progress=None, cancel=None,
                   atlas_spacing_mm: int = 1) -> T1Tissue:
    """WM/GM/CSF of a patient from a skull-stripped T1: the atlas's T1 template registered to it (rigid, affine, then
    B-spline; Mattes mutual information; the lesion outside the metric), the atlas's fractions warped onto it, and
    those corrected by the T1's intensities outside the lesion (t1_classes.classify_t1: a Gaussian mixture with the
    warped fractions as priors; the lesion keeps the atlas's tissue, its CSF only in the deep brain).

    t1: the patient's skull-stripped T1 as a geometry.Volume, a SimpleITK image or a file path; any orientation,
        field of view and voxel size (thick slices, e.g. 1 x 1 x 5 mm, included).
    lesion_mask: boolean (k, j, i) array on the T1's grid, True inside the lesion; None for none.
    atlas_spacing_mm: the bundled atlas level whose fractions are warped (1 mm: the finest).
    progress, cancel: the project's progress protocol; Cancelled is raised when cancelled.

    Returns a T1Tissue whose tissue lies on the T1's own grid (a thick-slice grid gets each voxel's average over its
    slab: the atlas is sampled on a finer grid and block-averaged). Raises InputError for a non-scalar or non-3-D
    image, an empty or constant one, NaNs, a mask of another shape, or a T1 that still holds the skull (it asks for
    skull stripping: the atlas has no skull or scalp to match).
    """
    import SimpleITK as sitk

    from .tissue import as_volume

    start = time.perf_counter()
    report(progress, 0.0, "T1 registration: preparing")
    volume = as_volume(t1)
    array = np.asarray(volume.array)
    if array.ndim != 3:
        raise InputError(f"the T1 must be a scalar 3-D image, got an array of shape {array.shape}")
    geometry = volume.geometry
    array = array.astype(np.float32)
    if not np.all(np.isfinite(array)):
        raise InputError(f"the T1 image contains {int(np.size(array) - np.isfinite(array).sum())} NaN or infinite "
                         f"voxels")
    if float(array.max()) <= float(array.min()) or float(array.max()) <= 0:
        raise InputError(f"the T1 image is empty or constant (all voxels {float(array.max()):g}): nothing to register")
    lesion = _check_lesion(lesion_mask, geometry, "T1")

    scaled = _robust_scale(array)
    # Everything the registration sees is on a 3 mm copy in the T1's orientation: a thick-slice T1 becomes
    # near-isotropic here, and the skull check and the foreground cost little.
    coarse = geometry.with_spacing(REGISTRATION_SPACING_MM)
    coarse_image = resample_linear(scaled, geometry, coarse, antialias=True)
    foreground = _foreground(coarse_image)
    _refuse_skull(foreground, coarse)
    lesion_all = _mask_on_grid(lesion, geometry, coarse)
    warnings = _lesion_warnings(lesion_all, foreground)
    if foreground.sum() * coarse.voxel_volume_mm3() < 500_000:
        warnings.append(f"the T1's foreground is small ({foreground.sum() * coarse.voxel_volume_mm3() / 1000:.0f} "
                        f"cm^3): a partial field of view registers less reliably")

    grid, box = _registration_grid(coarse, foreground)
    fixed = coarse_image[box]
    head_coarse = foreground[box]
    lesion_coarse = lesion_all[box]
    fixed_image, mask_image, init_image = _fixed_images(fixed, head_coarse, lesion_coarse, grid, np.median, 0.2)
    template = load_atlas_t1(2)
    moving_image = template.to_sitk()
    check_cancel(cancel)

    def metric(method):
        method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)

    affine = _affine_stage(init_image, fixed_image, mask_image, moving_image, metric, rigid_first=True,
                           progress=sub_progress(progress, 0.05, 0.4, "T1 registration: rigid + affine"),
                           cancel=cancel)
    affine_ncc = _quality_ncc(fixed, lesion_coarse, head_coarse, grid, moving_image, affine)
    bspline = _bspline_stage(fixed_image, mask_image, moving_image, affine, metric,
                             progress=sub_progress(progress, 0.4, 0.85, "T1 registration: deformable"),
                             cancel=cancel, iterations=25, gradient_tolerance=1e-5)
    transform = sitk.CompositeTransform([affine, bspline])

    report(progress, 0.85, "T1 registration: warping the atlas's tissue")
    atlas = load_atlas(atlas_spacing_mm)
    registered = warp_atlas_tissue(atlas, transform, geometry)
    quality = _quality_ncc(fixed, lesion_coarse, head_coarse, grid, moving_image, transform)
    healthy = ~lesion
    head = _mask_on_grid(foreground, coarse, geometry, level=0.5)
    metrics = {"ncc": quality, "ncc_affine": affine_ncc,
               "brain_dice": dice(((registered.wm + registered.gm + registered.csf) >= 0.5) & healthy,
                                  head & healthy)}
    report(progress, 0.92, "T1 registration: tissue classes from the T1's intensities")
    classes = classify_t1(scaled, registered, _foreground(scaled), lesion)
    tissue = classes.tissue
    warnings += classes.warnings
    metrics.update({"classes_used": float(classes.used), "classes_changed_cm3": classes.changed_cm3,
                    **{f"class_mean_{name}": value for name, value in classes.means.items()}})
    passed = bool(quality >= T1_QUALITY_THRESHOLD)
    if not passed:
        warnings.append(f"the T1 registration is poor (NCC {quality:.2f} outside the lesion, below "
                        f"{T1_QUALITY_THRESHOLD}): check that the image is a skull-stripped T1")
    report(progress, 1.0, "T1 registration: done")
    return T1Tissue(tissue, quality, passed, time.perf_counter() - start, transform, warnings, metrics, registered)


def warp_atlas_tissue(atlas: Tissue, transform, target: Geometry, finest_mm: Optional[float] = None) -> Tissue:
    """The atlas's fractions pulled back onto `target` through `transform` (target points -> atlas points, LPS),
    by linear interpolation (renormalised where the sum of the three exceeds 1); outside the atlas: background.

    The transform is sampled once as a displacement field on a FIELD_SPACING_MM copy of the target grid and
    interpolated linearly from there: a B-spline evaluated at each of a 1 mm brain's millions of voxels costs ten
    times more, and at 40 mm control spacing the field is smooth on the scale of 4 mm (linear interpolation
    between its samples departs from it by a small fraction of a voxel). The same field says which part of the
    target the atlas's brain lands in; only that box is resampled (the rest is background). Along an axis whose
    voxels are coarser than the atlas's (a thick-slice grid), the atlas is sampled on a grid finer by an integer
    factor and block-averaged back, so each voxel holds its slab's average rather than its centre plane's value.
    finest_mm: the sub-voxel size aimed at (default: the atlas's spacing)."""
    import SimpleITK as sitk

    field, field_grid, displacement_lps = _as_field(transform, target)
    box = _landing_box(atlas, target, field_grid, displacement_lps)
    maps = [np.zeros(target.shape_kji, np.float32) for _ in range(3)]
    if box is None:
        return Tissue(*maps, target)
    sub = target.sub_box(box)
    finest = float(min(atlas.geometry.spacing_ijk_mm)) if finest_mm is None else float(finest_mm)
    factors_ijk = [max(1, int(np.ceil(s / finest - 1e-6))) for s in target.spacing_ijk_mm]
    fine = sub.with_spacing([s / f for s, f in zip(sub.spacing_ijk_mm, factors_ijk)]) if max(factors_ijk) > 1 else sub
    stack = np.stack([atlas.wm, atlas.gm, atlas.csf], axis=-1).astype(np.float32)
    image = sitk.GetImageFromArray(stack, isVector=True)
    atlas.geometry.apply_to_sitk(image)
    # An affine transform keeps its own fast path through the resampler; anything else goes through the field.
    exact = transform if _is_linear(transform) else field
    warped = sitk.GetArrayFromImage(sitk.Resample(image, _reference(fine), exact, sitk.sitkLinear, 0.0,
                                                  sitk.sitkVectorFloat32))
    inside = tuple(slice(a, b) for a, b in box)
    for n in range(3):
        values = np.clip(warped[..., n], 0.0, 1.0)
        if fine is not sub:
            values = block_mean(values, factors_ijk[::-1], sub.shape_kji)
        maps[n][inside] = values
    # The bundled atlas stores each fraction rounded to 1/255, so their sum reaches 1 + 1.5/255 in places; a
    # tissue's fractions sum to at most 1.
    total = maps[0] + maps[1] + maps[2]
    over = total > 1.0
    if over.any():
        for array in maps:
            array[over] /= total[over]
    return Tissue(*maps, target)


def _reference(geometry: Geometry):
    """An empty SimpleITK image on the grid (what sitk.Resample takes as the output grid)."""
    import SimpleITK as sitk

    reference = sitk.Image([int(n) for n in geometry.shape_kji[::-1]], sitk.sitkUInt8)
    geometry.apply_to_sitk(reference)
    return reference


def _is_linear(transform) -> bool:
    return transform.GetName() in ("AffineTransform", "Euler3DTransform", "Similarity3DTransform",
                                   "TranslationTransform", "Transform")


def _as_field(transform, target: Geometry):
    """The transform sampled on the target's extent at FIELD_SPACING_MM (one voxel of margin, so that linear
    interpolation covers every target voxel): (DisplacementFieldTransform, the field's grid, its (k, j, i, 3)
    displacements in LPS mm)."""
    import SimpleITK as sitk

    field_grid = target.with_spacing([max(FIELD_SPACING_MM, s) for s in target.spacing_ijk_mm])
    size_ijk = np.asarray(field_grid.shape_kji[::-1]) + 2
    origin = field_grid.index_kji_to_ras(np.array([-1.0, -1.0, -1.0]))
    field_grid = Geometry(tuple(size_ijk[::-1]), field_grid.spacing_ijk_mm, tuple(origin), field_grid.direction_ras)
    reference = _reference(field_grid)
    displacement = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, reference.GetSize(),
                                                     reference.GetOrigin(), reference.GetSpacing(),
                                                     reference.GetDirection())
    displacement_lps = sitk.GetArrayFromImage(displacement)
    return sitk.DisplacementFieldTransform(displacement), field_grid, displacement_lps


def _landing_box(atlas: Tissue, target: Geometry, field_grid: Geometry, displacement_lps: np.ndarray):
    """Index box [(k0, k1), ...] of the target voxels whose atlas points can hold tissue (within a field voxel of
    the atlas's non-empty box), or None when there are none."""
    from .geometry import mask_bounds

    occupied = (atlas.wm + atlas.gm + atlas.csf) > 0
    if not occupied.any():
        return None
    low, high = mask_bounds(occupied)
    lps_to_ras = np.array([-1.0, -1.0, 1.0])
    atlas_ras = field_grid.ras_grid() + displacement_lps * lps_to_ras
    index = atlas.geometry.ras_to_index_kji(atlas_ras)
    lands = np.all((index >= low - 1) & (index <= high), axis=-1)
    if not lands.any():
        return None
    f_low, f_high = mask_bounds(lands)
    corners = np.array([[k, j, i] for k in (f_low[0] - 1, f_high[0]) for j in (f_low[1] - 1, f_high[1])
                        for i in (f_low[2] - 1, f_high[2])], dtype=np.float64)
    target_index = target.ras_to_index_kji(field_grid.index_kji_to_ras(corners))
    lo = np.maximum(np.floor(target_index.min(axis=0)).astype(int), 0)
    hi = np.minimum(np.ceil(target_index.max(axis=0)).astype(int) + 1, target.shape_kji)
    if np.any(hi <= lo):
        return None
    return [(int(a), int(b)) for a, b in zip(lo, hi)]


# ---- stages ------------------------------------------------------------------------------------------------------
def _fixed_images(fixed: np.ndarray, head: np.ndarray, lesion: np.ndarray, grid: Geometry, typical, brain_level: float):
    """The patient's side of a registration on its coarse grid: (fixed image, metric mask without the lesion, image
    for the moments initialiser). The initialiser sees the lesion filled with the typical (`typical`: np.mean or
    np.median) intensity of the brain outside it (above brain_level): a hole or a CSF-labelled core would otherwise
    pull the initial centre away from the atlas's."""
    fixed_image = Volume(fixed.astype(np.float32), grid).to_sitk()
    mask_image = _metric_mask(lesion, head, grid)
    filled = fixed.copy()
    if lesion.any():
        filled[lesion] = float(typical(fixed[(fixed > brain_level) & ~lesion]))
    return fixed_image, mask_image, Volume(filled.astype(np.float32), grid).to_sitk()


def _affine_stage(init_image, fixed_image, mask_image, moving_image, metric, rigid_first: bool, progress, cancel):
    """Moments initialisation, then (optionally) rigid, then affine registration; returns an AffineTransform."""
    import SimpleITK as sitk

    initial = sitk.CenteredTransformInitializer(init_image, moving_image, sitk.Euler3DTransform(),
                                                sitk.CenteredTransformInitializerFilter.MOMENTS)
    if rigid_first:
        _register(fixed_image, mask_image, moving_image, initial, metric, None, [4, 2], [2.0, 1.0], 100,
                  sub_progress(progress, 0.0, 0.4, "rigid"), cancel, learning_rate=2.0, sampling=0.25)
    euler = sitk.Euler3DTransform(initial)  # older SimpleITK returns the initializer's result as a plain Transform
    affine = sitk.AffineTransform(3)
    affine.SetCenter(euler.GetCenter())
    affine.SetMatrix(euler.GetMatrix())
    affine.SetTranslation(euler.GetTranslation())
    # After a rigid stage the affine starts close: its two finer levels suffice.
    shrink, sigmas = ([2, 1], [1.0, 0.0]) if rigid_first else ([4, 2, 1], [2.0, 1.0, 0.0])
    _register(fixed_image, mask_image, moving_image, affine, metric, None, shrink, sigmas, 150,
              sub_progress(progress, 0.4 if rigid_first else 0.0, 1.0, "affine"), cancel, learning_rate=2.0,
              sampling=0.25)
    return affine


def _bspline_stage(fixed_image, mask_image, moving_image, affine, metric, progress, cancel, iterations: int,
                   gradient_tolerance: float, sampling: float = 0.1):
    """A cubic B-spline on the fixed image's domain (control points BSPLINE_CONTROL_SPACING_MM apart), optimised by
    L-BFGS-B after the affine transform, on the image at 2x then 1x the registration spacing."""
    import SimpleITK as sitk

    extent = np.asarray(fixed_image.GetSize()) * np.asarray(fixed_image.GetSpacing())
    mesh = [max(1, int(round(e / BSPLINE_CONTROL_SPACING_MM))) for e in extent]
    bspline = sitk.BSplineTransformInitializer(fixed_image, mesh, 3)
    _register(fixed_image, mask_image, moving_image, bspline, metric, affine, [2, 1], [1.0, 0.0], iterations, progress,
              cancel, deformable=True, sampling=sampling, gradient_tolerance=gradient_tolerance)
    return bspline


def _register(fixed_image, mask_image, moving_image, transform, metric, moving_initial, shrink, sigmas, iterations,
              progress, cancel, learning_rate: float = 1.0, sampling: float = 0.25,
              deformable: bool = False, gradient_tolerance: float = 1e-5):
    """One multi-resolution SimpleITK registration; the transform is optimised in place."""
    import SimpleITK as sitk

    method = sitk.ImageRegistrationMethod()
    metric(method)
    method.SetMetricFixedMask(mask_image)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentagePerLevel(
        [min(1.0, sampling * factor ** 1.5) for factor in shrink] if deformable else [sampling] * len(shrink),
        SAMPLING_SEED)
    method.SetInterpolator(sitk.sitkLinear)
    if not deformable:
        method.SetOptimizerAsRegularStepGradientDescent(learningRate=learning_rate, minStep=1e-3,
                                                        numberOfIterations=iterations, relaxationFactor=0.5,
                                                        gradientMagnitudeTolerance=1e-6)
        method.SetOptimizerScalesFromPhysicalShift()
        method.SetInitialTransform(transform, inPlace=True)
    else:
        # L-BFGS-B, unscaled: B-spline coefficients are all displacements in mm, alike in scale.
        method.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=gradient_tolerance, numberOfIterations=iterations,
                                    maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=2 * iterations,
                                    costFunctionConvergenceFactor=1e7)
        method.SetInitialTransform(transform, inPlace=True)
    if moving_initial is not None:
        method.SetMovingInitialTransform(moving_initial)
    method.SetShrinkFactorsPerLevel(list(shrink))
    method.SetSmoothingSigmasPerLevel(list(sigmas))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()

    levels = len(shrink)
    state = {"level": 0, "cancelled": False}

    def on_iteration():
        if is_cancelled(cancel):
            state["cancelled"] = True
            method.StopRegistration()
            return
        fraction = (state["level"] - 1 + min(method.GetOptimizerIteration() / iterations, 1.0)) / levels
        report(progress, fraction, f"level {state['level']}/{levels}")

    def on_level():
        state["level"] += 1
        if is_cancelled(cancel):
            state["cancelled"] = True
            method.StopRegistration()

    method.AddCommand(sitk.sitkIterationEvent, on_iteration)
    method.AddCommand(sitk.sitkMultiResolutionIterationEvent, on_level)
    method.Execute(fixed_image, moving_image)
    if state["cancelled"]:
        raise Cancelled("cancelled by the user")
    check_cancel(cancel)
    report(progress, 1.0, "")
    return method


# ---- helpers -----------------------------------------------------------------------------------------------------
def _synthetic_intensity(wm, gm, csf) -> np.ndarray:
    return (SYNTHETIC_INTENSITY["wm"] * wm + SYNTHETIC_INTENSITY["gm"] * gm
            + SYNTHETIC_INTENSITY["csf"] * csf).astype(np.float32)


def _check_lesion(lesion_mask, geometry: Geometry, what: str) -> np.ndarray:
    if lesion_mask is None:
        return np.zeros(geometry.shape_kji, bool)
    if isinstance(lesion_mask, Volume):
        if not lesion_mask.geometry.same_grid(geometry):
            raise InputError(f"the lesion mask's grid ({lesion_mask.geometry.describe()}) is not the {what}'s "
                             f"({geometry.describe()})")
        lesion_mask = lesion_mask.array
    lesion = np.asarray(lesion_mask)
    if lesion.shape != geometry.shape_kji:
        raise InputError(f"the lesion mask has shape {lesion.shape}, the {what}'s grid {geometry.shape_kji}")
    return lesion.astype(bool)


def _lesion_warnings(lesion: np.ndarray, brain: np.ndarray) -> List[str]:
    brain_voxels = int(brain.sum())
    share = float((lesion & brain).sum()) / max(brain_voxels, 1)
    if share > 0.5:
        raise InputError(f"the lesion mask covers {100 * share:.0f}% of the brain: too little healthy brain is left "
                         f"to register the atlas to")
    if share > 0.2:
        return [f"the lesion covers {100 * share:.0f}% of the brain: the registration inside it is an "
                f"extrapolation from its surroundings"]
    return []


def _registration_grid(geometry: Geometry, region: np.ndarray) -> Tuple[Geometry, Tuple[slice, ...]]:
    """The grid at REGISTRATION_SPACING_MM in the same orientation, cut to the region's box + BOX_MARGIN_MM; and
    that box's slices on the coarse grid (the whole grid when the region is empty)."""
    from .geometry import mask_bounds

    coarse = geometry.with_spacing(REGISTRATION_SPACING_MM)
    if not region.any():
        return coarse, tuple(slice(0, n) for n in coarse.shape_kji)
    low, high = mask_bounds(region)
    corners = np.array([[k, j, i] for k in (low[0] - 0.5, high[0] - 0.5) for j in (low[1] - 0.5, high[1] - 0.5)
                        for i in (low[2] - 0.5, high[2] - 0.5)])
    index = coarse.ras_to_index_kji(geometry.index_kji_to_ras(corners))
    margin = BOX_MARGIN_MM / REGISTRATION_SPACING_MM
    lo = np.maximum(np.floor(index.min(axis=0) - margin).astype(int), 0)
    hi = np.minimum(np.ceil(index.max(axis=0) + margin).astype(int) + 1, coarse.shape_kji)
    box = [(int(a), int(b)) for a, b in zip(lo, hi)]
    return coarse.sub_box(box), tuple(slice(a, b) for a, b in box)


def _mask_on_grid(mask: np.ndarray, source: Geometry, target: Geometry, level: float = 0.05) -> np.ndarray:
    """A boolean mask carried to another grid: the target voxels whose overlap with the mask exceeds `level`
    (the default: any real overlap, what a lesion needs)."""
    if not mask.any():
        return np.zeros(target.shape_kji, bool)
    if source.same_grid(target):
        return mask.astype(bool).copy()
    return resample_fraction(mask.astype(np.float32), source, target) > level


def _metric_mask(lesion_coarse: np.ndarray, region: np.ndarray, grid: Geometry):
    """The metric's fixed mask: the patient's head region grown by 6 mm (so the brain's outline counts, and the
    empty corners of the box cost nothing), without the lesion grown by LESION_MARGIN_MM."""
    grown = _grow(lesion_coarse, int(round(LESION_MARGIN_MM / REGISTRATION_SPACING_MM)))
    inside = _grow(region, max(1, int(round(6.0 / REGISTRATION_SPACING_MM))))
    return Volume((inside & ~grown).astype(np.uint8), grid).to_sitk()


def _grow(mask: np.ndarray, voxels: int) -> np.ndarray:
    from scipy.ndimage import binary_dilation

    if voxels <= 0:
        return mask
    return binary_dilation(mask, iterations=voxels)


def _robust_scale(array: np.ndarray) -> np.ndarray:
    positive = array[array > 0]
    top = float(np.percentile(positive, 99.5)) if positive.size else float(array.max())
    return np.clip(array / max(top, 1e-12), 0.0, 1.5).astype(np.float32)


def _foreground(scaled: np.ndarray) -> np.ndarray:
    """Head/brain foreground of a scaled T1: above T1_FOREGROUND_LEVEL, holes filled."""
    from scipy.ndimage import binary_fill_holes

    return binary_fill_holes(scaled > T1_FOREGROUND_LEVEL)


def _refuse_skull(foreground: np.ndarray, grid: Geometry) -> None:
    """InputError when the foreground looks like a head with its skull rather than a stripped brain: more than
    SKULL_VOLUME_L, or longer than SKULL_EXTENT_MM along a RAS axis."""
    from scipy.ndimage import binary_closing, binary_fill_holes

    # A closing of one voxel bridges narrow dark gaps (bone, CSF) between a brain and its scalp, so that the
    # filled volume counts the whole head; a stripped brain's outline barely changes.
    closed = binary_fill_holes(binary_closing(foreground, iterations=1) | foreground)
    volume_l = float(closed.sum()) * grid.voxel_volume_mm3() / 1e6
    ras = grid.index_kji_to_ras(np.argwhere(closed)) if closed.any() else np.zeros((1, 3))
    extent = float((ras.max(axis=0) - ras.min(axis=0)).max()) + max(grid.spacing_ijk_mm)
    if volume_l > SKULL_VOLUME_L or extent > SKULL_EXTENT_MM:
        raise InputError(f"the image looks like a T1 with the skull: skull-strip it first (e.g. HD-BET or "
                         f"SynthStrip) and give the stripped T1 (its foreground is {volume_l:.1f} l and "
                         f"{extent:.0f} mm long; a stripped brain is 1.0-2.2 l and under 200 mm)")


def _quality_ncc(fixed: np.ndarray, lesion_coarse: np.ndarray, region: np.ndarray, grid: Geometry, moving_image,
                 transform) -> float:
    """NCC of the fixed image and the moving image through `transform`, on the registration grid, over the region
    grown by 6 mm, outside the lesion grown by LESION_MARGIN_MM (the metric's mask)."""
    import SimpleITK as sitk

    exact = transform if _is_linear(transform) else _as_field(transform, grid)[0]
    warped = sitk.GetArrayFromImage(sitk.Resample(moving_image, _reference(grid), exact, sitk.sitkLinear, 0.0,
                                                  sitk.sitkFloat32))
    lesion_grown = _grow(lesion_coarse, int(round(LESION_MARGIN_MM / REGISTRATION_SPACING_MM)))
    inside = _grow(region, max(1, int(round(6.0 / REGISTRATION_SPACING_MM)))) & ~lesion_grown
    if inside.sum() < 10:
        return 0.0
    return ncc(fixed[inside], warped[inside])
