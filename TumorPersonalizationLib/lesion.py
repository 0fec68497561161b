"""The tissue of a tumor-bearing brain made healthy again inside the lesion, so that the model can grow a tumor there.

A patient's own tissue segmentation is of the brain *with* its tumor: segmentation tools label a dark necrotic or
enhancing core as CSF (or cut it out of the brain), and oedema as grey matter. Tumor cells cannot live in CSF or
background in the model (no flux into CSF), so the fit then explains the tumor from its rim only (docs/model.md, "A
tumor-bearing brain": NCC 0.13 with the core as CSF, against 0.99 with healthy labels). The field's answer (the seed
paper's preprocessing, PREDICT-GBM) is healthy tissue from an atlas registered to the patient with the lesion kept out
of the metric.

The lesion is the tumor's visible part (every segmentation label, or c >= the edema threshold for a concentration)
grown by LESION_GROW_MM, so the partial-volume rim a segmentation tool leaves around it is refilled too. Inside the
lesion the WM/GM/CSF fractions come from one of:
- "atlas": the bundled atlas registered to the given tissue (registration.register_atlas_to_tissue, lesion masked
  out of its metric). Where the atlas has CSF in the lesion (a ventricle the tumor abuts) it stays CSF. When the
  registration fails its own quality check, the lesion is refilled from its surroundings instead, with a warning.
- "surround": the WM/GM fractions of the nearest healthy brain voxel outside the lesion (no CSF).
- "keep": nothing changes (the given tissue is taken as healthy).
Voxels outside the lesion never change, and neither do lesion voxels outside the head: the convex hull of the given
tissue's voxels (WM+GM+CSF >= 0.5). So a core cut out of the brain is refilled, at its surface too, while a "tumor"
drawn in the background (a misaligned segmentation) stays outside the brain and is refused as such.
"""
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np

from .constants import BRAIN_FRACTION_THRESHOLD
from .errors import InputError
from .geometry import Geometry, mask_box
from .progress import check_cancel, report, sub_progress
from .tissue import Tissue

LESION_TISSUE_MODES = ("atlas", "surround", "keep")
DEFAULT_LESION_TISSUE = "atlas"
# The visible tumor is grown by this margin (mm) to form the lesion: a segmentation tool's partial-volume rim of
# darkened tissue is 1-2 voxels wide around a tumor.
LESION_GROW_MM = 3.0
# A voxel of the surroundings counts as healthy brain, to copy from, above this WM+GM fraction.
SURROUND_BRAIN_FRACTION = 0.5


@dataclass
class LesionTissue:
    """The tissue the model runs on and how it was made.

    tissue: the refilled tissue (the given one where nothing changed). lesion: bool (k, j, i) mask of the voxels
    that may have changed. source: "atlas", "surround" or "keep" (what filled the lesion). refilled_cm3: volume of
    the voxels whose fractions changed. registration_quality: the atlas registration's own agreement (None when no
    registration ran). warnings: what the user is told."""

    tissue: Tissue
    lesion: np.ndarray
    source: str
    refilled_cm3: float
    registration_quality: Optional[float] = None
    runtime_s: float = 0.0
    warnings: List[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"source": self.source, "lesion_cm3": round(self.lesion_cm3, 3),
                "refilled_cm3": round(self.refilled_cm3, 3),
                "registration_quality": (None if self.registration_quality is None
                                         else round(float(self.registration_quality), 4)),
                "runtime_s": round(self.runtime_s, 3)}

    @property
    def lesion_cm3(self) -> float:
        return float(self.lesion.sum()) * self.tissue.geometry.voxel_volume_mm3() / 1000.0


