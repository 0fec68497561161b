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
  solver on the working grid, so the surrogate's error no longer limits the fit.
- ``cma-surrogate``: bounded CMA-ES (the ``cma`` package) on the surrogate, candidates evaluated in batches,
  gradients unused.
- ``cma-solver``: the classical baseline, bounded CMA-ES around the FD solver, with an evaluation budget.

The search space is bounded: the seed to brain voxels within the visible tumor dilated by 15 mm (the inverse net's
worst seed errors are about that; unbounded, a surrogate-driven search moved seeds out of the brain), mu_D and mu_rho
to the model card's ranges for network work and to the solver's bounds for FD work. Optimisers work in the unit cube
of that box, and a seed that ends outside the allowed voxels is projected onto the nearest allowed voxel.
"""
import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from .constants import METHODS, STANDARD_MARGIN_MM
from .errors import InputError
from .frame import SurrogateFrame
from .geometry import Geometry, Volume, mask_bounds
from .inverse import inverse_answer
from .observation import GriddedObservation
from .parameters import MU_D_MM_BOUNDS, MU_RHO_BOUNDS, GrowthParameters
from .progress import ProgressCallback, check_cancel, report, sub_progress
from .registry import SHIPPED_MODELS
from .solver import SECONDS_PER_VOXEL_STENCIL, StepControl, TissueOperator, plan_run, simulate_tensor
from .surrogate import brain_mask_from_tissue
from .tissue import Tissue

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
    hybrid_seed_held: bool = False  # hybrid: also judge gb-surrogate with the inverse net's seed held (see hybrid)
    # hybrid: a runner-up whose FD loss on the working grid is within this factor of the winner's is judged again,
    # with the winner, by FD runs on the tissue's own grid (the winner of that is the final run, so one run more,
    # not two). Why: the working grid's own discretisation error (larger for small tumors, and for segmentations,
    # whose labels the coarse grid blurs) can order two close candidates otherwise than the tissue grid, where the
    # answer is delivered (benchmarks/inversion.md: 6 of 16 segmentation close calls changed their pick). 0 turns it
    # off.
    tissue_judge_ratio: float = 1.5
    # ... as long as the whole search stays within this many runs of the working grid's winner on the tissue's
    # grid: the networks (tissue_judge_fixed_s), the working grid's judge runs and the tissue-grid runs, each run's
    # cost predicted from its plan (solver.plan_run(...).work(), the voxel-stencils it will compute), not measured,
    # so the same input gets the same answer on any machine and under any load; otherwise the working grid's winner
    # stays. A runner-up with a larger mu_D than the winner can cost several of its runs, so pricing it by the
    # winner's first run alone lets the search exceed the cap (benchmarks/README.md, the inversion benchmark).
    tissue_judge_max_runs: float = 3.5
    # The networks' and the pipeline's fixed cost before the judge, in seconds of the benchmark's 2-core CPU (where
    # solver.SECONDS_PER_VOXEL_STENCIL was fitted): on the 1 mm atlas, hybrid runs without a close call take a
    # median 0.8 s more than one forward run of the true parameters, working-grid runs included
    # (benchmarks/inversion_runs.jsonl).
    tissue_judge_fixed_s: float = 0.75
    # The inverse net's answer averaged with its answer to the left-right mirrored input (one more pass of a few
    # ms; inverse.predict_mirror_averaged). False: one pass.
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
        from .plans import distance_mm

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
        atlas the whole grid's index arrays alone are 3 x 7.2 M int64 (173 MB), and the box is a small part of the grid."""
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


