"""Clinical target volumes, as the PREDICT-GBM benchmark compares them (DESIGN.md).

- Standard plan: the tumor core (enhancing tumor + necrosis) grown by 15 mm, measured in mm on any grid (an exact
  Euclidean distance transform with the voxel spacing, so anisotropic grids are handled), clipped to the brain.
- Model plan: the brain voxels of highest predicted concentration, taken until the plan has the standard plan's
  volume (equal volume, so the two are compared on what they cover, not on how much they irradiate).
- Iso plan (optional): the brain voxels where the predicted concentration reaches a chosen level.
"The brain" is GM + WM with holes filled (ventricles and other enclosed CSF count), as the benchmark's brain mask.
A plan is judged by the share of later tumor growth it covers (``coverage``).
"""
from dataclasses import dataclass, field
from typing import Dict, Optional

import numpy as np

from .constants import BRAIN_FRACTION_THRESHOLD, STANDARD_MARGIN_MM
from .errors import InputError
from .geometry import Geometry

PLAN_LABEL = 1


def planning_brain_mask(wm: np.ndarray, gm: np.ndarray) -> np.ndarray:
    """GM + WM (fraction >= 0.1) with enclosed holes filled, in 3-D."""
    from scipy.ndimage import binary_fill_holes

    return binary_fill_holes((np.asarray(wm) + np.asarray(gm)) >= BRAIN_FRACTION_THRESHOLD)


def distance_mm(mask: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Euclidean distance (mm) from every voxel to the nearest voxel of the mask (0 inside it)."""
    from scipy.ndimage import distance_transform_edt

    if not np.any(mask):
        raise InputError("cannot measure a margin around an empty region")
    return distance_transform_edt(~np.asarray(mask, bool), sampling=geometry.spacing_kji_mm)


def standard_plan(core: np.ndarray, brain: np.ndarray, geometry: Geometry,
                  margin_mm: float = STANDARD_MARGIN_MM) -> np.ndarray:
    """The core grown by margin_mm (in mm) and clipped to the brain, as a bool mask."""
    return (distance_mm(core, geometry) <= margin_mm + 1e-6) & np.asarray(brain, bool)


def model_plan(concentration: np.ndarray, brain: np.ndarray, voxels: int,
               distance_to_tumor_mm: Optional[np.ndarray] = None) -> np.ndarray:
    """The `voxels` brain voxels of highest concentration, so the volume is exact. Ties (a map that is 0, or rounded,
    over part of the brain) go to the voxels nearest the tumor when distance_to_tumor_mm is given, else by voxel
    order: without it, a plan larger than the map's support would be filled from the first slices of the image."""
    brain = np.asarray(brain, bool)
    values = np.where(brain, np.asarray(concentration, np.float64), -np.inf).ravel()
    voxels = int(min(max(voxels, 0), int(brain.sum())))
    plan = np.zeros(values.size, bool)
    if voxels > 0:
        if distance_to_tumor_mm is None:
            order = np.argsort(-values, kind="stable")
        else:
            order = np.lexsort((np.asarray(distance_to_tumor_mm, np.float64).ravel(), -values))
        plan[order[:voxels]] = True
    return plan.reshape(np.shape(concentration))


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
    distance = distance_mm(core, tissue.geometry)
    standard = (distance <= margin_mm + 1e-6) & brain
    model = model_plan(concentration, brain, int(standard.sum()), distance)
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
