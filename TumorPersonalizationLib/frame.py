"""The surrogate frame: where the networks look at a brain.

The surrogate and the inverse net were trained on cubes of ``cube_mm`` (128 mm) around a tumor, area-averaged to
``grid``^3 voxels (32^3 of 4 mm), RAS-aligned (the atlas's axes), with the seed given as an offset in mm from the
cube's centre and scaled to [-1, 1] (parameters.ParameterScaling). This module is the one place that builds such a
cube, for dataset generation, the benchmarks and the inversion alike, from the numbers in a model card.

When the source image is RAS-aligned and its voxels divide the frame's (the atlas, most 1 mm research data), the cube
is cut on the source grid and block-averaged: exactly what training saw. Otherwise (oblique or anisotropic clinical
grids) the frame is a RAS-aligned cube centred on the point, filled by area-weighted resampling.
"""
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from .errors import InputError
from .geometry import Geometry, crop_with_padding, cube_box_kji, resample_fraction, resample_linear
from .parameters import ParameterScaling


@dataclass(frozen=True, eq=False)
class SurrogateFrame:
    """A network's grid placed in patient space.

    geometry: the grid^3 frame (RAS mm); scaling: how parameters map to the network's [-1, 1];
    source_box_kji / source_geometry: where the frame was cut from its source grid on the exact (block-average)
    path, else None.
    """

    geometry: Geometry
    scaling: ParameterScaling
    source_geometry: Geometry
    source_box_kji: Optional[Tuple[Tuple[int, int], ...]] = None

    # ---- construction ----------------------------------------------------------------------------------------
    @classmethod
    def around(cls, center_ras_mm: Sequence[float], source: Geometry, grid: int = 32, cube_mm: float = 128.0,
               scaling: ParameterScaling = ParameterScaling()) -> "SurrogateFrame":
        """The frame of side cube_mm (grid voxels) centred on a RAS point, for images on the `source` grid."""
        spacing = cube_mm / grid
        if _block_average_possible(source, spacing, cube_mm):
            box = cube_box_kji(source, center_ras_mm, cube_mm)
            fine = source.sub_box(box)
            return cls(fine.with_spacing(spacing), scaling, source, tuple(tuple(b) for b in box))
        half = (grid - 1) / 2.0 * spacing
        origin = np.asarray(center_ras_mm, dtype=np.float64) - half
        return cls(Geometry((grid, grid, grid), (spacing,) * 3, tuple(origin), np.eye(3)), scaling, source, None)

    @classmethod
    def from_card(cls, card: Dict, center_ras_mm: Sequence[float], source: Geometry) -> "SurrogateFrame":
        """The frame a trained model (its card: grid, cube_mm, scaling) expects, centred on a RAS point."""
        try:
            grid, cube_mm = int(card["grid"]), float(card["cube_mm"])
            scaling = ParameterScaling.from_dict(card["scaling"])
        except (KeyError, TypeError, ValueError) as error:
            raise InputError(f"model card {card.get('name', '?')} lacks the frame ({error})") from None
        return cls.around(center_ras_mm, source, grid, cube_mm, scaling)

    # ---- images in and out -----------------------------------------------------------------------------------
    @property
    def center_ras_mm(self) -> np.ndarray:
        return self.geometry.index_kji_to_ras((np.asarray(self.geometry.shape_kji) - 1) / 2.0)

    @property
    def grid(self) -> int:
        return self.geometry.shape_kji[0]

    def sample(self, array: np.ndarray) -> np.ndarray:
        """A fraction or concentration map on the source grid -> the frame grid (area average), float32: by the
        reference arithmetic the training data were made with, so the networks see inputs made as theirs were and
        regenerated data match their committed manifests byte for byte."""
        if np.shape(array) != self.source_geometry.shape_kji:
            raise InputError(f"array of shape {np.shape(array)} is not on the frame's source grid "
                             f"{self.source_geometry.shape_kji}")
        if self.source_box_kji is not None:
            fine = self.source_geometry.sub_box(self.source_box_kji)
            # cut, then converted: converting first copied a whole 1 mm image per call (a bool mask, a float64 map)
            cropped = crop_with_padding(np.asarray(array), self.source_box_kji).astype(np.float32, copy=False)
            return resample_fraction(cropped, fine, self.geometry, reference_mean=True).astype(np.float32)
        return resample_fraction(np.asarray(array, np.float32), self.source_geometry, self.geometry,
                                 reference_mean=True).astype(np.float32)

    def crop_source(self, array: np.ndarray) -> np.ndarray:
        """The frame's cube cut from a source-grid array at source resolution (exact path only)."""
        if self.source_box_kji is None:
            raise InputError("this frame was resampled, not cut from its source grid")
        return crop_with_padding(np.asarray(array), self.source_box_kji)

    def tissue_channels(self, tissue) -> np.ndarray:
        """(3, G, G, G) WM, GM, CSF fractions in the frame: the networks' tissue input."""
        if not tissue.geometry.same_grid(self.source_geometry):
            raise InputError("the tissue is not on the frame's source grid")
        return np.stack([self.sample(tissue.wm), self.sample(tissue.gm), self.sample(tissue.csf)])

    def to_grid(self, frame_array: np.ndarray, target: Geometry) -> np.ndarray:
        """A frame-grid map resampled (trilinear) onto another grid; zero outside the frame."""
        return resample_linear(np.asarray(frame_array, np.float32), self.geometry, target)

    def fraction_inside(self, mask: np.ndarray) -> float:
        """Share of a source-grid mask's voxels that lie inside the frame (1.0: the tumor fits)."""
        points = np.argwhere(np.asarray(mask, bool))
        if len(points) == 0:
            return 1.0
        index = self.geometry.ras_to_index_kji(self.source_geometry.index_kji_to_ras(points.astype(np.float64)))
        inside = np.all((index >= -0.5) & (index <= np.asarray(self.geometry.shape_kji) - 0.5), axis=1)
        return float(inside.mean())

    # ---- parameters ------------------------------------------------------------------------------------------
    def normalise(self, seed_ras_mm, mu_d_mm, mu_rho):
        """Seeds in RAS mm (..., 3), mu_D (...), mu_rho (...) -> the network's (..., 5) (numpy or torch)."""
        return self.scaling.normalise(seed_ras_mm - self._center_like(seed_ras_mm), mu_d_mm, mu_rho)

    def denormalise(self, normalised):
        """The network's (..., 5) -> (seed RAS mm (..., 3), mu_D mm (...), mu_rho (...))."""
        offset, mu_d, mu_rho = self.scaling.denormalise(normalised)
        return offset + self._center_like(offset), mu_d, mu_rho

    def _center_like(self, values):
        """The frame's centre as the same kind of array as `values` (a torch tensor's dtype and device)."""
        center = self.center_ras_mm
        try:
            import torch

            if torch.is_tensor(values):
                return torch.as_tensor(center, dtype=values.dtype, device=values.device)
        except ImportError:  # pragma: no cover
            pass
        return center


def _block_average_possible(source: Geometry, spacing_mm: float, cube_mm: float) -> bool:
    ratios = spacing_mm / np.asarray(source.spacing_ijk_mm)
    cube_voxels = cube_mm / np.asarray(source.spacing_ijk_mm)
    return bool(np.allclose(source.direction_ras, np.eye(3), atol=1e-6)
                and np.allclose(ratios, np.round(ratios), atol=1e-6) and np.all(np.round(ratios) >= 1)
                and np.allclose(cube_voxels, np.round(cube_voxels), atol=1e-6))