class FDModel:
    """The FD solver on the working grid, with the observation there: parameters -> data loss."""

    def __init__(self, tissue: Tissue, observation: GriddedObservation, device="cpu",
                 control: StepControl = StepControl()):
        if not tissue.geometry.same_grid(observation.geometry):
            raise ValueError("tissue and observation must share the working grid")
        self.operator = TissueOperator(tissue, device=device)
        self.observation = observation
        self.terms = observation.loss_terms(self.operator.device, self.operator.dtype)
        self.brain = self.operator.brain_mask
        self.control = control
        self.runs = 0

    def concentration(self, seeds, mu_d, mu_rho, cancel=None, progress=None) -> torch.Tensor:
        self.runs += 1
        return simulate_tensor(self.operator, mu_d, mu_rho, seeds, control=self.control, cancel=cancel,
                               progress=progress)

    def losses(self, seeds, mu_d, mu_rho, cancel=None) -> torch.Tensor:
        """(B, 3), (B,), (B,) tensors -> (B,) data losses (differentiable when the inputs require grad)."""
        return self.observation.loss(self.concentration(seeds, mu_d, mu_rho, cancel), self.brain, self.terms)

    def loss_of(self, parameters: GrowthParameters, cancel=None) -> float:
        with torch.no_grad():
            return float(self.losses([parameters.seed_ras_mm], [parameters.mu_d_mm], [parameters.mu_rho], cancel)[0])

    def no_tumor_loss(self) -> float:
        return self.observation.no_tumor_loss(self.brain, self.terms)


class SurrogateModel:
    """The frozen surrogate in its frame around the tumor: normalised parameters -> data loss in the frame."""

    def __init__(self, model, card: Dict, frame: SurrogateFrame, tissue: Tissue, observation: GriddedObservation,
                 device="cpu"):
        self.model, self.card, self.frame = model, card, frame
        self.device = torch.device(device)
        channels = frame.tissue_channels(tissue)
        self.tissue = torch.as_tensor(channels[None], dtype=torch.float32, device=self.device)
        self.brain = brain_mask_from_tissue(self.tissue)[0]
        self.observation = observation.in_frame(frame)
        self.terms = self.observation.loss_terms(self.device)
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        # The tissue half of the network, once: every candidate of a search shares it (about 40 % of a forward
        # pass), and nothing in it depends on the parameters, so no gradient flows through it.
        with torch.no_grad():
            self.encoded = self.model.encode(self.tissue)

    def predict(self, normalised: torch.Tensor) -> torch.Tensor:
        """(B, 5) normalised parameters -> (B, G, G, G) concentration in the frame."""
        return torch.sigmoid(self.model.decode(self.encoded, normalised))

    def losses(self, seeds, mu_d, mu_rho) -> torch.Tensor:
        normalised = self.frame.normalise(seeds, mu_d, mu_rho).to(torch.float32)
        return self.observation.loss(self.predict(normalised), self.brain, self.terms)

    def no_tumor_loss(self) -> float:
        return self.observation.no_tumor_loss(self.brain, self.terms)


