"""The inversion problem: what a method is given (tissue and observation on the tissue and working grids, the search
space, options, progress and cancel), the models it scores candidates with (a shared ModelCache) and what it records
(a shared RunLog: the history of loss evaluations and the run counters)."""
import time
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from ..frame import SurrogateFrame
from ..geometry import Volume
from ..observation import GriddedObservation
from ..parameters import GrowthParameters, ParameterScaling
from ..progress import ProgressCallback
from ..solver import SECONDS_PER_VOXEL_STENCIL, StepControl, TissueOperator, schedule_run, simulate_tensor
from ..tissue import Tissue
from .models import FDModel, InverseNetwork, ModelCache, SurrogateModel
from .options import MIN_MU_D_MM, MIN_MU_RHO, InversionOptions
from .space import Candidate, SearchSpace


# What a history entry records, in its "step" field (for programs; "stage" is the prose shown to people).
STEP_SEARCH = "search"        # a loss an optimiser evaluated
STEP_PROJECTED = "projected"  # an optimiser's answer, its seed projected onto the allowed voxels
STEP_JUDGE = "judge"          # a candidate scored by an FD run, to choose between candidates or to start a polish
STEP_FINAL = "final"          # the FD run on the tissue's grid whose concentration is the result
STEPS = (STEP_SEARCH, STEP_PROJECTED, STEP_JUDGE, STEP_FINAL)
# Where the loss was computed, in its "grid" field: the surrogate network, or an FD run on the working grid or on
# the tissue's own grid.
GRIDS = ("network", "working", "tissue")


@dataclass
class RunLog:
    """What the stages of one problem record, shared by the problem and its sub-problems."""

    history: List[Dict] = field(default_factory=list)  # every loss evaluated, in order
    tissue_runs: int = 0  # FD runs on the tissue's own grid (the final run included once the pipeline made it)
    close_calls_not_judged: int = 0  # hybrid: close calls' runners-up left unjudged by the run cap
    started: float = field(default_factory=time.perf_counter)  # perf_counter at the start (history's elapsed_s)

    def record(self, stage: str, loss: float, kind: str, step: str, grid: str) -> None:
        """Append one evaluation: stage (prose), loss, kind ("fd" / "surrogate"), step (STEPS), grid (GRIDS)."""
        if step not in STEPS or grid not in GRIDS:
            raise ValueError(f"unknown step {step!r} or grid {grid!r}: steps {STEPS}, grids {GRIDS}")
        self.history.append({"evaluation": len(self.history) + 1, "stage": stage, "step": step, "grid": grid,
                             "loss": float(loss), "loss_kind": kind,
                             "elapsed_s": round(time.perf_counter() - self.started, 3)})


