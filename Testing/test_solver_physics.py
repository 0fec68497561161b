"""Physics of the FD solver: front speed, conservation, no flux into CSF, bounds, convergence, gradients."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import heterogeneous_tissue, make_tissue
from TumorPersonalizationLib.parameters import GrowthParameters
from TumorPersonalizationLib.solver import (INITIAL_AMPLITUDE, StepControl, TissueOperator, apply_laplacian,
                                            lattice_front, rkl2_coefficients, schedule_run, simulate, simulate_tensor,
                                            diffusion_step)


def _front_position(profile, spacing, level=0.5):
    """x (mm, from voxel 0's centre) where a decreasing profile crosses `level`, linearly interpolated."""
    above = np.nonzero(profile >= level)[0]
    n = int(above.max())
    c0, c1 = profile[n], profile[n + 1]
    return (n + (c0 - level) / (c0 - c1)) * spacing


def test_front_speed_in_white_matter_bar_matches_fisher_kpp():
    # Width mu_D/mu_rho = 1 mm resolved by 4 voxels; a state at time t of (D, rho) is simulate(sqrt(D t), sqrt(rho t)).
    spacing = 0.25
    bar = make_tissue(np.ones((1, 1, 560)), spacing=(spacing, spacing, spacing))
    operator = TissueOperator(bar, dtype=torch.float64)
    diffusivity, rho = 1.0, 1.0  # mm^2 and 1 per unit time: speed 2, width 1 mm
    seed = bar.geometry.index_kji_to_ras((0, 0, 20))
    times = (20.0, 40.0)
    positions = []
    for t in times:
        with torch.no_grad():
            c = simulate_tensor(operator, [math.sqrt(diffusivity * t)], [math.sqrt(rho * t)], [seed])
        profile = c[0, 0, 0].numpy()
        assert profile[-1] < 1e-8, "front reached the end of the bar"
        positions.append(_front_position(profile, spacing))
    # Bramson's logarithmic delay: x(t) = 2 sqrt(D rho) t - 3/2 sqrt(D/rho) ln t + const.
    log_correction = 1.5 * math.sqrt(diffusivity / rho) * math.log(times[1] / times[0])
    speed = (positions[1] - positions[0] + log_correction) / (times[1] - times[0])
    expected = 2.0 * math.sqrt(diffusivity * rho)
    assert abs(speed - expected) / expected < 0.05, (speed, expected)


def test_front_speed_lattice_formula_tends_to_continuum():
    speed, rate = lattice_front(3.0, 2.0, 0.01)
    assert speed == pytest.approx(12.0, rel=1e-3)
    assert rate == pytest.approx(2.0 / 3.0, rel=2e-2)
    coarse_speed, _ = lattice_front(2.0, 7.0, 2.0)
    assert coarse_speed > 1.5 * 28.0  # an under-resolved front runs ahead on the grid


def _csf_wall_tissue():
    wm = np.ones((16, 16, 30), np.float32)
    csf = np.zeros_like(wm)
    wm[:, :, 15:17] = 0.0
    csf[:, :, 15:17] = 1.0
    return make_tissue(wm, csf=csf)


def test_pure_diffusion_conserves_mass_and_nothing_crosses_csf():
    tissue = _csf_wall_tissue()
    operator = TissueOperator(tissue, dtype=torch.float64)
    seed = tissue.geometry.index_kji_to_ras((8, 8, 9))
    c0 = simulate_tensor(operator, [0.0], [0.0], [seed])[0].numpy()  # no diffusion, no growth: c(T) = c0
    with torch.no_grad():
        c = simulate_tensor(operator, [6.0], [0.0], [seed])[0].numpy()
    assert c0.sum() > 1.0
    assert abs(c.sum() - c0.sum()) / c0.sum() < 1e-4
    assert c[:, :, 14].max() > 1e-3, "diffusion did reach the wall"
    assert np.all(c[:, :, 15:] == 0.0), "tumor cells crossed the CSF wall"


def test_single_precision_also_conserves_mass():
    tissue = heterogeneous_tissue()
    operator = TissueOperator(tissue)
    seed = tissue.geometry.index_kji_to_ras((10, 11, 12))
    with torch.no_grad():
        c0 = simulate_tensor(operator, [0.0], [0.0], [seed])[0].double().sum()
        c = simulate_tensor(operator, [4.0], [0.0], [seed])[0].double().sum()
    assert abs(float(c - c0)) / float(c0) < 1e-4


def test_concentration_stays_in_unit_interval_and_outside_brain_is_zero():
    tissue = heterogeneous_tissue()
    operator = TissueOperator(tissue)
    seed = tissue.geometry.index_kji_to_ras((10, 11, 12))
    with torch.no_grad():
        c = simulate_tensor(operator, [5.0, 2.0, 12.0], [6.0, 1.0, 3.0], [seed])
    assert float(c.min()) >= 0.0 and float(c.max()) <= 1.0
    assert float(c.max()) > 0.99  # the fast-growing one saturates
    outside = ~torch.as_tensor(tissue.brain_mask)
    assert float(c[:, outside].abs().max()) == 0.0


def test_initial_condition_matches_design():
    tissue = make_tissue(np.ones((21, 21, 21)))
    operator = TissueOperator(tissue, dtype=torch.float64)
    seed = tissue.geometry.index_kji_to_ras((10, 10, 10))
    c0 = simulate_tensor(operator, [0.0], [0.0], [seed])[0].numpy()
    r2 = ((tissue.geometry.ras_grid() - seed) ** 2).sum(-1)
    expected = 250.0 / (4 * np.pi * 5) ** 1.5 * np.exp(-r2 / 20.0)
    expected[expected < 0.1] = 0.0
    assert INITIAL_AMPLITUDE == pytest.approx(0.5020, abs=1e-4)
    np.testing.assert_allclose(c0, expected, atol=1e-12)


@pytest.mark.parametrize("mu_d, mu_rho", [(8.0, 3.0), (15.0, 5.0), (3.0, 1.5)])
def test_refined_time_step_changes_result_by_less_than_1e3(atlas_2mm, mu_d, mu_rho):
    operator = TissueOperator(atlas_2mm)
    seed = (28.0, -12.0, 24.0)
    with torch.no_grad():
        default = simulate_tensor(operator, [mu_d], [mu_rho], [seed])
        refined = simulate_tensor(operator, [mu_d], [mu_rho], [seed], control=StepControl(refinement=2))
    assert float((default - refined).abs().max()) < 1e-3


@pytest.mark.parametrize("mu_d, mu_rho", [(8.0, 3.0), (20.0, 6.0), (3.0, 1.5)])
def test_working_grid_steps_stay_within_1e3_of_a_converged_run(atlas_2mm, mu_d, mu_rho):
    """The inversion's FD work on the 2 mm grid takes longer steps than the default; it keeps the solver's accuracy."""
    from TumorPersonalizationLib.inversion import InversionOptions

    operator = TissueOperator(atlas_2mm)
    seed = (28.0, -12.0, 24.0)
    with torch.no_grad():
        working = simulate_tensor(operator, [mu_d], [mu_rho], [seed], control=InversionOptions().working_step_control())
        converged = simulate_tensor(operator, [mu_d], [mu_rho], [seed], control=StepControl(refinement=4))
    assert float((working - converged).abs().max()) < 1e-3


@pytest.mark.parametrize("mu_d, mu_rho", [(4.0, 3.0), (6.0, 0.0), (4.0, 1.0), (1.5, 5.0)])
def test_active_region_matches_full_grid(atlas_2mm, mu_d, mu_rho):
    # (6, 0): no growth, only the spreading bump; (1.5, 5): a front narrower than a voxel, which runs ahead on the grid.
    # Every case is one whose box really cuts work (a box that covers the whole grid would pass trivially).
    operator = TissueOperator(atlas_2mm)
    seed = (28.0, -12.0, 24.0)
    with torch.no_grad():
        boxed, stats = simulate_tensor(operator, [mu_d], [mu_rho], [seed], return_stats=True)
        full = simulate_tensor(operator, [mu_d], [mu_rho], [seed], active_region=False)
    assert float((boxed - full).abs().max()) < 1e-5
    assert stats.active_voxels_final < 0.8 * stats.grid_voxels  # the box did cut work


@pytest.mark.parametrize("mu_d, mu_rho, control", [(4.0, 3.0, StepControl()), (12.0, 1.5, StepControl()),
                                                    (9.0, 5.0, StepControl(max_front_step_voxels=1.0))])
def test_schedule_predicts_the_work_the_run_does(atlas_2mm, monkeypatch, mu_d, mu_rho, control):
    """schedule_run(...).work() (hybrid's close-call cap prices runs with it before running them) equals the voxels the
    run's stencils really touch, counted during the run, and a larger mu_D costs more."""
    import TumorPersonalizationLib.solver as solver

    operator = TissueOperator(atlas_2mm)
    seed = (28.0, -12.0, 24.0)
    touched = []
    original = solver.laplacian
    monkeypatch.setattr(solver, "laplacian", lambda c, faces: touched.append(c.numel()) or original(c, faces))
    with torch.no_grad():
        _, stats = simulate_tensor(operator, [mu_d], [mu_rho], [seed], control=control, return_stats=True)
    schedule = schedule_run(operator, [mu_d], [mu_rho], [seed], control)
    assert len(touched) == stats.stencil_applications == sum(schedule.stage_counts)
    assert schedule.work() == sum(touched) and len(schedule.step_sizes) == stats.steps
    assert schedule_run(operator, [1.5 * mu_d], [mu_rho], [seed], control).work() > schedule.work()


def test_stop_hook_returns_the_tumor_at_the_stopping_time(atlas_2mm):
    """Stopping a run scheduled for (mu_D, mu_rho) at time t gives the tumor of (mu_D sqrt(t), mu_rho sqrt(t)): the
    dataset uses this to stop growth at a target visible volume."""
    operator = TissueOperator(atlas_2mm)
    seed = (28.0, -12.0, 24.0)
    voxels_wanted = 2000  # 16 cm^3 at 2 mm, well short of what T = 1 reaches
    seen = []

    def stop(t, c_box):
        seen.append(t)
        return float((c_box >= 0.25).sum()) >= voxels_wanted

    with torch.no_grad():
        stopped, stats = simulate_tensor(operator, [14.0], [4.0], [seed], return_stats=True, stop=stop)
        t = stats.end_time
        fresh = simulate_tensor(operator, [14.0 * math.sqrt(t)], [4.0 * math.sqrt(t)], [seed])
        full = simulate_tensor(operator, [14.0], [4.0], [seed])
    assert 0.05 < t < 0.95 and seen[-1] == t and seen == sorted(seen)
    visible = int((stopped >= 0.25).sum())
    assert voxels_wanted <= visible < 1.15 * voxels_wanted  # stopped at the first step past the target
    assert int((full >= 0.25).sum()) > 2 * voxels_wanted
    assert float((stopped - fresh).abs().max()) < 2e-3


def test_seed_outside_grid_gives_empty_tumor_not_a_crash():
    tissue = heterogeneous_tissue((8, 8, 8))
    operator = TissueOperator(tissue)
    with torch.no_grad():
        c = simulate_tensor(operator, [3.0], [2.0], [(500.0, -400.0, 300.0)])
    assert c.shape == (1, 8, 8, 8) and float(c.abs().max()) == 0.0


def test_batch_equals_individual_runs():
    tissue = heterogeneous_tissue()
    operator = TissueOperator(tissue, dtype=torch.float64)
    seeds = [tissue.geometry.index_kji_to_ras((10, 11, 12)), tissue.geometry.index_kji_to_ras((8, 9, 14))]
    mu_ds, mu_rhos = [4.0, 2.5], [3.0, 1.5]
    control = StepControl(max_step=0.005)  # both members step-limited alike, so only the stage counts differ
    with torch.no_grad():
        batch = simulate_tensor(operator, mu_ds, mu_rhos, seeds, control=control)
        single = [simulate_tensor(operator, [d], [r], [s], control=control)[0]
                  for d, r, s in zip(mu_ds, mu_rhos, seeds)]
    assert float((single[0] - single[1]).abs().max()) > 0.1  # the two members really differ
    for b in range(2):
        assert float((batch[b] - single[b]).abs().max()) < 1e-4


def test_rkl2_is_second_order_for_diffusion():
    tissue = make_tissue(np.ones((1, 1, 64)))
    operator = TissueOperator(tissue, dtype=torch.float64)
    x = torch.arange(64, dtype=torch.float64)
    mode = 6  # a Neumann eigenfunction of the discrete operator
    c0 = torch.cos(math.pi * mode * (x + 0.5) / 64).view(1, 1, 1, 64)
    eigenvalue = -2.0 * (1 - math.cos(math.pi * mode / 64))
    exact = c0 * math.exp(eigenvalue * 10.0)
    errors = []
    for steps in (2, 4, 8):  # dt = 5, 2.5, 1.25: within the 10-stage limit of 13.5
        c = c0.clone()
        dt = 10.0 / steps
        for _ in range(steps):
            c = diffusion_step(c, operator.faces, torch.tensor(dt, dtype=torch.float64), rkl2_coefficients(10))
        errors.append(float((c - exact).abs().max()))
    assert errors[0] < 1e-2
    assert errors[0] / errors[1] == pytest.approx(4.0, rel=0.15)
    assert errors[1] / errors[2] == pytest.approx(4.0, rel=0.15)


@pytest.mark.parametrize("stages", [5, 12])
def test_rkl2_stable_at_its_limit_and_laplacian_conservative(stages):
    tissue = heterogeneous_tissue((10, 12, 14))
    operator = TissueOperator(tissue, dtype=torch.float64)
    generator = torch.Generator().manual_seed(1)
    c = torch.rand((1, 10, 12, 14), dtype=torch.float64, generator=generator) * operator.brain_mask
    assert abs(float(apply_laplacian(c, operator.faces).sum())) < 1e-10
    # The true forward-Euler limit 2 / lambda_max (power iteration), not the Gershgorin bound the solver uses.
    v = torch.rand_like(c, generator=generator) * operator.brain_mask
    for _ in range(500):
        v = apply_laplacian(v, operator.faces)
        v = v / v.norm()
    lambda_max = float(-(v * apply_laplacian(v, operator.faces)).sum())
    assert 2.0 / lambda_max >= 1.0 / operator.max_row_sum  # the solver's bound is the safe side
    dt = 0.99 * (stages ** 2 + stages - 2) / 4 * 2.0 / lambda_max
    start = float(c.abs().max())
    for _ in range(300):
        c = diffusion_step(c, operator.faces, torch.tensor(dt, dtype=torch.float64), rkl2_coefficients(stages))
    assert float(c.abs().max()) <= start + 1e-9
    # Just beyond the limit the stiffest mode grows: the limit is real, so the test above is not vacuous.
    unstable = v.clone()
    for _ in range(300):
        unstable = diffusion_step(unstable, operator.faces, torch.tensor(1.1 * dt / 0.99, dtype=torch.float64),
                                   rkl2_coefficients(stages))
    assert not float(unstable.abs().max()) <= 10.0  # grew (possibly past float range)


def test_gradient_matches_central_finite_differences():
    tissue = heterogeneous_tissue((16, 16, 16), seed=3)
    operator = TissueOperator(tissue, dtype=torch.float64)
    weights = torch.rand((16, 16, 16), dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    seed0 = tissue.geometry.index_kji_to_ras((8.3, 7.6, 8.2))
    control = StepControl(max_step=0.02)

    def loss(mu_d, mu_rho, seed):
        c = simulate_tensor(operator, mu_d.view(1), mu_rho.view(1), seed.view(1, 3), control=control)
        return (c[0] * weights).sum()

    x = torch.tensor([3.0, 2.5, *seed0], dtype=torch.float64, requires_grad=True)
    value = loss(x[0], x[1], x[2:])
    value.backward()  # .backward(), not autograd.grad: the solver's checkpointing is reentrant (memory, see solver)
    gradient = x.grad
    for n, step in enumerate([1e-5, 1e-5, 1e-4, 1e-4, 1e-4]):
        with torch.no_grad():
            plus, minus = x.detach().clone(), x.detach().clone()
            plus[n] += step
            minus[n] -= step
            numeric = (loss(plus[0], plus[1], plus[2:]) - loss(minus[0], minus[1], minus[2:])) / (2 * step)
        assert float(gradient[n]) == pytest.approx(float(numeric), rel=1e-2, abs=1e-6), n
    assert abs(float(gradient[2:].norm())) > 1e-3  # the seed does move the answer


def test_a_solver_gradient_does_not_import_torch_dynamo():
    """torch's checkpoint() imports torch._dynamo on its first call (1.5-2.5 s here, paid by every command-line
    personalisation); the solver calls the plain function, so a gradient through it never loads the compiler."""
    import subprocess
    import sys

    script = ("import sys, torch\n"
              "from conftest import heterogeneous_tissue\n"
              "from TumorPersonalizationLib.solver import TissueOperator, simulate_tensor\n"
              "operator = TissueOperator(heterogeneous_tissue((12, 12, 12), seed=1))\n"
              "x = torch.tensor([3.0, 2.0], dtype=torch.float64, requires_grad=True)\n"
              "seed = operator.geometry.index_kji_to_ras((6.0, 6.0, 6.0))\n"
              "simulate_tensor(operator, x[:1], x[1:], [seed]).sum().backward()\n"
              "assert float(x.grad.abs().min()) > 0, x.grad\n"
              "print('dynamo' if 'torch._dynamo' in sys.modules else 'plain')\n")
    here = str(Path(__file__).resolve().parent)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=here, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "plain"


def test_simulate_on_working_grid_returns_tissue_grid(atlas_2mm):
    parameters = GrowthParameters((28.0, -12.0, 24.0), 8.0, 3.0)
    native = simulate(atlas_2mm, parameters)
    coarse = simulate(atlas_2mm, parameters, spacing_mm=4.0)
    assert coarse.geometry.same_grid(atlas_2mm.geometry)
    visible_native = native.array >= 0.25
    visible_coarse = coarse.array >= 0.25
    overlap = 2 * (visible_native & visible_coarse).sum() / (visible_native.sum() + visible_coarse.sum())
    assert overlap > 0.85


def test_front_in_grey_matter_runs_sqrt_one_tenth_as_fast_as_in_white_matter():
    """D_GM = D_WM / 10, so the Fisher-KPP speed 2 sqrt(D rho) in pure grey matter is sqrt(0.1) of white matter's."""
    spacing = 0.25
    speeds = {}
    for name, (wm, gm) in {"white": (1.0, 0.0), "grey": (0.0, 1.0)}.items():
        bar = make_tissue(np.full((1, 1, 560), wm), np.full((1, 1, 560), gm), spacing=(spacing,) * 3)
        operator = TissueOperator(bar, dtype=torch.float64)
        effective_d = 1.0 * (wm + 0.1 * gm)  # mm^2 per unit time: widths 1 and 0.32 mm, >= 1.3 voxels
        seed = bar.geometry.index_kji_to_ras((0, 0, 20))
        times = (20.0, 40.0) if name == "white" else (40.0, 80.0)
        positions = []
        for t in times:
            with torch.no_grad():
                c = simulate_tensor(operator, [math.sqrt(1.0 * t)], [math.sqrt(1.0 * t)], [seed])
            profile = c[0, 0, 0].numpy()
            assert profile[-1] < 1e-8
            positions.append(_front_position(profile, spacing))
        correction = 1.5 * math.sqrt(effective_d / 1.0) * math.log(times[1] / times[0])
        speeds[name] = (positions[1] - positions[0] + correction) / (times[1] - times[0])
    assert speeds["grey"] / speeds["white"] == pytest.approx(math.sqrt(0.1), rel=0.06), speeds


def test_rotated_anisotropic_grid_agrees_with_the_axis_aligned_one():
    """The same tissue and tumor on a grid rotated by 30 degrees with 1 x 1.5 x 2 mm voxels: the physics does not
    depend on how the image was acquired (compared at the rotated grid's voxel centres, away from the borders)."""
    from TumorPersonalizationLib.geometry import Geometry, resample_linear

    n = 48
    ras = make_tissue(np.ones((n, n, n)), spacing=(1.0, 1.0, 1.0), origin=(-23.5, -23.5, -23.5))
    radius = np.linalg.norm(ras.geometry.ras_grid(), axis=-1)
    wm = np.clip(20.0 - radius, 0.0, 1.0).astype(np.float32)  # a white-matter ball of radius 20 mm
    ras = make_tissue(wm, spacing=(1.0, 1.0, 1.0), origin=(-23.5, -23.5, -23.5))
    angle = np.deg2rad(30.0)
    direction = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0, 0, 1.0]])
    spacing = np.array([1.0, 1.5, 2.0])
    size_ijk = np.array([44, 30, 22])
    origin = -direction @ (spacing * (size_ijk - 1) / 2.0)
    rotated_geometry = Geometry(tuple(size_ijk[::-1]), tuple(spacing), tuple(origin), direction)
    rotated_wm = np.clip(20.0 - np.linalg.norm(rotated_geometry.ras_grid(), axis=-1), 0.0, 1.0).astype(np.float32)
    rotated = make_tissue(rotated_wm, spacing=tuple(spacing), origin=tuple(origin), direction=direction)
    parameters = GrowthParameters((3.0, -2.0, 1.0), 4.0, 2.5)
    aligned_c = simulate(ras, parameters).array
    rotated_c = simulate(rotated, parameters).array
    on_rotated = resample_linear(aligned_c, ras.geometry, rotated_geometry)
    inside = np.linalg.norm(rotated_geometry.ras_grid(), axis=-1) < 15.0
    assert rotated_c[inside].max() > 0.5
    assert np.abs(rotated_c - on_rotated)[inside].max() < 0.05
    from TumorPersonalizationLib.metrics import ncc

    assert ncc(rotated_c[inside], on_rotated[inside]) > 0.995


