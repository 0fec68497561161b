"""Finite-difference Fisher-Kolmogorov solver in PyTorch: CPU or CUDA, float32 or float64, batched, differentiable.

    dc/dt = div(D(x) grad c) + rho c (1 - c),  run to T = 1 with D_WM = mu_D^2, rho = mu_rho^2  (docs/model.md)

Space: conservative flux form on the image grid. The diffusivity of the face between two voxels is
D_WM * (mean WM fraction + mean GM fraction / 10), zero where either voxel has WM+GM < 0.1, so nothing flows into
CSF or background and the total mass changes only by proliferation.

Time: Strang splitting. The logistic reaction is integrated exactly,
    c <- c / (c + (1 - c) exp(-rho dt)),
which stays in [0, 1] for any step; diffusion is advanced by the second-order Runge-Kutta-Legendre super-time-
stepping scheme RKL2 (Meyer, Balsara & Aslam, J. Comput. Phys. 257, 2014), whose s stages are stable for steps up
to (s^2 + s - 2) / 4 times the forward-Euler limit. Both halves are second order, so the step is chosen by accuracy
(how far the front moves and how much the tumor grows per step), not by the explicit stability limit, and large
mu_D costs ~sqrt of the explicit number of stencil applications.

Work: only a box around the seed that can hold tumor cells is computed. Its radius at time t is
    v t + 5.7 mm + 8 / lambda + 12 mm
where v and lambda are the front speed and leading-edge decay rate on the grid (2 mu_D mu_rho and mu_rho / mu_D
when the front is resolved; see lattice_front), 5.7 mm the radius of the initial condition. The box grows in phases
as the tumor does, so early steps are cheap; the result equals the full-grid run to < 1e-5.

Gradients with respect to mu_D, mu_rho and the seed flow by autograd (the seed enters through the smooth Gaussian of
the initial condition); with gradients on, the time loop is checkpointed in segments so memory stays bounded. The
checkpointing is reentrant (nothing of a segment is kept), so take gradients with .backward(), not autograd.grad.
"""
import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _dynamo_guarded_checkpoint

from .constants import (BRAIN_FRACTION_THRESHOLD, GREY_TO_WHITE_DIFFUSIVITY, INITIAL_AMPLITUDE,  # noqa: F401
                        INITIAL_CUTOFF, INITIAL_RADIUS_MM, INITIAL_WIDTH_MM2)
from .errors import InputError
from .geometry import Volume, resample_linear
from .parameters import GrowthParameters
from .progress import ProgressCallback, check_cancel, report
from .tissue import Tissue

# torch wraps checkpoint() so that its first call imports torch._dynamo (1.5-2.5 s on this machine, once per process:
# most of the first FD gradient of a command-line personalisation). The solver is never compiled, so the guard has
# nothing to do here; functools.wraps keeps the plain function, used when present.
checkpoint = getattr(_dynamo_guarded_checkpoint, "__wrapped__", _dynamo_guarded_checkpoint)


@dataclass(frozen=True)
class StepControl:
    """How the time steps are chosen. The defaults keep the result within ~1e-3 (max abs) of a converged run.

    reaction_accuracy: the step obeys dt <= reaction_accuracy / mu_rho^3. The splitting error per step grows as
        (rho dt)^3 and rho / (rho dt) steps accumulate it, so the global error goes as rho (rho dt)^2.
    max_front_step_voxels: bound on how many voxels the front (speed 2 mu_D mu_rho) may move per step.
    max_step: no step longer than this (slow tumors still get a resolved history).
    ramp_levels: the first steps are dt/2^levels, ..., dt/2, so the sharp edge of the initial condition is
        resolved in time.
    stability_safety: fraction of the RKL2 stability limit used.
    max_stages: stages per RKL2 step; more steps are taken when the stability limit would need more.
    refinement: divide every step by this (convergence studies and references).
    """

    reaction_accuracy: float = 0.4
    max_front_step_voxels: float = 0.5
    max_step: float = 0.05
    ramp_levels: int = 3
    stability_safety: float = 0.9
    max_stages: int = 64
    refinement: float = 1.0