@dataclass
class Problem:
    """Everything a method needs: tissue and observation on the tissue and working grids, the search space, options,
    progress and cancel; the models (`models`, loaded on first use) and the record (`log`) are shared with the
    sub-problems with_progress makes."""

    tissue: Tissue
    observation: GriddedObservation
    work_tissue: Tissue
    work_observation: GriddedObservation
    space: SearchSpace
    options: InversionOptions = field(default_factory=InversionOptions)
    device: str = "cpu"
    progress: Optional[ProgressCallback] = None
    cancel: object = None
    models: Optional[ModelCache] = None  # None: a cache of this problem's own (built with its options)
    log: RunLog = field(default_factory=RunLog)

    def __post_init__(self):
        if self.models is None:
            self.models = ModelCache(self.tissue, self.observation, self.work_tissue, self.work_observation,
                                     self.options, self.device)

    def with_progress(self, progress: Optional[ProgressCallback],
                      options: Optional[InversionOptions] = None) -> "Problem":
        """The same problem (same models, record and cancel flag) reporting to another progress callback, and seen
        by the method it is handed to with other options when given (the models keep the options they were built
        with)."""
        return replace(self, progress=progress, options=options if options is not None else self.options)

    # ---- models ----------------------------------------------------------------------------------------------
    def fd(self) -> FDModel:
        return self.models.fd()

    def surrogate(self) -> SurrogateModel:
        return self.models.surrogate()

    def inverse(self) -> InverseNetwork:
        return self.models.inverse()

    def tissue_operator(self) -> TissueOperator:
        return self.models.tissue_operator()

    def network_space(self, card: Optional[Dict] = None) -> SearchSpace:
        """The search space clipped to a network's trained ranges (its card's scaling; the surrogate's by default)."""
        scaling = ParameterScaling.from_dict((card or self.surrogate().card)["scaling"])
        return self.space.with_ranges(
            (max(scaling.mu_d_mm_range[0], MIN_MU_D_MM), min(scaling.mu_d_mm_range[1], self.space.mu_d_range[1])),
            (max(scaling.mu_rho_range[0], MIN_MU_RHO), min(scaling.mu_rho_range[1], self.space.mu_rho_range[1])))

    # ---- what the pipeline reads -------------------------------------------------------------------------------
    @property
    def history(self) -> List[Dict]:
        """Every loss evaluated so far: evaluation, stage (prose), step (STEPS), grid (GRIDS), loss, loss_kind
        ("fd" / "surrogate"), elapsed_s."""
        return self.log.history

    @property
    def tissue_runs(self) -> int:
        """FD runs on the tissue's own grid so far."""
        return self.log.tissue_runs

    @property
    def close_calls_not_judged(self) -> int:
        return self.log.close_calls_not_judged

    @property
    def fd_runs_working_grid(self) -> int:
        """FD runs on the working grid so far."""
        return self.models.fd_runs

    @property
    def models_used(self) -> Dict[str, Dict]:
        """Name -> {"kind", "sha256"} of every network loaded."""
        return self.models.models_used

    @property
    def surrogate_loaded(self) -> bool:
        return self.models.surrogate_loaded

    @property
    def network_frame(self) -> Optional[SurrogateFrame]:
        """The frame the networks worked in (the surrogate's, else the inverse net's); None when none was loaded."""
        return self.models.network_frame

    # ---- bookkeeping -----------------------------------------------------------------------------------------
    def record(self, stage: str, loss: float, kind: str, step: str, grid: str) -> None:
        self.log.record(stage, loss, kind, step, grid)

    def fd_loss(self, candidate: Candidate, stage: str) -> Candidate:
        """The judge: the candidate's data loss from an FD run on the working grid."""
        loss = self.fd().loss_of(candidate.parameters, self.cancel)
        self.record(stage, loss, "fd", STEP_JUDGE, "working")
        return replace(candidate, fd_loss=loss)

    def predicted_run_s(self, parameters: GrowthParameters, tissue_grid: bool) -> float:
        """The predicted cost of one FD run of `parameters`, on the tissue's grid (the solver's default steps) or
        the working grid (the working steps), from the work its schedule says it will do, in seconds of the benchmark's
        CPU (solver.SECONDS_PER_VOXEL_STENCIL). Deterministic: no clock is read."""
        operator, control = ((self.tissue_operator(), StepControl()) if tissue_grid
                             else (self.fd().operator, self.fd().control))
        # Rounded to the operator's dtype first, as simulate_tensor rounds them, so the schedule is the run's own.
        values = torch.tensor([parameters.mu_d_mm, parameters.mu_rho, *parameters.seed_ras_mm],
                              dtype=operator.dtype).double().numpy()
        schedule = schedule_run(operator, values[:1], values[1:2], values[2:].reshape(1, 3), control)
        return SECONDS_PER_VOXEL_STENCIL * schedule.work()

    def tissue_grid_run(self, parameters: GrowthParameters, stage: str, step: str,
                        progress: Optional[ProgressCallback] = None) -> Tuple[Volume, float]:
        """The FD run of `parameters` on the tissue's own grid (the solver's default steps, as `simulate`) and its
        data loss against the observation there: (concentration image, loss), recorded as `step` (STEP_JUDGE or
        STEP_FINAL). InputError if the seed is not in grey or white matter."""
        from ..solver import check_seed

        check_seed(self.tissue, parameters.seed_ras_mm)
        with torch.no_grad():
            c = simulate_tensor(self.tissue_operator(), [parameters.mu_d_mm], [parameters.mu_rho],
                                [parameters.seed_ras_mm], control=StepControl(), progress=progress,
                                cancel=self.cancel)
        self.log.tissue_runs += 1
        concentration = Volume(c[0].cpu().numpy().astype(np.float32), self.tissue.geometry)
        loss = self.observation.loss(torch.as_tensor(concentration.array[None]),
                                     torch.as_tensor(self.tissue.brain_mask, dtype=torch.float32))
        loss = float(loss[0])
        self.record(stage, loss, "fd", step, "tissue")
        return concentration, loss
