"""Clinical target volumes, as the PREDICT-GBM benchmark compares them (docs/model.md).

- Standard plan: the tumor core (enhancing tumor + necrosis) grown by 15 mm, measured in mm on any grid (an exact
  Euclidean distance transform with the voxel spacing, so anisotropic grids are handled), clipped to the brain.
- Model plan: the brain voxels of highest predicted concentration, taken until the plan has the standard plan's
  volume (equal volume, so the two are compared on what they cover, not on how much they irradiate).
- Iso plan (optional): the brain voxels where the predicted concentration reaches a chosen level.
"The brain" is GM + WM with holes filled (ventricles and other enclosed CSF count), as the benchmark's brain mask.
A plan is judged by the share of later tumor growth it covers (``coverage``).
"""
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Union

import numpy as np

from .constants import BRAIN_FRACTION_THRESHOLD, STANDARD_MARGIN_MM
from .errors import InputError
from .geometry import Geometry, mask_bounds, mask_box

PLAN_LABEL = 1


def planning_brain_mask(wm: np.ndarray, gm: np.ndarray) -> np.ndarray:
    """GM + WM (fraction >= 0.1) with enclosed holes filled, in 3-D."""
    from scipy.ndimage import label

    brain = (np.asarray(wm) + np.asarray(gm)) >= BRAIN_FRACTION_THRESHOLD
    if not np.any(brain):
        return brain
    # Filled in the brain's bounding box: everything outside it is background that reaches the image border, so a
    # background voxel on the box's faces does too; the holes are the same as on the whole image, for a fraction of
    # the work on a brain image with margins (every personalisation). A hole is a face-connected background
    # component that touches no face of the box: what scipy's binary_fill_holes fills, found by one labelling pass
    # instead of its iterated dilation (about 5x faster on a 1 mm brain).
    box = mask_box(brain)
    background, _ = label(~brain[box])
    faces = [background.take(end, axis=axis) for axis in range(3) for end in (0, -1)]
    outside = np.unique(np.concatenate([f.ravel() for f in faces]))
    holes = (background > 0) & ~np.isin(background, outside)
    brain[box] |= holes
    return brain


def distance_mm(mask: np.ndarray, geometry: Geometry, max_mm: Optional[float] = None,
                where: Optional[np.ndarray] = None) -> np.ndarray:
    """Euclidean distance (mm) from every voxel to the nearest voxel of the mask (0 inside it), with the voxel spacing
    (anisotropic grids included).

    max_mm: only distances up to max_mm are needed; the transform then runs in the mask's bounding box grown by
    max_mm (exact there, since every mask voxel is inside it) and voxels outside the box get +inf. On a 1 mm brain
    and a small tumor this is ~20x less work than the whole grid. where: a bool mask of the voxels whose distance is
    needed; the box is grown to hold them too (the others may be +inf). Raises InputError for an empty mask.
    """
    from scipy.ndimage import distance_transform_edt

    mask = np.asarray(mask, bool)
    if not np.any(mask):
        raise InputError("cannot measure a margin around an empty region")
    if max_mm is None and where is None:
        return distance_transform_edt(~mask, sampling=geometry.spacing_kji_mm)
    low, high = mask_bounds(mask)
    if max_mm is not None:
        # one voxel more than the margin: a voxel at exactly max_mm must be inside the box
        grow = np.ceil(float(max_mm) / np.asarray(geometry.spacing_kji_mm)).astype(int) + 1
        low, high = low - grow, high + grow
    if where is not None and np.any(where):
        where_low, where_high = mask_bounds(np.asarray(where, bool))
        low, high = np.minimum(low, where_low), np.maximum(high, where_high)
    low, high = np.maximum(low, 0), np.minimum(high, mask.shape)
    box = tuple(slice(a, b) for a, b in zip(low, high))
    out = np.full(mask.shape, np.inf)
    out[box] = distance_transform_edt(~mask[box], sampling=geometry.spacing_kji_mm)
    return out


