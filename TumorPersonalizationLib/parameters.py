"""Growth parameters of the Fisher-Kolmogorov model, in physical units.

With a single scan, D, rho and the tumor's age T are not separately identifiable, so time is folded in:
    mu_D   = sqrt(D_WM * T)   [mm]            how far cells diffuse in the tumor's lifetime (white matter)
    mu_rho = sqrt(rho * T)    [dimensionless]  how many e-folds of proliferation (squared) it had
The solver runs to T = 1 with D_WM = mu_D^2 [mm^2] and rho = mu_rho^2. The front then travels about
2 * mu_D * mu_rho mm and its width is about mu_D / mu_rho mm.
"""
from dataclasses import asdict, dataclass
from typing import Dict, Sequence, Tuple

import numpy as np

from .errors import InputError

# Bounds accepted by the solver and the CLI. Below them a tumor does not grow; above them the front crosses the
# whole brain (2 * 40 * 12 = 960 mm) long before T = 1 and the map carries no information about the parameters.
MU_D_MM_BOUNDS: Tuple[float, float] = (0.0, 40.0)
MU_RHO_BOUNDS: Tuple[float, float] = (0.0, 12.0)


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
