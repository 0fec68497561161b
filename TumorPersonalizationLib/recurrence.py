"""Recurrence coverage: how much of a later tumor each target plan would have covered.

A follow-up segmentation of the same patient (BraTS labels: 1 necrotic, 2 edema, 3 enhancing by default; any grid
that overlaps the tissue's) is resampled by nearest label onto the tissue's grid, and for each plan (standard, model,
iso when made) the share of the recurrence inside it is computed:

    coverage = recurrence voxels inside the plan / recurrence voxels inside the tissue image

both counted on the tissue's grid, for the whole recurrence ("all": every non-zero label) and for its enhancing part
("enhancing"). This is the score of the PREDICT-GBM benchmark (docs/model.md, "Target plans").

Recurrence voxels outside the brain (in CSF or background of the tissue map, where no plan reaches since plans are
clipped to the brain) still count in the denominator: a plan that misses them misses them, and a registration or
segmentation that puts the recurrence outside the brain should lower every plan's score alike rather than be hidden.
Their share is reported ("outside_brain_share") so a low score can be read. Recurrence voxels outside the tissue
image cannot be placed on its grid and are left out; a note says how much was left out when any was.

Errors (InputError, one line naming the file or map): a recurrence that is not a label map, holds labels other than
the three given, is empty, or does not overlap the tissue image. An empty enhancing part is not an error: its
coverage is None and a note says why.
"""
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import InputError
from .geometry import Geometry, Volume
from .observation import Observation, SegmentationLabels

PLAN_KEYS = ("standard", "model", "iso")
# A note is added when at least this share of the recurrence (its voxel centres) falls outside the tissue image.
OUTSIDE_IMAGE_NOTE_SHARE = 0.001


def _labels(labels) -> SegmentationLabels:
    if labels is None:
        return SegmentationLabels()
    return labels if isinstance(labels, SegmentationLabels) else SegmentationLabels(*labels)


