"""The six inversion methods, each one function ``method(problem) -> Candidate``, and the registry that runs them by
name (see the package's docstring for what each does)."""
from dataclasses import replace
from typing import List, Optional

import numpy as np
import torch

from ..constants import METHODS
from ..errors import InputError
from ..inverse_net import inverse_answer
from ..parameters import MU_D_MM_BOUNDS, MU_RHO_BOUNDS, GrowthParameters
from ..progress import check_cancel, report, sub_progress
from .optimisers import cma_es, lbfgs_b
from .problem import STEP_JUDGE, Problem
from .space import Candidate, SearchSpace


def direct(problem: Problem) -> Candidate:
    """The inverse network's answer, projected into the search space: averaged with its answer to the left-right
    mirrored input (inverse_net.predict_mirror_averaged), or from one pass with options.inverse_mirror_average off."""
    check_cancel(problem.cancel)
    model, card, frame = problem.inverse()
    tissue = torch.as_tensor(frame.tissue_channels(problem.tissue)[None], dtype=torch.float32,
                             device=problem.device)
    tumor = torch.as_tensor(frame.sample(problem.observation.pseudo_concentration())[None], dtype=torch.float32,
                            device=problem.device)
    with torch.no_grad():
        answer = inverse_answer(model, tissue, tumor, problem.options.inverse_mirror_average)
    normalised = answer[0].cpu().double().numpy()
    seed, mu_d, mu_rho = frame.denormalise(normalised)
    raw = GrowthParameters(tuple(seed), float(np.clip(mu_d, 0, MU_D_MM_BOUNDS[1])),
                           float(np.clip(mu_rho, 0, MU_RHO_BOUNDS[1])))
    report(problem.progress, 1.0, "direct: inverse network")
    space = problem.network_space(card)
    return Candidate(space.project(raw), "direct", space=space)


def gb_surrogate(problem: Problem, start: Optional[Candidate] = None) -> Candidate:
    """L-BFGS-B on the frozen surrogate from the inverse net's answer (or `start`)."""
    start = start or direct(problem)
    surrogate = problem.surrogate()
    space = problem.network_space()
    parameters, loss = lbfgs_b(problem, space, surrogate.losses, space.project(start.parameters), "gb-surrogate",
                               "surrogate", problem.options.gb_max_iterations, 5 * problem.options.gb_max_iterations,
                               problem.options.gb_ftol, sub_progress(problem.progress, 0.0, 1.0))
    return Candidate(parameters, "gb-surrogate", surrogate_loss=loss, space=space)


def hybrid(problem: Problem) -> Candidate:
    """direct -> gb-surrogate; keep the candidate with the lower FD data loss on the working grid, or, when the two
    losses there are within options.tissue_judge_ratio, the lower loss of FD runs on the tissue's own grid (while
    that stays within options.tissue_judge_max_runs such runs); the winner then carries its run as the final one."""
    progress = problem.progress
    candidates = [direct(problem.with_progress(sub_progress(progress, 0.0, 0.05, "direct")))]
    candidates.append(gb_surrogate(problem.with_progress(sub_progress(progress, 0.05, 0.7, "gb-surrogate")),
                                   candidates[-1]))
    judged = []
    for n, candidate in enumerate(candidates):
        report(progress, 0.7 + 0.1 * n / len(candidates), f"hybrid: judging {len(candidates)} candidates with the FD "
                                                             f"solver")
        judged.append(problem.fd_loss(candidate, "hybrid: FD judge"))
    ranked = sorted(judged, key=lambda c: c.fd_loss)
    close = _close_calls(problem, ranked)
    winner = ranked[0]
    if len(close) > 1:
        # The cap, in predicted seconds: the networks, the working grid's judge runs, then the tissue-grid runs.
        spent = problem.options.tissue_judge_fixed_s + sum(problem.predicted_run_s(c.parameters, tissue_grid=False)
                                                           for c in judged)
        finalists, budget = [], None
        for n, candidate in enumerate(close):
            parameters = problem.space.project(candidate.parameters)  # as the pipeline's final run takes them
            cost = problem.predicted_run_s(parameters, tissue_grid=True)
            if budget is None:  # the working grid's winner: its run is the unit (it is the final run if alone)
                budget = problem.options.tissue_judge_max_runs * cost
            elif spent + cost > budget:  # too dear: the next runner-up may still fit
                problem.log.close_calls_not_judged += 1
                continue
            spent += cost
            concentration, loss = problem.tissue_grid_run(
                parameters, "hybrid: FD judge (tissue grid)", STEP_JUDGE,
                sub_progress(progress, 0.8 + 0.2 * n / len(close), 0.8 + 0.2 * (n + 1) / len(close),
                             f"hybrid: close call, judging {len(close)} candidates on the tissue's grid"))
            finalists.append(replace(candidate, parameters=parameters, final=concentration, final_loss=loss))
        winner = min(finalists, key=lambda c: c.final_loss)
    report(progress, 1.0, "hybrid: judged")
    return replace(winner, source=f"hybrid ({winner.source})")