def test_laplacian_backward_is_the_adjoint_stencil():
    """The hand-written backward of the Laplacian (the operator is self-adjoint) against autograd's numerical check,
    on a tissue with every face rule (CSF pocket, mixed fractions) and a box with closed outer faces."""
    from TumorPersonalizationLib.solver import laplacian

    operator = TissueOperator(heterogeneous_tissue(shape=(6, 7, 8)), dtype=torch.float64)
    faces = operator.box_faces([(1, 6), (0, 6), (2, 8)])
    c = torch.rand((2, 5, 6, 6), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: laplacian(x, faces), (c,))


@pytest.mark.parametrize("mu_d, mu_rho", [(5.6, 5.3), (13.7, 2.8), (2.0, 8.0)])
def test_dataset_recipe_steps_stay_within_1e3_of_a_converged_run(atlas_2mm, mu_d, mu_rho):
    """The training-data recipes take longer steps than the solver's default; every sample stays within 1e-3 of a
    converged run, including the proliferative ones (5.6 / 5.3 was the sample the throughput benchmark found at
    1.14e-3 with reaction accuracy 0.5)."""
    from TumorPersonalizationLib.offline.dataset import recipe_config

    control = recipe_config("anatomy").step_control()
    assert control == recipe_config("shifted").step_control()
    operator = TissueOperator(atlas_2mm)
    seed = (28.0, -12.0, 24.0)
    converged_control = StepControl(max_front_step_voxels=control.max_front_step_voxels,
                                    reaction_accuracy=control.reaction_accuracy, refinement=4.0)
    with torch.no_grad():
        recipe = simulate_tensor(operator, [mu_d], [mu_rho], [seed], control=control)
        converged = simulate_tensor(operator, [mu_d], [mu_rho], [seed], control=converged_control)
    assert float((recipe - converged).abs().max()) < 1e-3
