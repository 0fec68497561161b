"""The search space of the methods (a box in RAS mm and mu ranges, and the voxels a seed may end in) and a method's
answer, the candidate."""
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from ..errors import InputError
from ..geometry import Geometry, Volume, mask_bounds
from ..parameters import MU_D_MM_BOUNDS, MU_RHO_BOUNDS, GrowthParameters
from ..tissue import Tissue
from .options import MIN_MU_D_MM, MIN_MU_RHO


@dataclass
class Candidate:
    """A method's answer; `space` is the search space it was found in (its bounds decide the on-bound warning)."""

    parameters: GrowthParameters
    source: str
    surrogate_loss: Optional[float] = None
    fd_loss: Optional[float] = None
    space: Optional["SearchSpace"] = None
    stopped: Optional[str] = None  # why an optimiser stopped, where it says (CMA-ES's termination criteria)
    # The FD run of `parameters` on the tissue's own grid and its data loss, when the method made it (hybrid's
    # tissue-grid judge): the pipeline's final run, so it is not repeated.
    final: Optional[Volume] = None
    final_loss: Optional[float] = None


@dataclass
class SearchSpace:
    """The box the optimisers search, and the voxels a seed may end in.

    seed_low_ras_mm / seed_high_ras_mm: RAS bounding box of the allowed voxels; mu ranges per forward model.
    allowed: bool mask on `geometry` (brain voxels within seed_margin_mm of the visible tumor).
    """

    geometry: Geometry
    allowed: np.ndarray
    seed_low_ras_mm: np.ndarray
    seed_high_ras_mm: np.ndarray
    mu_d_range: Tuple[float, float]
    mu_rho_range: Tuple[float, float]
    # Lazily computed arrays that depend only on `allowed` (the nearest allowed voxel of every voxel of its bounding
    # box), shared by reference with the copies with_ranges makes: the distance transform is done at most once.
    cache: Dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def around_tumor(cls, tissue: Tissue, visible: np.ndarray, margin_mm: float,
                     mu_d_range=(MIN_MU_D_MM, MU_D_MM_BOUNDS[1]), mu_rho_range=(MIN_MU_RHO, MU_RHO_BOUNDS[1])):
        from ..plans import distance_mm

        allowed = (distance_mm(np.asarray(visible) > 0.5, tissue.geometry, max_mm=margin_mm) <= margin_mm) \
            & tissue.brain_mask
        if not np.any(allowed):
            raise InputError("no grey or white matter near the tumor: the tumor lies outside the brain")
        points = tissue.geometry.index_kji_to_ras(np.argwhere(allowed).astype(np.float64))
        return cls(tissue.geometry, allowed, points.min(axis=0), points.max(axis=0), tuple(mu_d_range),
                   tuple(mu_rho_range))

    def with_ranges(self, mu_d_range, mu_rho_range) -> "SearchSpace":
        return replace(self, mu_d_range=tuple(mu_d_range), mu_rho_range=tuple(mu_rho_range))

    @property
    def _low(self) -> np.ndarray:
        return np.concatenate([self.seed_low_ras_mm, [self.mu_d_range[0], self.mu_rho_range[0]]])

    @property
    def _span(self) -> np.ndarray:
        span = np.concatenate([self.seed_high_ras_mm - self.seed_low_ras_mm,
                               [self.mu_d_range[1] - self.mu_d_range[0], self.mu_rho_range[1] - self.mu_rho_range[0]]])
        return np.maximum(span, 1e-6)

    def to_unit(self, parameters: GrowthParameters) -> np.ndarray:
        """Parameters -> point of the unit cube [0, 1]^5 (clipped into it)."""
        x = np.concatenate([parameters.seed_ras_mm, [parameters.mu_d_mm, parameters.mu_rho]])
        return np.clip((x - self._low) / self._span, 0.0, 1.0)

    def from_unit_tensor(self, unit: torch.Tensor):
        """(B, 5) unit-cube tensor -> seeds (B, 3) RAS mm, mu_D (B,), mu_rho (B,), differentiable."""
        low = torch.as_tensor(self._low, dtype=unit.dtype, device=unit.device)
        span = torch.as_tensor(self._span, dtype=unit.dtype, device=unit.device)
        x = low + unit * span
        return x[:, :3], x[:, 3], x[:, 4]

    def from_unit(self, unit: np.ndarray, project: bool = True) -> GrowthParameters:
        """Unit-cube point -> parameters, the seed projected onto the allowed voxels (unless project=False)."""
        x = self._low + np.clip(unit, 0.0, 1.0) * self._span
        parameters = GrowthParameters(tuple(x[:3]), x[3], x[4])
        return self.project(parameters) if project else parameters

    def project(self, parameters: GrowthParameters) -> GrowthParameters:
        """The nearest parameters inside the space: mu's clipped to their ranges, the seed moved to the nearest
        allowed voxel centre when it lies outside the allowed voxels."""
        seed = np.asarray(parameters.seed_ras_mm, np.float64)
        index = np.round(self.geometry.ras_to_index_kji(seed)).astype(int)
        inside = np.all(index >= 0) and np.all(index < np.asarray(self.geometry.shape_kji))
        if not (inside and self.allowed[tuple(index)]):
            clipped = np.clip(index, 0, np.asarray(self.geometry.shape_kji) - 1)
            seed = self.geometry.index_kji_to_ras(self.nearest_allowed_index(clipped).astype(np.float64))
        return GrowthParameters(tuple(seed), float(np.clip(parameters.mu_d_mm, *self.mu_d_range)),
                                float(np.clip(parameters.mu_rho, *self.mu_rho_range)))

    def nearest_allowed_index(self, index_kji) -> np.ndarray:
        """The (k, j, i) index of the allowed voxel nearest, in mm, to the voxel index_kji (on the grid).

        The distance transform runs on the allowed voxels' bounding box (grown to hold index_kji when it lies
        outside): every allowed voxel is in that box, so the answer is the whole grid's, ties included (checked
        voxel by voxel against the whole grid's transform in the tests), at a fraction of the cost: on the 1 mm
        atlas the whole grid's index arrays alone are 3 x 7.2 M int64 (173 MB), and the box is a small part of the
        grid."""
        from scipy.ndimage import distance_transform_edt

        index_kji = np.asarray(index_kji, dtype=int)

        def transform(low, high):
            box = tuple(slice(a, b + 1) for a, b in zip(low, high))
            return distance_transform_edt(~self.allowed[box], sampling=self.geometry.spacing_kji_mm,
                                          return_indices=True)[1]

        if "bounds" not in self.cache:
            low, high = mask_bounds(self.allowed)
            self.cache["bounds"] = (low, high - 1)  # inclusive
        low, high = self.cache["bounds"]
        if np.all(index_kji >= low) and np.all(index_kji <= high):  # the optimisers' seeds: kept for the next one
            if "nearest" not in self.cache:
                self.cache["nearest"] = transform(low, high)
            nearest = self.cache["nearest"]
        else:  # a start from outside the box (rare): once, on the box grown to hold it
            low, high = np.minimum(low, index_kji), np.maximum(high, index_kji)
            nearest = transform(low, high)
        local = tuple(index_kji - low)
        return np.array([nearest[axis][local] for axis in range(3)]) + low

    def on_bound(self, parameters: GrowthParameters, tolerance: float = 0.01) -> List[str]:
        """Names of mu parameters within `tolerance` of the range's ends (the data may want more)."""
        out = []
        for name, value, (low, high) in (("mu_D", parameters.mu_d_mm, self.mu_d_range),
                                         ("mu_rho", parameters.mu_rho, self.mu_rho_range)):
            span = high - low
            if value <= low + tolerance * span:
                out.append(f"{name} = {value:.3g} ended on its lower bound {low:g}")
            elif value >= high - tolerance * span:
                out.append(f"{name} = {value:.3g} ended on its upper bound {high:g}")
        return out

    def to_dict(self) -> Dict:
        return {"seed_low_ras_mm": [round(float(v), 2) for v in self.seed_low_ras_mm],
                "seed_high_ras_mm": [round(float(v), 2) for v in self.seed_high_ras_mm],
                "mu_d_mm": list(self.mu_d_range), "mu_rho": list(self.mu_rho_range)}