def standard_plan(core: np.ndarray, brain: np.ndarray, geometry: Geometry,
                  margin_mm: float = STANDARD_MARGIN_MM) -> np.ndarray:
    """The core grown by margin_mm (in mm) and clipped to the brain, as a bool mask."""
    return (distance_mm(core, geometry, max_mm=margin_mm) <= margin_mm + 1e-6) & np.asarray(brain, bool)


def model_plan(concentration: np.ndarray, brain: np.ndarray, voxels: int,
               distance_to_tumor_mm: Union[None, np.ndarray, Callable[[np.ndarray], np.ndarray]] = None) -> np.ndarray:
    """The `voxels` brain voxels of highest concentration, so the volume is exact.

    Ties at the plan's edge (a map that is 0, or rounded, over part of the brain) go to the voxels nearest the tumor
    when distance_to_tumor_mm is given, else by voxel order: without it, a plan larger than the map's support would
    be filled from the first slices of the image. distance_to_tumor_mm: the distances (mm, an array on the grid), or
    a function that takes a bool mask of the tied voxels and returns an array holding at least their distances (so
    the distance transform runs only when there are ties, and only as far as they reach).
    """
    brain = np.asarray(brain, bool)
    shape = np.shape(concentration)
    candidates = np.flatnonzero(brain)
    values = np.asarray(concentration, np.float64).ravel()[candidates]
    voxels = int(min(max(voxels, 0), candidates.size))
    plan = np.zeros(int(np.prod(shape)), bool)
    if voxels == 0:
        return plan.reshape(shape)
    # The voxels-th largest value, by partition (linear time; a full sort of a 1 mm brain takes ~0.7 s), among the
    # positive values when there are enough of them: the same value, from the tumor's neighbourhood instead of the
    # whole brain (a 1 mm brain's partition took 0.15 s of every personalisation).
    positive = values > 0
    pool = values[positive] if np.count_nonzero(positive) >= voxels else values
    edge = np.partition(pool, pool.size - voxels)[pool.size - voxels]
    above = candidates[values > edge]
    tied = candidates[values == edge]
    plan[above] = True
    needed = voxels - above.size
    if needed == tied.size:
        plan[tied] = True
    elif distance_to_tumor_mm is None:
        plan[tied[:needed]] = True
    else:
        if callable(distance_to_tumor_mm):
            tied_mask = np.zeros(plan.size, bool)
            tied_mask[tied] = True
            distance = distance_to_tumor_mm(tied_mask.reshape(shape))
        else:
            distance = distance_to_tumor_mm
        tied_distance = np.asarray(distance, np.float64).ravel()[tied]
        plan[tied[np.argsort(tied_distance, kind="stable")[:needed]]] = True
    return plan.reshape(shape)


def iso_plan(concentration: np.ndarray, brain: np.ndarray, level: float) -> np.ndarray:
    if not 0 < level < 1:
        raise InputError(f"iso-concentration level must be in (0, 1), got {level}")
    return (np.asarray(concentration) >= level) & np.asarray(brain, bool)


def coverage(plan: np.ndarray, growth: np.ndarray) -> float:
    """Share of the growth mask's voxels inside the plan (nan when there is no growth)."""
    growth = np.asarray(growth, bool)
    total = int(growth.sum())
    return float("nan") if total == 0 else float(np.logical_and(plan, growth).sum()) / total


@dataclass
class TargetPlans:
    """Label maps (uint8, 1 inside) on the tissue grid and their volumes in cm^3."""

    geometry: Geometry
    standard: np.ndarray
    model: np.ndarray
    iso: Optional[np.ndarray] = None
    iso_level: Optional[float] = None
    margin_mm: float = STANDARD_MARGIN_MM
    notes: list = field(default_factory=list)

    @property
    def volumes_cm3(self) -> Dict[str, float]:
        voxel_cm3 = self.geometry.voxel_volume_mm3() / 1000.0
        out = {"standard_cm3": round(float(self.standard.sum()) * voxel_cm3, 3),
               "model_cm3": round(float(self.model.sum()) * voxel_cm3, 3)}
        if self.iso is not None:
            out["iso_cm3"] = round(float(self.iso.sum()) * voxel_cm3, 3)
        return out

    def to_dict(self) -> Dict:
        out = dict(self.volumes_cm3, margin_mm=self.margin_mm)
        if self.iso_level is not None:
            out["iso_level"] = self.iso_level
        return out