def lesion_mask(visible: np.ndarray, geometry: Geometry, grow_mm: float = LESION_GROW_MM) -> np.ndarray:
    """The lesion on a grid: the visible tumor (a bool or [0, 1] (k, j, i) map on `geometry`) grown by grow_mm
    millimetres (Euclidean, with the voxel spacing). InputError for an empty tumor or a negative
    margin."""
    from scipy.ndimage import distance_transform_edt

    if grow_mm < 0:
        raise InputError(f"the lesion margin must be >= 0 mm, got {grow_mm}")
    visible = np.asarray(visible) > 0.5
    if not np.any(visible):
        raise InputError("the tumor is empty: no lesion to refill")
    spacing = np.asarray(geometry.spacing_kji_mm)
    margin = np.ceil(grow_mm / spacing).astype(int) + 1
    box = mask_box(visible, margin)
    lesion = np.zeros(visible.shape, bool)
    lesion[box] = distance_transform_edt(~visible[box], sampling=spacing) <= grow_mm + 1e-6
    return lesion


def refill_lesion(tissue: Tissue, visible: np.ndarray, mode: str = DEFAULT_LESION_TISSUE,
                  grow_mm: float = LESION_GROW_MM, progress=None, cancel=None) -> LesionTissue:
    """The tissue with its lesion refilled by healthy tissue (see the module's docstring for the sources).

    tissue: the patient's WM/GM/CSF. visible: the visible tumor on the tissue's grid ((k, j, i), bool or [0, 1]).
    mode: "atlas", "surround" or "keep". grow_mm: the lesion's margin around the visible tumor (mm).
    progress(fraction, message), cancel: see progress.py. Raises InputError for an unknown mode or an empty tumor,
    progress.Cancelled when cancelled.
    """
    import time

    started = time.perf_counter()
    if mode not in LESION_TISSUE_MODES:
        raise InputError(f"unknown lesion tissue {mode!r}: choose one of {', '.join(LESION_TISSUE_MODES)}")
    lesion = lesion_mask(visible, tissue.geometry, grow_mm)
    if mode != "keep":
        lesion &= inside_head(tissue, lesion)
    if mode == "keep":
        return LesionTissue(tissue, lesion, "keep", 0.0, runtime_s=time.perf_counter() - started)

    warnings = []
    quality = None
    source = mode
    filled = None
    if mode == "atlas":
        from .registration import register_atlas_to_tissue

        report(progress, 0.0, "registering the atlas to the tissue")
        registration = register_atlas_to_tissue(tissue, lesion, progress=sub_progress(progress, 0.0, 0.95, "atlas"),
                                                cancel=cancel)
        quality = float(registration.quality)
        warnings += list(getattr(registration, "warnings", []))
        if registration.passed:
            filled = _from_atlas(tissue, registration.tissue, lesion)
        else:
            source = "surround"
            warnings.append(f"the atlas registration failed its quality check ({quality:.2f}): the lesion is "
                            f"refilled from the healthy tissue around it instead")
    check_cancel(cancel)
    if filled is None:
        filled = _from_surround(tissue, lesion)

    changed = np.zeros(lesion.shape, bool)
    for before, after in zip((tissue.wm, tissue.gm, tissue.csf), filled):
        changed |= np.abs(before - after) > 1e-6
    refilled_cm3 = float(changed.sum()) * tissue.geometry.voxel_volume_mm3() / 1000.0
    result = Tissue(*filled, tissue.geometry)
    what = "the registered atlas" if source == "atlas" else "the healthy tissue around it"
    warnings.append(f"lesion tissue refilled: {refilled_cm3:.1f} cm^3 of the {_cm3(lesion, tissue):.1f} cm^3 lesion "
                    f"(visible tumor + {grow_mm:g} mm) now holds healthy tissue from {what}")
    report(progress, 1.0, "lesion refilled")
    return LesionTissue(result, lesion, source, refilled_cm3, quality, time.perf_counter() - started, warnings)