@dataclass
class Problem:
    """Everything a method needs: tissue and observation on the tissue and working grids, the search space, the
    models (loaded on first use), options, progress, cancel and a history of loss evaluations."""

    tissue: Tissue
    observation: GriddedObservation
    work_tissue: Tissue
    work_observation: GriddedObservation
    space: SearchSpace
    options: InversionOptions = field(default_factory=InversionOptions)
    device: str = "cpu"
    progress: Optional[ProgressCallback] = None
    cancel: object = None
    history: List[Dict] = field(default_factory=list)
    models_used: Dict[str, Dict] = field(default_factory=dict)
    _fd: Optional[FDModel] = None
    _surrogate: Optional[SurrogateModel] = None
    _inverse: Optional[Tuple] = None
    _tissue_operator: Optional[TissueOperator] = None
    tissue_runs: int = 0  # FD runs on the tissue's own grid (the final run included once the pipeline made it)
    close_calls_not_judged: int = 0  # hybrid: close calls' runners-up left unjudged by the run cap
    _started: float = field(default_factory=time.perf_counter)

    # ---- models, on first use --------------------------------------------------------------------------------
    def fd(self) -> FDModel:
        if self._fd is None:
            self._fd = FDModel(self.work_tissue, self.work_observation, self.device,
                               self.options.working_step_control())
        return self._fd

    def _frame(self, card) -> SurrogateFrame:
        # Centred as the network's training crops were: on the whole concentration (the first datasets) or on its
        # visible part (the "anatomy" recipe), as recorded in the card's training-data configuration.
        anatomy = card.get("training_data", {}).get("config", {}).get("anatomy") or {}
        visible_only = anatomy.get("crop_center", "concentration") == "visible"
        return SurrogateFrame.from_card(card, self.observation.center_of_mass_ras(visible_only), self.tissue.geometry)

    def surrogate(self) -> SurrogateModel:
        if self._surrogate is None:
            from .registry import load_model

            model, card = load_model(self.options.surrogate, kind="surrogate", device=self.device)
            self.models_used[self.options.surrogate] = {"kind": "surrogate", "sha256": card["sha256"]}
            self._surrogate = SurrogateModel(model, card, self._frame(card), self.tissue, self.observation,
                                             self.device)
        return self._surrogate

    def inverse(self):
        if self._inverse is None:
            from .registry import load_model

            model, card = load_model(self.options.inverse, kind="inverse", device=self.device)
            self.models_used[self.options.inverse] = {"kind": "inverse", "sha256": card["sha256"]}
            self._inverse = (model, card, self._frame(card))
        return self._inverse

    def network_space(self, card: Optional[Dict] = None) -> SearchSpace:
        """The search space clipped to a network's trained ranges (its card's scaling; the surrogate's by default)."""
        from .parameters import ParameterScaling

        scaling = ParameterScaling.from_dict((card or self.surrogate().card)["scaling"])
        return self.space.with_ranges(
            (max(scaling.mu_d_mm_range[0], MIN_MU_D_MM), min(scaling.mu_d_mm_range[1], self.space.mu_d_range[1])),
            (max(scaling.mu_rho_range[0], MIN_MU_RHO), min(scaling.mu_rho_range[1], self.space.mu_rho_range[1])))

    # ---- bookkeeping -----------------------------------------------------------------------------------------
    def record(self, stage: str, loss: float, kind: str) -> None:
        self.history.append({"evaluation": len(self.history) + 1, "stage": stage, "loss": float(loss),
                             "loss_kind": kind, "elapsed_s": round(time.perf_counter() - self._started, 3)})

    def fd_loss(self, candidate: Candidate, stage: str) -> Candidate:
        """The judge: the candidate's data loss from an FD run on the working grid."""
        loss = self.fd().loss_of(candidate.parameters, self.cancel)
        self.record(stage, loss, "fd")
        return replace(candidate, fd_loss=loss)

    def tissue_operator(self) -> TissueOperator:
        """The solver's operator on the tissue's own grid, built once: a judge's runs and the final run share it."""
        if self._tissue_operator is None:
            self._tissue_operator = TissueOperator(self.tissue, device=self.device)
        return self._tissue_operator

    def predicted_run_s(self, parameters: GrowthParameters, tissue_grid: bool) -> float:
        """The predicted cost of one FD run of `parameters`, on the tissue's grid (the solver's default steps) or
        the working grid (the working steps), from the work its plan says it will do, in seconds of the benchmark's
        CPU (solver.SECONDS_PER_VOXEL_STENCIL). Deterministic: no clock is read."""
        operator, control = ((self.tissue_operator(), StepControl()) if tissue_grid
                             else (self.fd().operator, self.fd().control))
        # Rounded to the operator's dtype first, as simulate_tensor rounds them, so the plan is the run's own.
        values = torch.tensor([parameters.mu_d_mm, parameters.mu_rho, *parameters.seed_ras_mm],
                              dtype=operator.dtype).double().numpy()
        plan = plan_run(operator, values[:1], values[1:2], values[2:].reshape(1, 3), control)
        return SECONDS_PER_VOXEL_STENCIL * plan.work()

    def tissue_grid_run(self, parameters: GrowthParameters, stage: str,
                        progress: Optional[ProgressCallback] = None) -> Tuple[Volume, float]:
        """The FD run of `parameters` on the tissue's own grid (the solver's default steps, as `simulate`) and its
        data loss against the observation there: (concentration image, loss). InputError if the seed is not in
        grey or white matter."""
        from .solver import check_seed

        check_seed(self.tissue, parameters.seed_ras_mm)
        with torch.no_grad():
            c = simulate_tensor(self.tissue_operator(), [parameters.mu_d_mm], [parameters.mu_rho],
                                [parameters.seed_ras_mm], control=StepControl(), progress=progress,
                                cancel=self.cancel)
        self.tissue_runs += 1
        concentration = Volume(c[0].cpu().numpy().astype(np.float32), self.tissue.geometry)
        loss = self.observation.loss(torch.as_tensor(concentration.array[None]),
                                     torch.as_tensor(self.tissue.brain_mask, dtype=torch.float32))
        loss = float(loss[0])
        self.record(stage, loss, "fd")
        return concentration, loss


