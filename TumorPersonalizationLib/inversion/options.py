"""The methods' tunable settings and the smallest growth parameters they search."""
from dataclasses import dataclass
from typing import Dict, Tuple

from ..constants import STANDARD_MARGIN_MM
from ..registry import SHIPPED_MODELS
from ..solver import StepControl

# Smallest mu_D (mm) and mu_rho searched: below them a tumor hardly grows in its lifetime and the data carry no
# information (the training prior's smallest kept values were 0.9 mm and 1.7).
MIN_MU_D_MM = 0.5
MIN_MU_RHO = 0.5


@dataclass(frozen=True)
class InversionOptions:
    """Tunable settings of the methods (all have defaults that the benchmark used)."""

    surrogate: str = SHIPPED_MODELS["surrogate"]
    inverse: str = SHIPPED_MODELS["inverse"]
    seed_margin_mm: float = STANDARD_MARGIN_MM
    gb_ftol: float = 1e-7  # gb-surrogate stops when the loss changes by less than this per iteration
    gb_max_iterations: int = 200
    fd_iterations: int = 5  # hybrid-fd: L-BFGS-B iterations with FD gradients
    fd_max_evaluations: int = 8
    fd_trust_factor: float = 1.5  # hybrid-fd: mu_D and mu_rho stay within this factor of the polish's start
    # hybrid-fd: a start with mu_D at most this (mm, twice MIN_MU_D_MM) is compared with the same seed at mu_D times
    # each of floor_ladder_mu_d_factors and mu_rho times each of floor_ladder_mu_rho_factors, and the polish starts
    # from the lowest FD loss (methods.floor_ladder). 0 turns it off.
    floor_ladder_below_mm: float = 2 * MIN_MU_D_MM
    floor_ladder_mu_d_factors: Tuple[float, ...] = (2.0, 4.0, 8.0)
    floor_ladder_mu_rho_factors: Tuple[float, ...] = (1.0, 0.8, 0.6)
    # hybrid: a runner-up whose FD loss on the working grid is within this factor of the winner's is judged again,
    # with the winner, by FD runs on the tissue's own grid (the winner of that is the final run, so one run more,
    # not two). Why: the working grid's own discretisation error (larger for small tumors, and for segmentations,
    # whose labels the coarse grid blurs) can order two close candidates otherwise than the tissue grid, where the
    # answer is delivered (benchmarks/results/inversion.md: 6 of 16 segmentation close calls changed their pick). 0
    # turns it off.
    tissue_judge_ratio: float = 1.5
    # ... as long as the whole search stays within this many runs of the working grid's winner on the tissue's
    # grid: the networks (tissue_judge_fixed_s), the working grid's judge runs and the tissue-grid runs, each run's
    # cost predicted from its schedule (solver.schedule_run(...).work(), the voxel-stencils it will compute), not
    # measured, so the same input gets the same answer on any machine and under any load; otherwise the working
    # grid's winner stays. A runner-up with a larger mu_D than the winner can cost several of its runs, so pricing it
    # by the winner's first run alone lets the search exceed the cap (benchmarks/README.md, the inversion benchmark).
    tissue_judge_max_runs: float = 3.5
    # The networks' and the pipeline's fixed cost before the judge, in seconds of the benchmark's 2-core CPU (where
    # solver.SECONDS_PER_VOXEL_STENCIL was fitted): on the 1 mm atlas, hybrid runs without a close call take a
    # median 0.8 s more than one forward run of the true parameters, working-grid runs included
    # (benchmarks/results/inversion_runs.jsonl.gz).
    tissue_judge_fixed_s: float = 0.75
    # The inverse net's answer averaged with its answer to the left-right mirrored input (one more pass of a few
    # ms; inverse_net.predict_mirror_averaged). False: one pass.
    inverse_mirror_average: bool = True
    # FD runs on the working grid (judge, polish, cma-solver) take longer time steps than the solver's defaults (0.5
    # voxel, 0.4): the front may move 1 voxel per step and the reaction step is 0.5 / mu_rho^3. That stays within
    # 1e-3 (max abs) of a converged run on the 2 mm atlas up to mu_D 20 mm, mu_rho 6 (test_solver_physics), the
    # accuracy the defaults promise, and halves the steps of slow, front-limited tumors. The final run on the
    # tissue's grid keeps the defaults.
    fd_front_step_voxels: float = 1.0
    fd_reaction_accuracy: float = 0.5
    cma_sigma0: float = 0.25  # initial step, in units of the search box
    cma_surrogate_budget: int = 3000
    cma_solver_budget: int = 1500
    # CMA-ES stops when the losses of its recent generations differ by less than this, relative to the loss of
    # predicting no tumor (no_tumor_loss), or after its budget of evaluations.
    cma_tolfun: float = 1e-6
    random_seed: int = 1

    def working_step_control(self) -> StepControl:
        """The time-step control of FD runs on the working grid (see fd_front_step_voxels)."""
        return StepControl(max_front_step_voxels=self.fd_front_step_voxels,
                           reaction_accuracy=self.fd_reaction_accuracy)

    def to_dict(self) -> Dict:
        return dict(self.__dict__)