def inside_head(tissue: Tissue, candidates: np.ndarray) -> np.ndarray:
    """Which voxels of `candidates` (a bool (k, j, i) mask) lie inside the head: the convex hull of the tissue's voxels
    (WM+GM+CSF >= 0.5). Convexity survives any affine map, so the hull is taken in index space. A core cut out of the
    brain, even at its surface, is inside; a corner of the image is not. InputError for a tissue with no voxels."""
    from scipy.spatial import ConvexHull

    occupied = (tissue.wm + tissue.gm + tissue.csf) >= 0.5
    if not np.any(occupied):
        raise InputError("the tissue holds no WM, GM or CSF")
    inside = np.zeros(candidates.shape, bool)
    points = np.argwhere(candidates)
    if len(points) == 0:
        return inside
    # Every second voxel along each axis spans the same hull to within a voxel, for an eighth of the points.
    step = 2 if min(occupied.shape) >= 8 else 1
    hull_points = np.argwhere(occupied[::step, ::step, ::step]) * step
    try:
        hull = ConvexHull(hull_points.astype(np.float64))
    except Exception:  # a flat or tiny tissue (qhull needs a volume): every candidate counts as inside
        inside[candidates] = True
        return inside
    normals, offsets = hull.equations[:, :3], hull.equations[:, 3]
    keep = np.ones(len(points), bool)
    for start in range(0, len(points), 65536):
        chunk = points[start:start + 65536].astype(np.float64)
        keep[start:start + 65536] = np.all(chunk @ normals.T + offsets <= step, axis=1)
    inside[tuple(points[keep].T)] = True
    return inside


def _cm3(mask: np.ndarray, tissue: Tissue) -> float:
    return float(mask.sum()) * tissue.geometry.voxel_volume_mm3() / 1000.0


def _from_atlas(tissue: Tissue, atlas: Tissue, lesion: np.ndarray):
    """The given fractions outside the lesion, the registered atlas's inside it. Lesion voxels where the atlas holds
    no tissue at all (a registration that leaves the lesion at the brain's edge outside the atlas's brain) take the
    surroundings' fractions, since a tumor sits inside the head."""
    wm, gm, csf = (np.where(lesion, a, b) for a, b in zip((atlas.wm, atlas.gm, atlas.csf),
                                                           (tissue.wm, tissue.gm, tissue.csf)))
    empty = lesion & ((atlas.wm + atlas.gm + atlas.csf) < 0.5)
    if np.any(empty):
        s_wm, s_gm, s_csf = _from_surround(tissue, empty)
        wm, gm, csf = (np.where(empty, s, a) for s, a in zip((s_wm, s_gm, s_csf), (wm, gm, csf)))
    return wm.astype(np.float32), gm.astype(np.float32), csf.astype(np.float32)


def _from_surround(tissue: Tissue, lesion: np.ndarray):
    """Each lesion voxel takes the WM/GM fractions (rescaled to a whole voxel of brain) of the nearest voxel outside
    the lesion that is healthy brain (WM+GM >= SURROUND_BRAIN_FRACTION). Searched in the lesion's bounding box grown
    until it holds such voxels."""
    from scipy.ndimage import distance_transform_edt

    healthy = (~lesion) & (tissue.brain_fraction >= SURROUND_BRAIN_FRACTION)
    if not np.any(healthy):
        raise InputError("no healthy grey or white matter around the lesion to refill it from")
    spacing = np.asarray(tissue.geometry.spacing_kji_mm)
    margin = np.ceil(10.0 / spacing).astype(int)
    while True:
        box = mask_box(lesion, margin)
        if np.any(healthy[box]) or all(b.start == 0 and b.stop == n for b, n in zip(box, lesion.shape)):
            break
        margin = margin * 2
    _, nearest = distance_transform_edt(~healthy[box], sampling=spacing, return_indices=True)
    out = []
    brain = np.maximum(tissue.brain_fraction[box], BRAIN_FRACTION_THRESHOLD)
    for array, share in ((tissue.wm, tissue.wm[box] / brain), (tissue.gm, tissue.gm[box] / brain),
                         (tissue.csf, np.zeros_like(brain))):
        copied = share[tuple(nearest)]
        result = array.copy()
        inside = lesion[box]
        result[box][inside] = copied[inside]
        out.append(result.astype(np.float32))
    return tuple(out)
