"""The optimisers the methods drive: bounded L-BFGS-B (scipy) with autograd gradients, and bounded CMA-ES (the cma
package), both in the unit cube of a search space, recording every loss they evaluate in the problem's history."""
import math
from typing import Callable, Optional, Tuple

import numpy as np
import torch

from ..parameters import GrowthParameters
from ..progress import ProgressCallback, check_cancel, report
from .problem import STEP_PROJECTED, STEP_SEARCH, Problem
from .space import SearchSpace


def lbfgs_b(problem: Problem, space: SearchSpace, loss_of: Callable, start: GrowthParameters, stage: str, kind: str,
            max_iterations: int, max_evaluations: int, ftol: float,
            progress: Optional[ProgressCallback], relative: bool = False) -> Tuple[GrowthParameters, float]:
    """Bounded L-BFGS (scipy's L-BFGS-B) in the unit cube of `space`, gradients by autograd through loss_of
    (seeds, mu_d, mu_rho tensors -> (1,) loss). Returns the best parameters seen and their loss.

    relative=True divides the objective by its value at the start, so `ftol` is relative to where the search began
    (the FD polish: the FD loss is the judge, so it may go as far as its budget allows). Without it, ftol is an
    absolute change of the loss (gb-surrogate, stopped at 1e-7 as published): going further on the surrogate's loss
    follows the surrogate's own error, and on held-out tumors its FD fit then gets worse, not better."""
    from scipy.optimize import minimize

    best = {"loss": math.inf, "unit": space.to_unit(start)}
    evaluations = [0]
    scale = [None]

    def objective(unit: np.ndarray):
        check_cancel(problem.cancel)
        x = torch.tensor(unit[None], dtype=torch.float64, requires_grad=True)
        seeds, mu_d, mu_rho = space.from_unit_tensor(x)
        loss = loss_of(seeds, mu_d, mu_rho)[0]
        loss.backward()
        value = float(loss.detach())
        if scale[0] is None:
            scale[0] = max(value, 1e-30) if relative else 1.0
        evaluations[0] += 1
        problem.record(stage, value, kind, STEP_SEARCH, _grid(kind))
        if value < best["loss"]:
            best.update(loss=value, unit=unit.copy())
        report(progress, min(evaluations[0] / max_evaluations, 1.0), f"{stage} loss {value:.3e}")
        gradient = x.grad.detach().numpy()[0].astype(np.float64)
        return value / scale[0], np.nan_to_num(gradient) / scale[0]

    minimize(objective, space.to_unit(start), jac=True, method="L-BFGS-B", bounds=[(0.0, 1.0)] * 5,
             options={"maxiter": max_iterations, "maxfun": max_evaluations, "ftol": ftol, "gtol": 1e-12})
    return _projected(problem, space, best["unit"], best["loss"], stage, kind,
                      lambda unit: _unit_loss(loss_of, space, unit))


def _unit_loss(loss_of: Callable, space: SearchSpace, unit: np.ndarray) -> float:
    with torch.no_grad():
        seeds, mu_d, mu_rho = space.from_unit_tensor(torch.tensor(np.asarray(unit)[None], dtype=torch.float64))
        return float(loss_of(seeds, mu_d, mu_rho)[0])


def _projected(problem: Problem, space: SearchSpace, unit: np.ndarray, loss: float, stage: str, kind: str,
               unit_loss: Callable) -> Tuple[GrowthParameters, float]:
    """The best point with its seed moved onto the allowed voxels, and the loss *there*: the optimisers search the
    seed's bounding box, and a seed just outside the brain can score well while the answer is the projected one."""
    raw = space.from_unit(unit, project=False)
    parameters = space.project(raw)
    if np.allclose(parameters.seed_ras_mm, raw.seed_ras_mm, atol=1e-6):
        return parameters, loss
    check_cancel(problem.cancel)
    loss = unit_loss(space.to_unit(parameters))
    problem.record(f"{stage}: projected seed", loss, kind, STEP_PROJECTED, _grid(kind))
    return parameters, loss


def cma_es(problem: Problem, space: SearchSpace, batch_losses: Callable, start: GrowthParameters, budget: int,
           stage: str, kind: str, loss_scale: float,
           progress: Optional[ProgressCallback]) -> Tuple[GrowthParameters, float, str]:
    """Bounded CMA-ES (the cma package) in the unit cube -> (parameters, loss, why it stopped).

    batch_losses(list of parameters) -> list of losses. Every candidate's seed is projected onto the allowed voxels
    before it is evaluated: the unit cube spans the allowed voxels' bounding box, and a seed in CSF or outside the
    head grows no tumor, so a generation drawn there scores the same loss throughout, and CMA-ES, reading that as a
    flat function, stops (it did after 26 runs on a 16 cm^3 benchmark case). The losses CMA-ES sees are divided by
    loss_scale (the loss of predicting no tumor), so options.cma_tolfun is relative to the tumor's own scale."""
    import cma

    options = {"bounds": [0.0, 1.0], "maxfevals": budget, "tolfun": problem.options.cma_tolfun,
               "seed": problem.options.random_seed, "verbose": -9}
    strategy = cma.CMAEvolutionStrategy(space.to_unit(start).tolist(), problem.options.cma_sigma0, options)
    scale = loss_scale if loss_scale > 0 else 1.0
    best = (math.inf, space.project(start))
    evaluations = 0
    while not strategy.stop():
        check_cancel(problem.cancel)
        population = strategy.ask()
        candidates = [space.from_unit(unit) for unit in population]
        losses = batch_losses(candidates)
        strategy.tell(population, [loss / scale for loss in losses])
        for parameters, loss in zip(candidates, losses):
            problem.record(stage, loss, kind, STEP_SEARCH, _grid(kind))
            if loss < best[0]:
                best = (float(loss), parameters)
        evaluations += len(population)
        report(progress, min(evaluations / budget, 1.0), f"{stage} best loss {best[0]:.3e} ({evaluations} runs)")
    stopped = ", ".join(f"{name} {value:g}" if isinstance(value, (int, float)) else str(name)
                        for name, value in strategy.stop().items())
    return best[1], best[0], stopped


def _grid(kind: str) -> str:
    """Where an optimiser's loss of this kind is computed: FD losses on the working grid, the others by the
    surrogate network."""
    return "working" if kind == "fd" else "network"