def _vector(parameters: GrowthParameters) -> np.ndarray:
    return np.array(list(parameters.seed_ras_mm) + [parameters.mu_d_mm, parameters.mu_rho], dtype=np.float64)


def _close_calls(problem: Problem, ranked: List[Candidate]) -> List[Candidate]:
    """The working grid's winner and the runners-up whose FD loss is within options.tissue_judge_ratio of its loss
    (distinct parameters only); just the winner when the working grid is the tissue's grid (its judge was final)."""
    if problem.work_tissue is problem.tissue:
        return ranked[:1]
    ratio = problem.options.tissue_judge_ratio
    close = [ranked[0]]
    for candidate in ranked[1:]:
        seen = any(np.allclose(_vector(candidate.parameters), _vector(other.parameters), rtol=0, atol=1e-9)
                   for other in close)
        if not seen and candidate.fd_loss <= ratio * ranked[0].fd_loss:
            close.append(candidate)
    return close


def hybrid_fd(problem: Problem) -> Candidate:
    """hybrid's winner refined by L-BFGS-B with gradients through the FD solver on the working grid.

    hybrid's close calls are not judged again on the tissue's grid here: the polish moves the parameters, so that
    run would not be the final one, and the polish itself works on the working grid's loss."""
    start = hybrid(problem.with_progress(sub_progress(problem.progress, 0.0, 0.4, "hybrid"),
                                         replace(problem.options, tissue_judge_ratio=0.0)))
    start = floor_ladder(problem.with_progress(sub_progress(problem.progress, 0.4, 0.5, "floor ladder")), start)
    return fd_polish(problem.with_progress(sub_progress(problem.progress, 0.5, 1.0, "FD polish")), start)


def floor_ladder(problem: Problem, start: Candidate) -> Candidate:
    """The start, or the best of a ladder of larger mu_D (and smaller mu_rho) at its seed when that has a lower FD
    loss on the working grid, for a start whose mu_D lies near the search's floor.

    Why: for a small tumor with a narrow front the networks can answer mu_D at the floor of the search (0.5 mm)
    where the truth is six times larger (benchmarks/results/inversion.md, the worst case on the shifted brains). The
    data loss there lies in a narrow, curved valley (larger mu_D with smaller mu_rho) that the polish's few
    gradient steps within its trust box do not follow, so it stops within 2 % of the floor. Runs of a small mu_D
    are cheap (the front moves under a voxel a day), so the ladder costs a few seconds, only where it applies."""
    options = problem.options
    if start.parameters.mu_d_mm > options.floor_ladder_below_mm:
        return start
    if start.fd_loss is None:
        start = problem.fd_loss(start, "floor ladder: start")
    p0 = start.parameters
    rungs = [GrowthParameters(p0.seed_ras_mm, p0.mu_d_mm * d_factor, p0.mu_rho * rho_factor)
             for d_factor in options.floor_ladder_mu_d_factors for rho_factor in options.floor_ladder_mu_rho_factors]
    best = start
    for n, parameters in enumerate(rungs):
        report(problem.progress, n / len(rungs), f"hybrid-fd: mu_D near the floor, trying {len(rungs)} larger")
        rung = problem.fd_loss(Candidate(problem.space.project(parameters), "floor ladder", space=problem.space),
                               "hybrid-fd: floor ladder")
        if rung.fd_loss < best.fd_loss:
            best = rung
    return best if best is start else replace(best, source=f"{start.source}, floor ladder")