# ---- optimisers --------------------------------------------------------------------------------------------------
def _lbfgs(problem: Problem, space: SearchSpace, loss_of: Callable, start: GrowthParameters, stage: str, kind: str,
           max_iterations: int, max_evaluations: int, ftol: float,
           progress: Optional[ProgressCallback], relative: bool = False,
           hold_seed: bool = False) -> Tuple[GrowthParameters, float]:
    """Bounded L-BFGS (scipy's L-BFGS-B) in the unit cube of `space`, gradients by autograd through loss_of
    (seeds, mu_d, mu_rho tensors -> (1,) loss). Returns the best parameters seen and their loss.
    hold_seed=True searches mu_D and mu_rho only, the seed held at the start's (its bounds closed on it).

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
        problem.record(stage, value, kind)
        if value < best["loss"]:
            best.update(loss=value, unit=unit.copy())
        report(progress, min(evaluations[0] / max_evaluations, 1.0), f"{stage} loss {value:.3e}")
        gradient = x.grad.detach().numpy()[0].astype(np.float64)
        return value / scale[0], np.nan_to_num(gradient) / scale[0]

    start_unit = space.to_unit(start)
    bounds = [(u, u) for u in start_unit[:3]] + [(0.0, 1.0)] * 2 if hold_seed else [(0.0, 1.0)] * 5
    minimize(objective, start_unit, jac=True, method="L-BFGS-B", bounds=bounds,
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
    problem.record(f"{stage}: projected seed", loss, kind)
    return parameters, loss


def _cma(problem: Problem, space: SearchSpace, batch_losses: Callable, start: GrowthParameters, budget: int,
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
            problem.record(stage, loss, kind)
            if loss < best[0]:
                best = (float(loss), parameters)
        evaluations += len(population)
        report(progress, min(evaluations / budget, 1.0), f"{stage} best loss {best[0]:.3e} ({evaluations} runs)")
    stopped = ", ".join(f"{name} {value:g}" if isinstance(value, (int, float)) else str(name)
                        for name, value in strategy.stop().items())
    return best[1], best[0], stopped


# ---- methods -----------------------------------------------------------------------------------------------------
def direct(problem: Problem) -> Candidate:
    """The inverse network's answer, projected into the search space: averaged with its answer to the left-right
    mirrored input (inverse.predict_mirror_averaged), or from one pass with options.inverse_mirror_average off."""
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


def gb_surrogate(problem: Problem, start: Optional[Candidate] = None, hold_seed: bool = False) -> Candidate:
    """L-BFGS-B on the frozen surrogate from the inverse net's answer (or `start`); hold_seed=True fits mu_D and
    mu_rho only, the seed held at the start's."""
    start = start or direct(problem)
    surrogate = problem.surrogate()
    space = problem.network_space()
    name = "gb-surrogate (seed held)" if hold_seed else "gb-surrogate"
    parameters, loss = _lbfgs(problem, space, surrogate.losses, space.project(start.parameters), name,
                              "surrogate", problem.options.gb_max_iterations, 5 * problem.options.gb_max_iterations,
                              problem.options.gb_ftol, sub_progress(problem.progress, 0.0, 1.0), hold_seed=hold_seed)
    return Candidate(parameters, name, surrogate_loss=loss, space=space)


