"""Inversion methods: find growth parameters whose forward run explains an observed tumor.

Every method is one function ``method(problem) -> Candidate`` over two forward models with the same interface
(a batch of parameters in, one data loss per member out):
- ``FDModel``: the finite-difference solver on the working grid (2 mm by default): slow, right, differentiable;
- ``SurrogateModel``: the frozen neural surrogate in its frame around the tumor: fast, differentiable, approximate.

Methods (the published comparison plus an FD-gradient polish):
- ``direct``: the inverse network alone (two forward passes: the tumor and its left-right mirror image, answers
  averaged; one with ``inverse_mirror_average=False``).
- ``gb-surrogate``: L-BFGS-B on the surrogate's loss with autograd gradients, from the inverse net's answer, until
  the loss changes by < 1e-7 per iteration.
- ``hybrid``: direct, then gb-surrogate; both candidates are run with the FD solver and the one with the lower FD data
  loss is kept (never the surrogate's own loss, which far from its training data can fall while the fit worsens,
  and never the ground truth). When the working grid's judge cannot tell them apart (losses within
  ``tissue_judge_ratio``), both are judged again on the tissue's own grid, and the winner's run is the final one.
- ``hybrid-fd``: hybrid's winner refined by a few L-BFGS-B iterations with gradients through the differentiable FD
  solver on the working grid, so the surrogate's error no longer limits the fit. A winner with mu_D near the
  search's floor is first compared with a small ladder of larger mu_D and smaller mu_rho (``floor_ladder``).
- ``cma-surrogate``: bounded CMA-ES (the ``cma`` package) on the surrogate, candidates evaluated in batches,
  gradients unused.
- ``cma-solver``: the classical baseline, bounded CMA-ES around the FD solver, with an evaluation budget.

The search space is bounded: the seed to brain voxels within the visible tumor dilated by 15 mm (the inverse net's
worst seed errors are about that; unbounded, a surrogate-driven search moved seeds out of the brain), mu_D and mu_rho
to the model card's ranges for network work and to the solver's bounds for FD work. Optimisers work in the unit cube
of that box, and a seed that ends outside the allowed voxels is projected onto the nearest allowed voxel.

Modules: ``options`` (InversionOptions), ``space`` (SearchSpace, Candidate), ``models`` (FDModel, SurrogateModel and
the ModelCache that builds them once per problem), ``problem`` (Problem, RunLog), ``optimisers`` (the L-BFGS-B and
CMA-ES drivers), ``methods`` (the six methods and run_method).
"""
from ..constants import METHODS
from .methods import (METHOD_FUNCTIONS, cma_solver, cma_surrogate, direct, fd_polish, floor_ladder, gb_surrogate,
                      hybrid, hybrid_fd, run_method)
from .models import FDModel, InverseNetwork, ModelCache, SurrogateModel
from .options import MIN_MU_D_MM, MIN_MU_RHO, InversionOptions
from .problem import GRIDS, STEP_FINAL, STEP_JUDGE, STEP_PROJECTED, STEP_SEARCH, STEPS, Problem, RunLog
from .space import Candidate, SearchSpace

__all__ = ["GRIDS", "STEPS", "STEP_FINAL", "STEP_JUDGE", "STEP_PROJECTED", "STEP_SEARCH",
           "METHODS", "METHOD_FUNCTIONS", "MIN_MU_D_MM", "MIN_MU_RHO", "Candidate", "FDModel", "InverseNetwork",
           "InversionOptions", "ModelCache", "Problem", "RunLog", "SearchSpace", "SurrogateModel", "cma_solver",
           "cma_surrogate", "direct", "fd_polish", "floor_ladder", "gb_surrogate", "hybrid", "hybrid_fd", "run_method"]