def fd_polish(problem: Problem, start: Candidate) -> Candidate:
    """A few L-BFGS-B iterations on the FD data loss (working grid, autograd through the solver) from `start`;
    returns the start unchanged when the polish does not lower its FD loss."""
    if start.fd_loss is None:
        start = problem.fd_loss(start, "FD polish: start")
    fd = problem.fd()
    # A polish, not a new search: mu_D and mu_rho may move by up to a factor 1.5 from the start (within the solver's
    # bounds). Unbounded, a line search's first trial can land on mu_D 40 mm, mu_rho 12, a run of thousands of steps
    # whose gradient takes minutes and gigabytes, to learn what the start already says: not there.
    factor = problem.options.fd_trust_factor
    p0 = start.parameters
    space = problem.space.with_ranges(
        (max(problem.space.mu_d_range[0], p0.mu_d_mm / factor), min(problem.space.mu_d_range[1], p0.mu_d_mm * factor)),
        (max(problem.space.mu_rho_range[0], p0.mu_rho / factor),
         min(problem.space.mu_rho_range[1], p0.mu_rho * factor)))
    parameters, loss = lbfgs_b(problem, space, lambda s, d, r: fd.losses(s, d, r, problem.cancel),
                               space.project(start.parameters), "hybrid-fd: FD gradients", "fd",
                               problem.options.fd_iterations, problem.options.fd_max_evaluations, 1e-9,
                               problem.progress, relative=True)
    if loss >= start.fd_loss:  # the polish never makes the answer worse than its start (its final run is kept)
        return replace(start, source=f"hybrid-fd ({start.source}, polish did not improve)")
    return Candidate(parameters, "hybrid-fd", fd_loss=loss, space=problem.space)  # bounds: the solver's, for warnings


def _box_centre(space: SearchSpace) -> GrowthParameters:
    return space.from_unit(np.full(5, 0.5))


def cma_surrogate(problem: Problem) -> Candidate:
    """Bounded CMA-ES on the surrogate, from the centre of the search box; population evaluated as one batch."""
    surrogate = problem.surrogate()
    space = problem.network_space()

    def batch_losses(population):
        values = torch.tensor([list(p.seed_ras_mm) + [p.mu_d_mm, p.mu_rho] for p in population], dtype=torch.float64)
        with torch.no_grad():
            return surrogate.losses(values[:, :3], values[:, 3], values[:, 4]).double().cpu().numpy().tolist()

    parameters, loss, stopped = cma_es(problem, space, batch_losses, _box_centre(space),
                                       problem.options.cma_surrogate_budget, "cma-surrogate", "surrogate",
                                       surrogate.no_tumor_loss(), problem.progress)
    return Candidate(parameters, "cma-surrogate", surrogate_loss=loss, space=space, stopped=stopped)


def cma_solver(problem: Problem) -> Candidate:
    """Bounded CMA-ES around the FD solver on the working grid (the classical, slow baseline)."""
    fd = problem.fd()
    space = problem.space

    def batch_losses(population):
        return [fd.loss_of(parameters, problem.cancel) for parameters in population]

    parameters, loss, stopped = cma_es(problem, space, batch_losses, _box_centre(space),
                                       problem.options.cma_solver_budget, "cma-solver", "fd", fd.no_tumor_loss(),
                                       problem.progress)
    return Candidate(parameters, "cma-solver", fd_loss=loss, space=space, stopped=stopped)

METHOD_FUNCTIONS = {"direct": direct, "gb-surrogate": gb_surrogate, "hybrid": hybrid, "hybrid-fd": hybrid_fd,
                    "cma-surrogate": cma_surrogate, "cma-solver": cma_solver}


def run_method(name: str, problem: Problem) -> Candidate:
    """The candidate of method `name` (one of constants.METHODS) on `problem`. InputError for an unknown name."""
    if name not in METHOD_FUNCTIONS:
        raise InputError(f"unknown method {name!r}: choose one of {', '.join(METHODS)}")
    return METHOD_FUNCTIONS[name](problem)