def hybrid(problem: Problem) -> Candidate:
    """direct -> gb-surrogate; keep the candidate with the lower FD data loss on the working grid, or, when the two
    losses there are within options.tissue_judge_ratio, the lower loss of FD runs on the tissue's own grid (while
    that stays within options.tissue_judge_max_runs such runs); the winner then carries its run as the final one.

    With options.hybrid_seed_held, gb-surrogate runs in two stages, mu_D and mu_rho first with the inverse net's seed
    held, then all five from there, and the FD solver judges all three candidates: a surrogate whose tumor follows
    its seed only part of the way (benchmarks/seed_response.py) can pull the seed away to fit its own error, and the
    held-seed candidate keeps the inverse net's seed with fitted mu's in the running."""
    progress = problem.progress
    candidates = [direct(replace_progress(problem, sub_progress(progress, 0.0, 0.05, "direct")))]
    free_from = 0.05
    if problem.options.hybrid_seed_held:  # the free search then starts from the held one
        candidates.append(gb_surrogate(replace_progress(problem, sub_progress(progress, 0.05, 0.3,
                                                                              "gb-surrogate, seed held")),
                                       candidates[0], hold_seed=True))
        free_from = 0.3
    candidates.append(gb_surrogate(replace_progress(problem, sub_progress(progress, free_from, 0.7, "gb-surrogate")),
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
                problem.close_calls_not_judged += 1
                continue
            spent += cost
            concentration, loss = problem.tissue_grid_run(
                parameters, "hybrid: FD judge (tissue grid)",
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
    start = hybrid(replace_progress(problem, sub_progress(problem.progress, 0.0, 0.4, "hybrid"),
                                    replace(problem.options, tissue_judge_ratio=0.0)))
    return fd_polish(replace_progress(problem, sub_progress(problem.progress, 0.4, 1.0, "FD polish")), start)


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
        (max(problem.space.mu_rho_range[0], p0.mu_rho / factor), min(problem.space.mu_rho_range[1], p0.mu_rho * factor)))
    parameters, loss = _lbfgs(problem, space, lambda s, d, r: fd.losses(s, d, r, problem.cancel),
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

    parameters, loss, stopped = _cma(problem, space, batch_losses, _box_centre(space),
                                     problem.options.cma_surrogate_budget, "cma-surrogate", "surrogate",
                                     surrogate.no_tumor_loss(), problem.progress)
    return Candidate(parameters, "cma-surrogate", surrogate_loss=loss, space=space, stopped=stopped)


def cma_solver(problem: Problem) -> Candidate:
    """Bounded CMA-ES around the FD solver on the working grid (the classical, slow baseline)."""
    fd = problem.fd()
    space = problem.space

    def batch_losses(population):
        return [fd.loss_of(parameters, problem.cancel) for parameters in population]

    parameters, loss, stopped = _cma(problem, space, batch_losses, _box_centre(space),
                                     problem.options.cma_solver_budget, "cma-solver", "fd", fd.no_tumor_loss(),
                                     problem.progress)
    return Candidate(parameters, "cma-solver", fd_loss=loss, space=space, stopped=stopped)


def replace_progress(problem: Problem, progress: Optional[ProgressCallback],
                     options: Optional[InversionOptions] = None) -> "_SharedProblem":
    """The same problem (same models, history and cancel flag) reporting to another progress callback, and seen by
    the method it is handed to with other options when given."""
    return _SharedProblem(problem, progress, options)


class _SharedProblem:
    """A view of a Problem with its own progress callback (and options, when given); models and history are shared
    with the parent, whose models keep the parent's options."""

    def __init__(self, parent: Problem, progress, options: Optional[InversionOptions] = None):
        object.__setattr__(self, "_parent", parent)
        object.__setattr__(self, "progress", progress)
        if options is not None:
            object.__setattr__(self, "options", options)

    def __getattr__(self, name):
        return getattr(self._parent, name)

    def __setattr__(self, name, value):
        setattr(self._parent, name, value)


METHOD_FUNCTIONS = {"direct": direct, "gb-surrogate": gb_surrogate, "hybrid": hybrid, "hybrid-fd": hybrid_fd,
                    "cma-surrogate": cma_surrogate, "cma-solver": cma_solver}


def run_method(name: str, problem: Problem) -> Candidate:
    if name not in METHOD_FUNCTIONS:
        raise InputError(f"unknown method {name!r}: choose one of {', '.join(METHODS)}")
    return METHOD_FUNCTIONS[name](problem)
