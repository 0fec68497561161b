#!/usr/bin/env python
"""How well a run's schedule predicts its wall time: the cost model behind hybrid's close-call cap.

`solver.schedule_run(...).work()` gives, before a run starts, its voxel-stencils (stencil applications times the voxels
of the active box they run on). This script times forward runs of the FD solver on the bundled
1 mm atlas (the tissue grid of the inversion benchmark, default steps) over a grid of mu_D, mu_rho and seeds, fits
seconds = a * voxel_stencils (least relative squares), and reports how far the prediction is off, for single runs
and for the time ratio of two runs (what the cap uses), with the shipped `solver.SECONDS_PER_VOXEL_STENCIL`.

    python benchmarks/solver_cost.py     # writes benchmarks/results/solver_cost.json and .png
"""
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from TumorPersonalizationLib.atlas import load_atlas  # noqa: E402
from TumorPersonalizationLib.solver import (SECONDS_PER_VOXEL_STENCIL, StepControl, TissueOperator,  # noqa: E402
                                            schedule_run, simulate_tensor)

# White matter deep in the right hemisphere (the demo's), a cortical-ish seed and one near the ventricles.
SEEDS_RAS_MM = [(28.0, -12.0, 24.0), (-40.0, -30.0, 10.0), (18.0, 20.0, 8.0)]
MU_D_MM = [3.0, 6.0, 9.0, 12.0, 15.0]
MU_RHO = [1.5, 3.0, 5.0]


def main():
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    tissue = load_atlas(1)
    operator = TissueOperator(tissue)
    rows = []
    with torch.no_grad():
        simulate_tensor(operator, [6.0], [3.0], [SEEDS_RAS_MM[0]])  # warm-up
        for seed, mu_d, mu_rho in itertools.product(SEEDS_RAS_MM, MU_D_MM, MU_RHO):
            schedule = schedule_run(operator, [mu_d], [mu_rho], [seed], StepControl())
            voxel_stencils, steps = schedule.work(), len(schedule.step_sizes)
            times = []
            for _ in range(2):
                started = time.perf_counter()
                simulate_tensor(operator, [mu_d], [mu_rho], [seed], control=StepControl())
                times.append(time.perf_counter() - started)
            rows.append({"seed_ras_mm": list(seed), "mu_d_mm": mu_d, "mu_rho": mu_rho, "voxel_stencils": voxel_stencils,
                         "steps": steps, "seconds": min(times), "loadavg": os.getloadavg()[0]})
            print(f"mu_D {mu_d:4.1f} mu_rho {mu_rho:3.1f} seed {seed}: {voxel_stencils / 1e9:6.2f} G voxel-stencils, "
                  f"{steps:4d} steps, {min(times):6.2f} s", flush=True)
    work = np.array([r["voxel_stencils"] for r in rows], dtype=np.float64)
    seconds = np.array([r["seconds"] for r in rows])
    per_second = work / seconds  # least squares of (a * work / seconds - 1): relative errors weigh alike
    a = float(per_second.sum() / (per_second * per_second).sum())
    shipped = SECONDS_PER_VOXEL_STENCIL * work
    for r, predicted in zip(rows, shipped):
        r["fitted_s"], r["shipped_model_s"] = float(a * r["voxel_stencils"]), float(predicted)
    relative = shipped / seconds
    # The cap compares two runs' costs: how far the predicted ratio of two runs' times is from the measured one.
    pair_ratio_error = []
    for i, j in itertools.combinations(range(len(rows)), 2):
        pair_ratio_error.append(abs(np.log((work[i] / work[j]) / (seconds[i] / seconds[j]))))
    summary = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
                   f"{torch.get_num_threads()}",
        "grid": "bundled atlas, 1 mm, default StepControl", "runs": len(rows),
        "fit_seconds_per_voxel_stencil": a, "shipped_seconds_per_voxel_stencil": SECONDS_PER_VOXEL_STENCIL,
        "shipped_predicted_over_measured": {"min": float(relative.min()), "median": float(np.median(relative)),
                                            "max": float(relative.max())},
        "pair_ratio_error_factor": {"median": float(np.exp(np.median(pair_ratio_error))),
                                     "p95": float(np.exp(np.percentile(pair_ratio_error, 95))),
                                     "max": float(np.exp(np.max(pair_ratio_error)))},
        "rows": rows,
    }
    out = ROOT / "benchmarks" / "results"
    (out / "solver_cost.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.scatter(seconds, shipped, s=14, label=f"shipped constant ({SECONDS_PER_VOXEL_STENCIL:.2g} s per voxel-stencil)")
    ax.scatter(seconds, a * work, s=14, marker="x", label=f"this run's fit ({a:.2g})")
    top = float(max(seconds.max(), shipped.max())) * 1.05
    ax.plot([0, top], [0, top], "k:", lw=1)
    ax.plot([0, top], [0, 1.4 * top], color="0.7", lw=0.8)
    ax.plot([0, top], [0, top / 1.4], color="0.7", lw=0.8)
    ax.set_xlabel("measured forward run (s)")
    ax.set_ylabel("predicted from the schedule (s)")
    ax.set_title("1 mm atlas: run time from the schedule's voxel-stencils\n(grey: a factor 1.4 either way)",
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "solver_cost.png", dpi=120)


if __name__ == "__main__":
    main()