def make_plans(tissue, concentration: np.ndarray, core: np.ndarray, visible: Optional[np.ndarray] = None,
               margin_mm: float = STANDARD_MARGIN_MM, iso_level: Optional[float] = None) -> TargetPlans:
    """Standard, model (equal volume) and optional iso plans on the tissue's grid.

    core: the observed tumor core (bool, tissue grid); when it is empty (a small tumor with no visible core) the
    visible tumor is grown instead, and a note says so.
    """
    brain = planning_brain_mask(tissue.wm, tissue.gm)
    notes = []
    core = np.asarray(core, bool)
    if not np.any(core):
        if visible is None or not np.any(visible):
            raise InputError("no tumor core or visible tumor to plan around")
        core = np.asarray(visible, bool)
        notes.append("the observation has no tumor core: the standard plan grows the visible tumor instead")
    standard = standard_plan(core, brain, tissue.geometry, margin_mm)
    model = model_plan(concentration, brain, int(standard.sum()),
                       lambda tied: distance_mm(core, tissue.geometry, where=tied))
    iso = None if iso_level is None else iso_plan(concentration, brain, iso_level)
    as_labels = lambda mask: None if mask is None else mask.astype(np.uint8) * PLAN_LABEL  # noqa: E731
    return TargetPlans(tissue.geometry, as_labels(standard), as_labels(model), as_labels(iso), iso_level, margin_mm,
                       notes)


def blurred_label_scores(visible: np.ndarray, core: np.ndarray, geometry: Geometry,
                         sigma_mm: float = 3.0) -> np.ndarray:
    """A model-free ranking of voxels: the labels weighted 0.9 (core) / 0.45 (rest of the visible tumor), blurred by a
    Gaussian of sigma_mm. Ranked to a plan of a given volume, it is what a model has to beat."""
    from scipy.ndimage import gaussian_filter

    weighted = np.where(np.asarray(core) > 0.5, 0.9, np.where(np.asarray(visible) > 0.5, 0.45, 0.0))
    # Not cut at the default 4 sigma (12 mm): the plans it is ranked into reach 15 mm beyond the core and more.
    return gaussian_filter(weighted.astype(np.float64), [sigma_mm / s for s in geometry.spacing_kji_mm],
                           truncate=(STANDARD_MARGIN_MM + 25.0) / sigma_mm)


def later_growth_coverage(tissue, plans: TargetPlans, growth: np.ndarray, visible: np.ndarray, core: np.ndarray,
                          true_concentration: Optional[np.ndarray] = None) -> Dict[str, float]:
    """Share of later growth (a bool mask on the tissue grid) covered by the standard plan, the model plan, the
    blurred-label plan and (when given) the true concentration's plan, all of the standard plan's volume."""
    brain = planning_brain_mask(tissue.wm, tissue.gm)
    voxels = int(plans.standard.sum())
    growth = np.asarray(growth, bool) & brain
    distance = distance_mm(np.asarray(visible) > 0.5, tissue.geometry)
    scores = blurred_label_scores(visible, core, tissue.geometry)
    out = {"standard": coverage(plans.standard > 0, growth), "model": coverage(plans.model > 0, growth),
           "blurred_labels": coverage(model_plan(scores, brain, voxels, distance), growth)}
    if true_concentration is not None:
        out["true_parameters"] = coverage(model_plan(true_concentration, brain, voxels, distance), growth)
    return out