def check_recurrence_labels(volume: Volume, labels=None, name: str = "recurrence segmentation") -> Volume:
    """The recurrence as an int16 label map, checked: whole-number labels, only 0 and the three given labels, not
    empty. labels: SegmentationLabels or (NECROTIC, EDEMA, ENHANCING); None for BraTS 2023 (1 2 3). name: how the
    messages call it (e.g. the file). Raises InputError."""
    labels = _labels(labels)
    array = np.asarray(volume.array)
    if array.ndim != 3:
        raise InputError(f"{name} must be a scalar 3-D image, got array shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise InputError(f"{name} contains NaN or infinite voxels")
    if np.issubdtype(array.dtype, np.floating) and not np.all(array == np.round(array)):
        raise InputError(f"{name} must hold whole-number labels (a concentration or probability map?)")
    found = {int(v) for v in np.unique(array)}
    unknown = sorted(found - {0, *labels.all})
    if unknown:
        raise InputError(f"{name} has labels {unknown[:10]} that are not among NECROTIC EDEMA ENHANCING = "
                         f"{list(labels.all)} (set them with --recurrence-labels)")
    if found <= {0}:
        raise InputError(f"{name} is empty: no voxel carries a tumor label")
    return Volume(array.astype(np.int16), volume.geometry)


def load_recurrence(path: Union[str, Path], labels=None) -> Volume:
    """Read and check a recurrence segmentation (see check_recurrence_labels); InputError naming the file when it is
    missing, unreadable or not a valid label map."""
    return check_recurrence_labels(Volume.load(path), labels, f"recurrence segmentation {path}")


def _as_label_volume(recurrence, labels) -> Tuple[Volume, SegmentationLabels]:
    if isinstance(recurrence, Observation):
        if recurrence.kind != "segmentation":
            raise InputError("a recurrence must be given as a segmentation (label map), not a concentration map")
        return check_recurrence_labels(recurrence.volume, recurrence.labels), recurrence.labels
    if isinstance(recurrence, Volume):
        labels = _labels(labels)
        return check_recurrence_labels(recurrence, labels), labels
    raise InputError("a recurrence must be an Observation (segmentation) or a Volume of labels")


def _outside_image_share(volume: Volume, target: Geometry) -> float:
    """Share of the recurrence's voxel centres that fall outside the target image."""
    index = np.argwhere(volume.array != 0)
    inside = target.ras_to_index_kji(volume.geometry.index_kji_to_ras(index))
    within = np.all((inside >= -0.5) & (inside <= np.asarray(target.shape_kji) - 0.5), axis=1)
    return 1.0 - float(within.mean())


def recurrence_on_grid(recurrence: Union[Observation, Volume], geometry: Geometry, labels=None):
    """The recurrence's labels on `geometry` (nearest label; int16), its SegmentationLabels and the share of it left
    outside that image. InputError for an invalid or empty recurrence, or one that does not overlap the image."""
    from .observation import describe_extent, nearest_labels

    volume, labels = _as_label_volume(recurrence, labels)
    source = volume.geometry
    gridded = volume.array if source.same_grid(geometry) else nearest_labels(volume.array, source, geometry)
    if not np.any(gridded):
        raise InputError("the recurrence segmentation does not overlap the tissue image in space: recurrence spans "
                         f"{describe_extent(source)}, tissue spans {describe_extent(geometry)} (RAS mm)")
    outside = 0.0 if source.same_grid(geometry) else _outside_image_share(volume, geometry)
    return np.asarray(gridded, np.int16), labels, outside


def _plan_masks(plans) -> Dict[str, Optional[np.ndarray]]:
    if isinstance(plans, Mapping):
        return {key: plans.get(key) for key in PLAN_KEYS}
    return {key: getattr(plans, key, None) for key in PLAN_KEYS}


def _coverage_block(mask: np.ndarray, masks: Dict[str, Optional[np.ndarray]], voxel_cm3: float,
                    brain: Optional[np.ndarray]) -> Dict:
    total = int(np.count_nonzero(mask))
    block = {key: (None if plan is None else float(np.count_nonzero(mask & (np.asarray(plan) > 0))) / total)
             for key, plan in masks.items()}
    block["volume_cm3"] = round(total * voxel_cm3, 3)
    if brain is not None:
        block["outside_brain_share"] = float(np.count_nonzero(mask & ~brain)) / total
    return block


def recurrence_coverage(plans, recurrence: Union[Observation, Volume], geometry: Optional[Geometry] = None,
                        labels: Union[None, SegmentationLabels, Sequence[int]] = None,
                        brain: Optional[np.ndarray] = None) -> Dict:
    """Share of a later tumor inside each target plan.

    plans: a TargetPlans (plans.py), or a mapping {"standard", "model", "iso": mask or None} of arrays on `geometry`
    (a plan is the voxels > 0). recurrence: the follow-up segmentation, an Observation of kind "segmentation" (its
    labels are used) or a Volume of labels (on any grid overlapping the plans'). geometry: the plans' grid (default
    plans.geometry). labels: (NECROTIC, EDEMA, ENHANCING) of a Volume, default BraTS 2023 (1 2 3). brain: optional
    bool mask on the grid (the planning brain) for the share of the recurrence outside it.

    Returns {"all": {"standard": f, "model": f, "iso": f or None, "volume_cm3": v[, "outside_brain_share": s]},
    "enhancing": the same for the enhancing label alone, or None when the recurrence has no enhancing voxel,
    "labels": [NECROTIC, EDEMA, ENHANCING], "notes": [...]}; f = recurrence voxels inside the plan / recurrence
    voxels inside the image, counted on the plans' grid (see the module's description; voxels outside the brain
    count). Raises InputError for an invalid or empty recurrence, or one that does not overlap the plans' image.
    """
    geometry = geometry if geometry is not None else getattr(plans, "geometry", None)
    if geometry is None:
        raise InputError("recurrence_coverage needs the plans' geometry")
    masks = _plan_masks(plans)
    for key, plan in masks.items():
        if plan is not None and tuple(np.shape(plan)) != tuple(geometry.shape_kji):
            raise InputError(f"the {key} plan has shape {np.shape(plan)}, expected {geometry.shape_kji}")
    gridded, labels, outside = recurrence_on_grid(recurrence, geometry, labels)
    brain = None if brain is None else np.asarray(brain, bool)
    voxel_cm3 = geometry.voxel_volume_mm3() / 1000.0
    notes = []
    if outside >= OUTSIDE_IMAGE_NOTE_SHARE:
        notes.append(f"{100 * outside:.1f} % of the recurrence lies outside the tissue image and is not counted")
    everything = gridded != 0
    enhancing = gridded == labels.enhancing
    out = {"all": _coverage_block(everything, masks, voxel_cm3, brain), "enhancing": None,
           "labels": list(labels.all), "notes": notes}
    if np.any(enhancing):
        out["enhancing"] = _coverage_block(enhancing, masks, voxel_cm3, brain)
    else:
        notes.append(f"the recurrence has no enhancing voxel (label {labels.enhancing}): no enhancing coverage")
    return out


def add_recurrence(result, recurrence: Union[Observation, Volume],
                   labels: Union[None, SegmentationLabels, Sequence[int]] = None) -> Dict:
    """Compute the coverage of a later tumor by a personalisation's plans (recurrence_coverage on result.plans, the
    brain the plans were clipped to when the result carries its tissue) and store it on result.recurrence, whence
    it reaches parameters.json, the report figure and the Slicer results table. Returns the coverage dict; raises
    InputError as recurrence_coverage."""
    brain = None
    if getattr(result, "tissue", None) is not None:
        from .plans import planning_brain_mask

        brain = planning_brain_mask(result.tissue.wm, result.tissue.gm)
    coverage = recurrence_coverage(result.plans, recurrence, result.plans.geometry, labels, brain)
    result.recurrence = coverage
    return coverage


def coverage_summary(coverage: Optional[Dict]) -> str:
    """One line for pictures and logs: 'recurrence 12.3 cm^3 covered: standard 0.85, model 0.91 | enhancing ...'."""
    if not coverage:
        return ""
    parts = []
    for part in ("all", "enhancing"):
        block = coverage.get(part)
        if not block:
            continue
        shares = ", ".join(f"{key} {block[key]:.2f}" for key in PLAN_KEYS if block.get(key) is not None)
        name = "recurrence" if part == "all" else "enhancing"
        parts.append(f"{name} {block['volume_cm3']:.1f} cm^3 covered: {shares}")
    return " | ".join(parts)