@dataclass
class SolverStats:
    steps: int
    max_stages_per_step: int
    stencil_applications: int
    max_dt: float
    active_voxels_final: int
    grid_voxels: int
    explicit_steps_for_stability: int  # forward-Euler steps the same grid would need just to stay stable
    end_time: float = 1.0  # < 1 when a stop condition ended the run early


# A run's wall time on the benchmark's 2-core CPU is about this many seconds per voxel-stencil (RunSchedule.work).
# benchmarks/solver_cost.py (45 runs on the 1 mm atlas) fits 1.98 ns; a shared machine's speed varies from run to
# run, and 2.2 ns is kept. With 2.2 ns the prediction is 0.53-1.64x the measured time (median 1.03; large boxes,
# which miss the cache, cost more per voxel). Where runs are only compared with each other (hybrid's
# close-call cap) the constant cancels; it converts a fixed cost in seconds into the same unit. On other hardware
# (a GPU) the unit is no longer seconds, but the ranking of runs holds.
SECONDS_PER_VOXEL_STENCIL = 2.2e-9


# Memory one checkpointed segment may hold while it is recomputed for the backward pass.
GRADIENT_SEGMENT_BYTES = 2e9


def c0_element_size(dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()


def lattice_front(mu_d_mm: float, mu_rho: float, spacing_mm: float) -> Tuple[float, float]:
    """Speed (mm per unit time) and leading-edge decay rate (1/mm) of the pulled front on a grid of this spacing.

    Linearising around c = 0 on the lattice, c ~ exp(-lambda (x - v t)) travels at
        v(lambda) = (rho + 2 D / h^2 (cosh(lambda h) - 1)) / lambda,
    and the front picks the minimum. As h -> 0 this is 2 sqrt(D rho) with lambda = 1 / width; when the front is
    narrower than a voxel (mu_D / mu_rho < h) the grid front runs faster than the continuum one (1.6x at
    mu_D = 2 mm, mu_rho = 7, h = 2 mm), so the active region has to follow the grid, not the formula.
    """
    rho, diffusivity = mu_rho ** 2, mu_d_mm ** 2
    if rho <= 0 or diffusivity <= 0:
        return 0.0, math.inf
    rates = np.geomspace(1e-3, 50.0, 4000) / spacing_mm
    speeds = (rho + 2.0 * diffusivity / spacing_mm ** 2 * (np.cosh(np.minimum(rates * spacing_mm, 700)) - 1)) / rates
    best = int(np.argmin(speeds))
    return float(speeds[best]), float(rates[best])


def active_radius_mm(mu_d_mm: float, mu_rho: float, t: float, spacing_mm: float) -> float:
    """Radius around the seed outside of which the concentration stays below ~1e-8 up to time t."""
    speed, rate = lattice_front(mu_d_mm, mu_rho, spacing_mm)
    # Pure diffusion of the initial bump: 6 standard deviations of a variance 10 + 2 D t mm^2 Gaussian.
    diffusive = 6.0 * math.sqrt(10.0 + 2.0 * mu_d_mm ** 2 * t)
    # Without growth (rate = inf) there is no front, only the spreading bump. A pulled front feels a cut-off of its
    # leading edge (it slows down, Brunet & Derrida 1997), and proliferation amplifies what a too-small early box
    # removed, so the margin is generous: the initial bump's radius, 8 decay lengths and 12 mm.
    tail = min(8.0 / rate, diffusive + speed * t) if math.isfinite(rate) else diffusive
    return speed * t + INITIAL_RADIUS_MM + tail + 12.0


class TissueOperator:
    """The tissue's diffusion operator on one device and dtype: face conductances divided by spacing^2.

    conductance_* are (WM + GM/10) averaged over the two voxels of a face, zero where either voxel is not brain;
    multiplied by mu_D^2 they give the face diffusivities of docs/model.md.
    """

    def __init__(self, tissue: Tissue, device="cpu", dtype=torch.float32):
        self.tissue = tissue
        self.geometry = tissue.geometry
        self.device = torch.device(device)
        self.dtype = dtype
        wm = torch.as_tensor(tissue.wm, dtype=torch.float64)
        gm = torch.as_tensor(tissue.gm, dtype=torch.float64)
        brain = (wm + gm) >= BRAIN_FRACTION_THRESHOLD
        mobility = wm + GREY_TO_WHITE_DIFFUSIVITY * gm
        faces = []
        for axis, spacing in enumerate(self.geometry.spacing_kji_mm):
            n = mobility.shape[axis]
            lo, hi = mobility.narrow(axis, 0, n - 1), mobility.narrow(axis, 1, n - 1)
            open_face = brain.narrow(axis, 0, n - 1) & brain.narrow(axis, 1, n - 1)
            faces.append(torch.where(open_face, 0.5 * (lo + hi), torch.zeros_like(lo)) / spacing ** 2)
        # Gershgorin: the operator's spectral radius is at most twice the largest diagonal, so forward Euler for
        # dc/dt = D_WM * L c is stable for dt <= 1 / (D_WM * max_row_sum).
        row_sum = torch.zeros_like(mobility)
        for axis, face in enumerate(faces):
            n = mobility.shape[axis]
            row_sum.narrow(axis, 0, n - 1).add_(face)
            row_sum.narrow(axis, 1, n - 1).add_(face)
        self.max_row_sum = float(row_sum.max())
        self.faces = [f.to(device=self.device, dtype=dtype).contiguous() for f in faces]
        self.brain_mask = brain.to(device=self.device, dtype=dtype)

    def box_faces(self, box) -> List[torch.Tensor]:
        """Face conductances of the faces strictly inside a box (its outer faces are closed: zero flux)."""
        (k0, k1), (j0, j1), (i0, i1) = box
        a_k = self.faces[0][k0:k1 - 1, j0:j1, i0:i1]
        a_j = self.faces[1][k0:k1, j0:j1 - 1, i0:i1]
        a_i = self.faces[2][k0:k1, j0:j1, i0:i1 - 1]
        return [a.contiguous() for a in (a_k, a_j, a_i)]

    def ras_grid(self, box) -> torch.Tensor:
        return torch.as_tensor(self.geometry.ras_grid(box), dtype=self.dtype, device=self.device)


def apply_laplacian(c: torch.Tensor, faces: Sequence[torch.Tensor]) -> torch.Tensor:
    """div(m grad c) with face conductances m (already / h^2); c is (B, K, J, I). Conservative: sums to zero."""
    out = torch.zeros_like(c)
    for axis, face in enumerate(faces, start=1):
        n = c.shape[axis]
        # In place where autograd allows it: each kernel over the grid costs about as much as the arithmetic.
        flux = c.narrow(axis, 1, n - 1) - c.narrow(axis, 0, n - 1)
        flux.mul_(face)
        out.narrow(axis, 0, n - 1).add_(flux)
        out.narrow(axis, 1, n - 1).sub_(flux)
    return out


class _SymmetricLaplacian(torch.autograd.Function):
    """apply_laplacian with a hand-written backward. The operator div(m grad .) with fixed face conductances (zero
    flux through the box's outer faces) is linear and self-adjoint, so the gradient of L(c) is L applied to the
    incoming gradient: one stencil, as cheap as the forward. Autograd's own backward of the in-place narrow/add
    stencil copied the whole grid several times per application and made a gradient ~10x a forward run."""

    @staticmethod
    def forward(ctx, c, *faces):
        ctx.faces = faces
        with torch.no_grad():
            return apply_laplacian(c, faces)

    @staticmethod
    def backward(ctx, grad_output):
        return (apply_laplacian(grad_output.contiguous(), ctx.faces),) + (None,) * len(ctx.faces)


def laplacian(c: torch.Tensor, faces: Sequence[torch.Tensor]) -> torch.Tensor:
    """apply_laplacian, differentiable in c through the symmetric backward when gradients are being recorded."""
    if torch.is_grad_enabled() and c.requires_grad:
        return _SymmetricLaplacian.apply(c, *faces)
    return apply_laplacian(c, faces)


def rkl2_coefficients(stages: int):
    """Per-stage (mu, nu, mu_tilde, gamma_tilde) of RKL2 (Meyer et al. 2014, eqs. 16-17), for stage j = 1..s."""
    s = stages
    if s < 2:
        raise ValueError("RKL2 needs at least 2 stages")
    w1 = 4.0 / (s * s + s - 2.0)
    b = [1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0] + [(j * j + j - 2.0) / (2.0 * j * (j + 1.0)) for j in range(3, s + 1)]
    a = [1.0 - bj for bj in b]
    coefficients = [(None, None, b[1] * w1, None)]  # stage 1: Y1 = Y0 + mu~_1 dt L(Y0), mu~_1 = b_1 w1
    for j in range(2, s + 1):
        mu = (2.0 * j - 1.0) / j * b[j] / b[j - 1]
        nu = -(j - 1.0) / j * b[j] / b[j - 2]
        mu_tilde = mu * w1
        gamma_tilde = -a[j - 1] * mu_tilde
        coefficients.append((mu, nu, mu_tilde, gamma_tilde))
    return coefficients


def rkl2_stages_for(dt: float, dt_explicit: float, safety: float) -> int:
    """Smallest s >= 2 with dt <= safety * dt_explicit * (s^2 + s - 2) / 4."""
    if not math.isfinite(dt_explicit):
        return 2
    ratio = dt / (safety * dt_explicit)
    s = math.ceil((-1.0 + math.sqrt(9.0 + 16.0 * ratio)) / 2.0)
    while (s * s + s - 2.0) / 4.0 < ratio:
        s += 1
    return max(2, s)


def diffusion_step(c, faces, diffusivity_dt, coefficients):
    """One RKL2 step of dc/dt = D L c over dt; diffusivity_dt = D_WM * dt per batch element, shaped (B,1,1,1)."""
    l0 = laplacian(c, faces).mul_(diffusivity_dt)
    y_prev2 = c
    y_prev = torch.add(c, l0, alpha=coefficients[0][2])
    for mu, nu, mu_tilde, gamma_tilde in coefficients[1:]:
        # Y_j = mu Y_j-1 + nu Y_j-2 + (1 - mu - nu) Y_0 + mu~ dt L(Y_j-1) + gamma~ dt L(Y_0), fused in place.
        y = torch.mul(y_prev, mu)
        y.add_(y_prev2, alpha=nu)
        y.add_(c, alpha=1.0 - mu - nu)
        y.addcmul_(laplacian(y_prev, faces), diffusivity_dt, value=mu_tilde)
        y.add_(l0, alpha=gamma_tilde)
        y_prev2, y_prev = y_prev, y
    return y_prev


def _logistic_step(c, decay):
    """Exact solution of dc/dt = rho c (1 - c) over a step, decay = exp(-rho dt) per batch element."""
    return c / (c + (1.0 - c) * decay)


def initial_condition(ras_grid: torch.Tensor, seeds_ras: torch.Tensor, brain_mask: torch.Tensor) -> torch.Tensor:
    """c0 of docs/model.md for each seed: (B, 3) seeds on a (K, J, I, 3) RAS grid -> (B, K, J, I)."""
    offsets = ras_grid.unsqueeze(0) - seeds_ras.view(-1, 1, 1, 1, 3)
    c0 = INITIAL_AMPLITUDE * torch.exp(-(offsets * offsets).sum(-1) / INITIAL_WIDTH_MM2)
    c0 = torch.where(c0 >= INITIAL_CUTOFF, c0, torch.zeros_like(c0)).clamp(max=1.0)
    return c0 * brain_mask


def _index_box(geometry, center_ras, radius_mm, shape) -> List[Tuple[int, int]]:
    center = geometry.ras_to_index_kji(center_ras)
    box = []
    for axis in range(3):
        half = radius_mm / geometry.spacing_kji_mm[axis]
        # Clipped to the grid, also for a seed outside it (an optimiser may go there): c0 is then just 0.
        lo = int(min(max(0, math.floor(center[axis] - half)), shape[axis] - 1))
        hi = int(max(min(shape[axis], math.ceil(center[axis] + half) + 1), lo + 1))
        box.append((lo, hi))
    return box


def _union(boxes):
    return [(min(b[a][0] for b in boxes), max(b[a][1] for b in boxes)) for a in range(3)]


def _pad_to(c: torch.Tensor, inner, outer) -> torch.Tensor:
    (k0, k1), (j0, j1), (i0, i1) = inner
    (K0, K1), (J0, J1), (I0, I1) = outer
    return F.pad(c, (i0 - I0, I1 - i1, j0 - J0, J1 - j1, k0 - K0, K1 - k1))


def schedule_steps(operator: TissueOperator, mu_d: np.ndarray, mu_rho: np.ndarray,
               control: StepControl) -> Tuple[List[float], float]:
    """Time steps (summing to 1) for a batch, the most demanding member setting them; and the explicit limit."""
    diffusivity_max = float(np.max(mu_d) ** 2)
    mu_rho_max = float(np.max(mu_rho))
    speed_max = float(np.max(2.0 * mu_d * mu_rho))
    h_min = min(operator.geometry.spacing_ijk_mm)
    dt = control.max_step
    if mu_rho_max > 0:
        dt = min(dt, control.reaction_accuracy / mu_rho_max ** 3)
    if speed_max > 0:
        dt = min(dt, control.max_front_step_voxels * h_min / speed_max)
    dt /= control.refinement
    dt_explicit = 1.0 / (diffusivity_max * operator.max_row_sum) if diffusivity_max * operator.max_row_sum > 0 \
        else math.inf
    # Keep the stage count bounded: if the stability limit would need more stages, take smaller steps.
    dt = min(dt, control.stability_safety * dt_explicit * (control.max_stages ** 2 + control.max_stages - 2) / 4)
    ramp = [dt / 2 ** level for level in range(control.ramp_levels, 0, -1)]
    while ramp and sum(ramp) >= 1.0:
        ramp.pop()
    remaining = 1.0 - sum(ramp)
    uniform = max(1, math.ceil(remaining / dt - 1e-9))
    return ramp + [remaining / uniform] * uniform, dt_explicit


@dataclass
class RunSchedule:
    """What a run will do, known before it starts: its time steps, RKL2 stages per step, and the active box of each
    phase (phase p ends after step phase_ends[p] - 1)."""

    step_sizes: List[float]
    dt_explicit: float
    stage_counts: List[int]
    phase_ends: List[int]
    boxes: List[List[Tuple[int, int]]]

    def work(self) -> int:
        """Voxel-stencils: the stencil applications times the voxels of the box they run on, summed over the run.
        A run's time is about proportional to it (SECONDS_PER_VOXEL_STENCIL), and it depends on the parameters and
        the grid only, so it ranks runs by cost the same way on every machine and in every run."""
        voxel_stencils, done = 0, 0
        for end, box in zip(self.phase_ends, self.boxes):
            voxels = int(np.prod([b - a for a, b in box]))
            voxel_stencils += voxels * int(sum(self.stage_counts[done:end]))
            done = end
        return voxel_stencils


def schedule_run(operator: TissueOperator, mu_d_mm, mu_rho, seed_ras_mm, control: StepControl = StepControl(),
                 phases: int = 4, active_region: bool = True) -> RunSchedule:
    """The schedule simulate_tensor follows for a batch (mu_d_mm, mu_rho: (B,) arrays; seed_ras_mm: (B, 3)): steps
    from schedule_steps, their RKL2 stage counts, and per phase the box outside of which the batch's concentration stays
    below ~1e-8 (the union over members, growing only)."""
    mu_d_np = np.atleast_1d(np.asarray(mu_d_mm, dtype=np.float64))
    mu_rho_np = np.atleast_1d(np.asarray(mu_rho, dtype=np.float64))
    seeds_np = np.asarray(seed_ras_mm, dtype=np.float64).reshape(-1, 3)
    batch = max(len(mu_d_np), len(mu_rho_np), len(seeds_np))
    mu_d_np, mu_rho_np = np.broadcast_to(mu_d_np, (batch,)), np.broadcast_to(mu_rho_np, (batch,))
    seeds_np = np.broadcast_to(seeds_np, (batch, 3))
    step_sizes, dt_explicit = schedule_steps(operator, mu_d_np, mu_rho_np, control)
    steps = len(step_sizes)
    stage_counts = [rkl2_stages_for(dt, dt_explicit, control.stability_safety) for dt in step_sizes]
    times = np.cumsum(step_sizes)
    shape = operator.geometry.shape_kji
    phases = max(1, min(phases, steps))
    phase_ends = [round(steps * (p + 1) / phases) for p in range(phases)]
    h_max = max(operator.geometry.spacing_ijk_mm)
    boxes, previous = [], None
    for end in phase_ends:
        radii = [active_radius_mm(mu_d_np[b], mu_rho_np[b], float(times[end - 1]), h_max) for b in range(batch)]
        box = _union([_index_box(operator.geometry, seeds_np[b], radii[b], shape) for b in range(batch)])
        box = box if previous is None else _union([box, previous])
        box = box if active_region else [(0, n) for n in shape]
        boxes.append(box)
        previous = box
    return RunSchedule(step_sizes, dt_explicit, stage_counts, phase_ends, boxes)


def simulate_tensor(operator: TissueOperator, mu_d_mm, mu_rho, seed_ras_mm, control: StepControl = StepControl(),
                    active_region: bool = True, progress: Optional[ProgressCallback] = None, return_stats: bool = False,
                    stop: Optional[Callable[[float, torch.Tensor], bool]] = None, cancel=None):
    """Simulate a batch of tumors to T = 1 on the operator's grid.

    mu_d_mm, mu_rho: tensors (B,) or floats; seed_ras_mm: (B, 3) or (3,). Any of them may require grad.
    active_region=False computes every voxel at every step (a reference for the box logic).
    stop(t, c_box): called (without gradients) after every step with the time t in (0, 1] and the solution on the
    active box; when it returns True the run ends there and returns c(t), which is the solution for
    mu_D sqrt(t), mu_rho sqrt(t) up to the step error (the steps were scheduled for t = 1, so they are no larger
    than a run scheduled for t would take). stats.end_time records t. Used to stop a growing tumor at a target volume.
    progress(fraction, message) is called after every segment of steps; cancel (progress.check_cancel) is checked
    before every segment and raises progress.Cancelled, so a cancelled run stops within one segment (a few steps).
    Returns c of shape (B, K, J, I) on the full grid (and SolverStats if return_stats).
    """
    device, dtype = operator.device, operator.dtype
    mu_d = torch.as_tensor(mu_d_mm, dtype=dtype, device=device).reshape(-1)
    rho_root = torch.as_tensor(mu_rho, dtype=dtype, device=device).reshape(-1)
    if not torch.is_tensor(seed_ras_mm):
        seed_ras_mm = np.asarray(seed_ras_mm, dtype=np.float64)
    seeds = torch.as_tensor(seed_ras_mm, dtype=dtype, device=device).reshape(-1, 3)
    batch = max(mu_d.shape[0], rho_root.shape[0], seeds.shape[0])
    mu_d, rho_root, seeds = mu_d.expand(batch), rho_root.expand(batch), seeds.expand(batch, 3)
    mu_d_np, mu_rho_np = mu_d.detach().cpu().double().numpy(), rho_root.detach().cpu().double().numpy()
    seeds_np = seeds.detach().cpu().double().numpy()
    if np.any(mu_d_np < 0) or np.any(mu_rho_np < 0) or not np.all(np.isfinite(seeds_np)):
        raise InputError("mu_D and mu_rho must be >= 0 and the seed finite")

    schedule = schedule_run(operator, mu_d_np, mu_rho_np, seeds_np, control, active_region=active_region)
    step_sizes, dt_explicit, stage_counts, phase_ends, boxes = (
        schedule.step_sizes, schedule.dt_explicit, schedule.stage_counts, schedule.phase_ends, schedule.boxes)
    steps, phases = len(step_sizes), len(phase_ends)
    coefficients = {s: rkl2_coefficients(s) for s in set(stage_counts)}
    mu_d_sq = (mu_d * mu_d).view(-1, 1, 1, 1)
    rho = (rho_root * rho_root).view(-1, 1, 1, 1)
    # Strang splitting: half a reaction step before the first diffusion step, then the two half steps that meet
    # between diffusion steps n and n+1 are one exact logistic step of (dt_n + dt_n+1) / 2.
    reaction_steps = [0.5 * step_sizes[0]] + [0.5 * (a + b) for a, b in zip(step_sizes[:-1], step_sizes[1:])]
    times = np.cumsum(step_sizes)

    shape = operator.geometry.shape_kji
    box = boxes[0]
    mask0 = operator.brain_mask[box[0][0]:box[0][1], box[1][0]:box[1][1], box[2][0]:box[2][1]]
    c = initial_condition(operator.ras_grid(box), seeds, mask0)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (mu_d, rho_root, seeds))
    # With gradients, a checkpointed segment keeps every stage's tensors (~16 boxes per stencil application) while it
    # is recomputed, so segments are cut by stencil applications, not steps: sqrt(all stencils) per segment balances
    # that against the stored segment inputs, capped so one recomputation stays within ~2 GB (segments of steps held
    # 64-stage steps whole: a fast, proliferative run needed > 24 GB and was killed).
    box_bytes = batch * max(int(np.prod([b - a for a, b in box])) for box in boxes) * c0_element_size(dtype)
    stencils_per_segment = max(8, min(math.ceil(math.sqrt(sum(stage_counts))),
                                      int(GRADIENT_SEGMENT_BYTES // (16 * box_bytes))))
    checkpoint_segments = max(1, int(math.sqrt(steps)))  # without gradients: progress and cancel every segment

    def advance(c_in, mu_d_sq_in, rho_in, faces, start, count):
        # Also runs again during the backward pass (checkpoint recomputation): a cancel stops a gradient too.
        check_cancel(cancel)
        for n in range(start, start + count):
            c_in = _logistic_step(c_in, torch.exp(-rho_in * reaction_steps[n]))
            c_in = diffusion_step(c_in, faces, mu_d_sq_in * step_sizes[n], coefficients[stage_counts[n]])
        if start + count == steps:
            c_in = _logistic_step(c_in, torch.exp(-rho_in * (0.5 * step_sizes[-1])))
        # RKL2 is not positivity preserving for the stiffest modes; undershoots are O(1e-7) and are cut here.
        return c_in.clamp(0.0, 1.0)

    done, end_time = 0, 1.0
    for phase, (end, box) in enumerate(zip(phase_ends, boxes)):
        if phase > 0:
            c = _pad_to(c, boxes[phase - 1], box)
        faces = operator.box_faces(box)
        segment = max(1, math.ceil((end - done) / max(1, checkpoint_segments // phases)))
        if stop is not None:
            segment = 1
        while done < end and end_time == 1.0:
            check_cancel(cancel)
            count = min(segment, end - done)
            if needs_grad:
                count, stencils = 1, stage_counts[done]
                while done + count < end and stencils + stage_counts[done + count] <= stencils_per_segment:
                    stencils += stage_counts[done + count]
                    count += 1
                # Reentrant checkpointing: the forward runs without building a graph, so nothing of a segment
                # stays in memory (the non-reentrant variant kept ~5 boxes per step here: 3.5 GB for a 315-step run
                # at 2 mm). mu_D^2 and rho are explicit inputs so that their gradients flow.
                c = checkpoint(advance, c, mu_d_sq, rho, faces, done, count, use_reentrant=True)
            else:
                c = advance(c, mu_d_sq, rho, faces, done, count)
            done += count
            report(progress, done / steps, f"FD step {done}/{steps}")
            if stop is not None and done < steps:
                # Finish the Strang step (its pending half reaction step) to have c at time t.
                c_now = _logistic_step(c, torch.exp(-rho * (0.5 * step_sizes[done - 1])))
                with torch.no_grad():
                    if stop(float(times[done - 1]), c_now.detach()):
                        c, end_time = c_now, float(times[done - 1])
        if end_time < 1.0:
            boxes = boxes[:phase + 1]
            break

    full = [(0, n) for n in shape]
    c = _pad_to(c, boxes[-1], full)
    if return_stats:
        final_box = boxes[-1]
        stats = SolverStats(steps, max(stage_counts), int(sum(stage_counts)), float(max(step_sizes)),
                            int(np.prod([b - a for a, b in final_box])), int(np.prod(shape)),
                            int(math.ceil(1.0 / dt_explicit)) if math.isfinite(dt_explicit) else 0, end_time)
        return c, stats
    return c


def simulate(tissue: Tissue, parameters: GrowthParameters, spacing_mm: Optional[float] = None, device: str = "cpu",
             control: StepControl = StepControl(), progress: Optional[ProgressCallback] = None,
             cancel=None) -> Volume:
    """Tumor-cell concentration at T = 1 for one parameter set, as an image on the tissue's own grid.

    tissue: the brain (any orientation and spacing); parameters: seed in RAS mm, mu_D in mm, mu_rho.
    spacing_mm: optional working grid (isotropic voxel size) for the computation; the answer is resampled back.
    device: "cpu" or "cuda". progress(fraction, message) and cancel: see progress.py.
    Raises InputError when the seed is not in grey or white matter (on the working grid too), progress.Cancelled.
    """
    check_seed(tissue, parameters.seed_ras_mm)
    work = tissue if spacing_mm is None else tissue.resample(spacing_mm)
    if spacing_mm is not None:
        check_seed(work, parameters.seed_ras_mm, working_grid=True)
    operator = TissueOperator(work, device=device)
    with torch.no_grad():
        c = simulate_tensor(operator, [parameters.mu_d_mm], [parameters.mu_rho], [parameters.seed_ras_mm],
                            control=control, progress=progress, cancel=cancel)
    array = c[0].cpu().numpy().astype(np.float32)
    if spacing_mm is None:
        return Volume(array, tissue.geometry)
    back = resample_linear(array, work.geometry, tissue.geometry)
    return Volume(np.clip(back, 0.0, 1.0) * tissue.brain_mask, tissue.geometry)


def check_seed(tissue: Tissue, seed_ras_mm, working_grid: bool = False) -> None:
    wm, gm, _ = tissue.fractions_at_ras(seed_ras_mm)
    if wm + gm < BRAIN_FRACTION_THRESHOLD:
        where = " on the working grid" if working_grid else ""
        raise InputError(f"seed {tuple(round(float(x), 1) for x in seed_ras_mm)} RAS mm is not in grey or white "
                         f"matter{where} (WM+GM = {wm + gm:.2f} < {BRAIN_FRACTION_THRESHOLD})")
