"""Anatomical variety for training data (offline code, issue 9): random smooth deformations of a brain and
segmentation-like noise at tissue borders.

A deformation maps a point x of the new (deformed) brain to the atlas point it comes from,

    atlas(x) = c + A (x - c) + u(x),

with A a rotation times per-axis scaling about the centre c, and u a smooth random displacement field. The deformed
tissue is the atlas pulled back through that map (trilinear interpolation of the fractions), so every voxel of the
result holds fractions that some atlas neighbourhood had: they stay in [0, 1] and sum to at most 1. Everything is
drawn from a numpy Generator, so a deformation is a function of its seed.
"""
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .geometry import Geometry
from .tissue import Tissue


@dataclass(frozen=True)
class DeformationPrior:
    """How large the random deformations are (defaults: the variety issue 9 asks for in training)."""

    scale_range: float = 0.10  # each axis scaled by a factor in [1 - s, 1 + s]
    max_rotation_deg: float = 15.0  # about a uniformly random axis
    displacement_mm: float = 3.0  # standard deviation of each component of the smooth field
    smoothness_mm: float = 20.0  # the field's correlation length (Gaussian filter sigma)


@dataclass(frozen=True, eq=False)
class Deformation:
    """atlas(x) = center + matrix @ (x - center) + displacement(x); displacement is (K, J, I, 3) RAS mm on `grid`
    (None: a pure affine map)."""

    center_ras_mm: np.ndarray
    matrix: np.ndarray
    grid: Geometry
    displacement_ras_mm: Optional[np.ndarray] = None

    def atlas_points(self, ras_mm: np.ndarray) -> np.ndarray:
        """Atlas RAS points (..., 3) of deformed-brain RAS points (..., 3) (displacement: nearest grid value)."""
        ras_mm = np.asarray(ras_mm, np.float64)
        out = self.center_ras_mm + (ras_mm - self.center_ras_mm) @ self.matrix.T
        if self.displacement_ras_mm is not None:
            index = np.rint(self.grid.ras_to_index_kji(ras_mm)).astype(int)
            index = np.clip(index, 0, np.asarray(self.grid.shape_kji) - 1)
            out = out + self.displacement_ras_mm[index[..., 0], index[..., 1], index[..., 2]]
        return out

    def deformed_point(self, atlas_ras_mm) -> np.ndarray:
        """Where an atlas point lands in the deformed brain (the affine part inverted exactly; the displacement by
        fixed-point iteration, which converges as the field is smooth and small)."""
        target = np.asarray(atlas_ras_mm, np.float64)
        inverse = np.linalg.inv(self.matrix)
        x = self.center_ras_mm + (target - self.center_ras_mm) @ inverse.T
        for _ in range(20 if self.displacement_ras_mm is not None else 0):
            x = x + (target - self.atlas_points(x)) @ inverse.T
        return x


def random_rotation(rng: np.random.Generator, max_angle_deg: float) -> np.ndarray:
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(-max_angle_deg, max_angle_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)  # Rodrigues


def random_deformation(rng: np.random.Generator, grid: Geometry, prior: DeformationPrior = DeformationPrior(),
                       center_ras_mm=None) -> Deformation:
    """A deformation drawn from the prior, with its displacement field on `grid` (the tissue's)."""
    from scipy.ndimage import gaussian_filter

    if center_ras_mm is None:
        center_ras_mm = grid.index_kji_to_ras((np.asarray(grid.shape_kji) - 1) / 2.0)
    scales = rng.uniform(1 - prior.scale_range, 1 + prior.scale_range, 3)
    matrix = random_rotation(rng, prior.max_rotation_deg) @ np.diag(scales)
    displacement = None
    if prior.displacement_mm > 0:
        sigma = [prior.smoothness_mm / s for s in grid.spacing_kji_mm]
        fields = []
        for _ in range(3):
            field = gaussian_filter(rng.normal(size=grid.shape_kji), sigma, mode="wrap")
            # Scaled by its root mean square, not its standard deviation: on a grid not much larger than the
            # correlation length the field is nearly a constant shift, whose tiny deviation must not blow it up.
            fields.append(field * (prior.displacement_mm / max(float(np.sqrt(np.mean(field ** 2))), 1e-12)))
        displacement = np.stack(fields, axis=-1)
    return Deformation(np.asarray(center_ras_mm, np.float64), matrix, grid, displacement)


def deform_tissue(tissue: Tissue, deformation: Deformation) -> Tissue:
    """The tissue pulled back through the deformation, on the tissue's own grid (outside the atlas: background)."""
    from scipy.ndimage import map_coordinates

    points = tissue.geometry.ras_grid()
    atlas_points = deformation.center_ras_mm + (points - deformation.center_ras_mm) @ deformation.matrix.T
    if deformation.displacement_ras_mm is not None:
        if not deformation.grid.same_grid(tissue.geometry):
            raise ValueError("the displacement field must be on the tissue's grid")
        atlas_points = atlas_points + deformation.displacement_ras_mm
    index = tissue.geometry.ras_to_index_kji(atlas_points)
    coordinates = np.moveaxis(index, -1, 0)
    fractions = [map_coordinates(a, coordinates, order=1, mode="constant", cval=0.0).astype(np.float32)
                 for a in (tissue.wm, tissue.gm, tissue.csf)]
    return Tissue(*_as_fractions(fractions), tissue.geometry)


def border_noise(tissue: Tissue, rng: np.random.Generator, amplitude: float = 0.15,
                 smoothness_mm: float = 3.0) -> Tissue:
    """Partial-volume disagreement like a segmentation tool's: smooth noise moves fraction between WM and GM where
    both are present (their border) and between GM and CSF likewise; pure voxels keep their tissue."""
    from scipy.ndimage import gaussian_filter

    sigma = [smoothness_mm / s for s in tissue.geometry.spacing_kji_mm]

    def noise():
        field = gaussian_filter(rng.normal(size=tissue.geometry.shape_kji), sigma)
        return field / max(float(np.sqrt(np.mean(field ** 2))), 1e-12) * amplitude

    wm, gm, csf = (a.astype(np.float64) for a in (tissue.wm, tissue.gm, tissue.csf))
    # The exchanged amount is bounded by what both sides hold, so nothing turns negative.
    shift = np.clip(noise() * 4 * wm * gm, -wm, gm)
    wm, gm = wm + shift, gm - shift
    shift = np.clip(noise() * 4 * gm * csf, -gm, csf)
    gm, csf = gm + shift, csf - shift
    return Tissue(*_as_fractions([wm, gm, csf]), tissue.geometry)


def _as_fractions(arrays):
    stacked = np.clip(np.stack(arrays).astype(np.float64), 0.0, 1.0)
    total = stacked.sum(axis=0)
    stacked /= np.maximum(total, 1.0)  # a sum above 1 (interpolation rounding) is scaled back, never below
    return [a.astype(np.float32) for a in stacked]
