"""Growth parameters of the Fisher-Kolmogorov model, in physical units.

With a single scan, D, rho and the tumor's age T are not separately identifiable, so time is folded in:
    mu_D   = sqrt(D_WM * T)   [mm]            how far cells diffuse in the tumor's lifetime (white matter)
    mu_rho = sqrt(rho * T)    [dimensionless]  how many e-folds of proliferation (squared) it had
The solver runs to T = 1 with D_WM = mu_D^2 [mm^2] and rho = mu_rho^2. The front then travels about
2 * mu_D * mu_rho mm and its width is about mu_D / mu_rho mm.
"""
import math
from dataclasses import asdict, dataclass
from typing import Dict, Sequence, Tuple

import numpy as np

from .errors import InputError

# Bounds accepted by the solver and the CLI. Below them a tumor does not grow; above them the front crosses the
# whole brain (2 * 40 * 12 = 960 mm) long before T = 1 and the map carries no information about the parameters.
MU_D_MM_BOUNDS: Tuple[float, float] = (0.0, 40.0)
MU_RHO_BOUNDS: Tuple[float, float] = (0.0, 12.0)
# The later growth a target plan should cover: the same tumor grown on to this multiple of its age (the demo and the
# inversion benchmark score plans by it).
LATER_AGE_FACTOR = 1.5


@dataclass(frozen=True)
class GrowthParameters:
    """One tumor: seed position in patient RAS mm, mu_D in mm, mu_rho dimensionless."""

    seed_ras_mm: Tuple[float, float, float]
    mu_d_mm: float
    mu_rho: float

    def __post_init__(self):
        seed = tuple(float(x) for x in np.asarray(self.seed_ras_mm, dtype=np.float64).ravel())
        if len(seed) != 3:
            raise InputError(f"seed_ras_mm needs 3 coordinates, got {len(seed)}")
        object.__setattr__(self, "seed_ras_mm", seed)
        object.__setattr__(self, "mu_d_mm", float(self.mu_d_mm))
        object.__setattr__(self, "mu_rho", float(self.mu_rho))
        self.validate()

    def validate(self) -> None:
        values = list(self.seed_ras_mm) + [self.mu_d_mm, self.mu_rho]
        if not np.all(np.isfinite(values)):
            raise InputError(f"parameters must be finite numbers, got seed={self.seed_ras_mm}, "
                             f"mu_D={self.mu_d_mm}, mu_rho={self.mu_rho}")
        for name, value, (low, high), unit in (("mu_D", self.mu_d_mm, MU_D_MM_BOUNDS, " mm"),
                                               ("mu_rho", self.mu_rho, MU_RHO_BOUNDS, "")):
            if not low <= value <= high:
                raise InputError(f"{name} = {value:g}{unit} is outside its bounds [{low:g}, {high:g}]{unit}")

    # ---- derived physical quantities -------------------------------------------------------------------------
    @property
    def diffusivity_wm_mm2(self) -> float:
        """D_WM for the unit-time run, mm^2."""
        return self.mu_d_mm ** 2

    @property
    def proliferation_rate(self) -> float:
        """rho for the unit-time run."""
        return self.mu_rho ** 2

    @property
    def front_speed_mm(self) -> float:
        """Asymptotic Fisher-KPP front speed 2 sqrt(D rho) in white matter, mm per unit time."""
        return 2.0 * self.mu_d_mm * self.mu_rho

    def to_dict(self) -> Dict:
        out = asdict(self)
        out["seed_ras_mm"] = list(self.seed_ras_mm)
        return out

    @classmethod
    def from_dict(cls, data: Dict) -> "GrowthParameters":
        return cls(tuple(data["seed_ras_mm"]), data["mu_d_mm"], data["mu_rho"])

    @classmethod
    def from_physical(cls, seed_ras_mm: Sequence[float], d_wm_mm2_per_day: float, rho_per_day: float,
                      days: float) -> "GrowthParameters":
        """From D_WM [mm^2/day], rho [1/day] and the tumor's age T [days]."""
        return cls(tuple(seed_ras_mm), float(np.sqrt(d_wm_mm2_per_day * days)), float(np.sqrt(rho_per_day * days)))


@dataclass(frozen=True)
class ParameterScaling:
    """Maps (seed offset from the crop centre in mm, mu_D, mu_rho) to [-1, 1]^5 and back, for the networks.

    The ranges are part of a trained model (stored in its model card): a network knows nothing outside them.
    """

    seed_offset_half_range_mm: float = 64.0
    mu_d_mm_range: Tuple[float, float] = (0.0, 32.0)
    mu_rho_range: Tuple[float, float] = (0.0, 10.0)

    def normalise(self, seed_offset_mm, mu_d_mm, mu_rho):
        """Arrays or tensors (..., 3), (...), (...) -> (..., 5) in [-1, 1] inside the ranges."""
        seed = seed_offset_mm / self.seed_offset_half_range_mm
        d = 2.0 * (mu_d_mm - self.mu_d_mm_range[0]) / (self.mu_d_mm_range[1] - self.mu_d_mm_range[0]) - 1.0
        r = 2.0 * (mu_rho - self.mu_rho_range[0]) / (self.mu_rho_range[1] - self.mu_rho_range[0]) - 1.0
        return _concat_last(seed, d[..., None], r[..., None])

    def denormalise(self, normalised):
        """(..., 5) -> (seed offset mm (..., 3), mu_D mm (...), mu_rho (...))."""
        seed = normalised[..., :3] * self.seed_offset_half_range_mm
        d = (normalised[..., 3] + 1.0) / 2.0 * (self.mu_d_mm_range[1] - self.mu_d_mm_range[0]) + self.mu_d_mm_range[0]
        r = (normalised[..., 4] + 1.0) / 2.0 * (self.mu_rho_range[1] - self.mu_rho_range[0]) + self.mu_rho_range[0]
        return seed, d, r

    def to_dict(self) -> Dict:
        return {"seed_offset_half_range_mm": self.seed_offset_half_range_mm,
                "mu_d_mm_range": list(self.mu_d_mm_range), "mu_rho_range": list(self.mu_rho_range)}

    @classmethod
    def from_dict(cls, data: Dict) -> "ParameterScaling":
        return cls(float(data["seed_offset_half_range_mm"]), tuple(data["mu_d_mm_range"]), tuple(data["mu_rho_range"]))


def later_growth(parameters: GrowthParameters, age_factor: float = LATER_AGE_FACTOR) -> GrowthParameters:
    """The same tumor at `age_factor` times its age: mu_D and mu_rho both scale with sqrt(age) (module docstring),
    the seed stays. InputError when the grown parameters leave the solver's bounds."""
    scale = math.sqrt(age_factor)
    return GrowthParameters(parameters.seed_ras_mm, parameters.mu_d_mm * scale, parameters.mu_rho * scale)


def parameter_errors(found: GrowthParameters, truth: GrowthParameters) -> Dict[str, float]:
    """How far `found` is from `truth`: {"seed_mm": distance of the seeds in mm, "mu_d_relative",
    "mu_rho_relative": |found - truth| / truth} (unrounded; a zero true mu gives inf or nan)."""
    seed_mm = float(np.linalg.norm(np.subtract(found.seed_ras_mm, truth.seed_ras_mm)))
    with np.errstate(divide="ignore", invalid="ignore"):
        return {"seed_mm": seed_mm,
                "mu_d_relative": float(np.divide(abs(found.mu_d_mm - truth.mu_d_mm), truth.mu_d_mm)),
                "mu_rho_relative": float(np.divide(abs(found.mu_rho - truth.mu_rho), truth.mu_rho))}


def _concat_last(*parts):
    try:
        import torch

        if torch.is_tensor(parts[0]):
            return torch.cat(parts, dim=-1)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return np.concatenate(parts, axis=-1)
