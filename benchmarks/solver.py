#!/usr/bin/env python
"""Benchmark of the FD solver on the bundled atlas: wall time, steps, peak memory and accuracy.

For each (mu_D, mu_rho) the default solver is timed (median of repeats) and compared with a converged reference,
the same solver with every time step divided by --refinement (second order: the reference's own error is ~1/16 of
the default's at 4x). Peak resident memory is read from /proc (VmHWM, reset before each case).

    python benchmarks/solver.py            # writes benchmarks/results/solver.json and .png
    python benchmarks/solver.py --quick    # fewer cases

Reference toolkit figures (numpy TumorGrowthToolkit, same machine kind, mu_D 7.1 mm, mu_rho 3.2) are quoted, not
re-measured here: 4.5 s at 2 mm, 61-64 s at 1 mm.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from TumorPersonalizationLib.atlas import load_atlas  # noqa: E402
from TumorPersonalizationLib.metrics import ncc  # noqa: E402
from TumorPersonalizationLib.solver import StepControl, TissueOperator, simulate_tensor  # noqa: E402

SEED_RAS_MM = (28.0, -12.0, 24.0)  # right-hemisphere white matter, as in the demo
TOOLKIT_SECONDS = {"2mm": 4.5, "1mm": 64.0}


def _reset_peak_memory():
    try:
        with open("/proc/self/clear_refs", "w") as stream:
            stream.write("5")
    except OSError:
        pass


def _peak_memory_mb():
    try:
        with open("/proc/self/status") as stream:
            for line in stream:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def run_case(operator, mu_d, mu_rho, refinement, repeats, with_reference=True):
    times = []
    _reset_peak_memory()
    baseline_mb = _peak_memory_mb()
    with torch.no_grad():
        for _ in range(repeats):
            started = time.perf_counter()
            c, stats = simulate_tensor(operator, [mu_d], [mu_rho], [SEED_RAS_MM], return_stats=True)
            times.append(time.perf_counter() - started)
            if times[-1] > 3.0:
                break
    peak_mb = _peak_memory_mb()
    row = {
        "mu_d_mm": mu_d, "mu_rho": mu_rho, "wall_s": statistics.median(times), "repeats": len(times),
        "steps": stats.steps, "max_stages_per_step": stats.max_stages_per_step,
        "stencil_applications": stats.stencil_applications,
        "explicit_steps_for_stability": stats.explicit_steps_for_stability,
        "active_voxels_final": stats.active_voxels_final,
        "grid_voxels": stats.grid_voxels, "peak_rss_mb": round(peak_mb, 1),
        "peak_rss_above_start_mb": round(peak_mb - baseline_mb, 1),
    }
    if with_reference:
        with torch.no_grad():
            reference = simulate_tensor(operator, [mu_d], [mu_rho], [SEED_RAS_MM],
                                        control=StepControl(refinement=refinement))
        brain = operator.tissue.brain_mask
        a, b = c[0].numpy(), reference[0].numpy()
        row.update({"reference_refinement": refinement, "max_abs_error": float(np.abs(a - b).max()),
                    "ncc_vs_reference": ncc(a[brain], b[brain])})
    return row


def gradient_case(operator, mu_d, mu_rho):
    """A gradient (forward + backward through the solver) against a plain forward run of the same case: time,
    their ratio and the peak memory."""
    with torch.no_grad():
        started = time.perf_counter()
        simulate_tensor(operator, [mu_d], [mu_rho], [SEED_RAS_MM])
        forward = time.perf_counter() - started
    x = torch.tensor([mu_d, mu_rho], requires_grad=True)
    seed = torch.tensor(SEED_RAS_MM, requires_grad=True)
    _reset_peak_memory()
    started = time.perf_counter()
    c = simulate_tensor(operator, x[:1], x[1:], seed.view(1, 3))
    c.sum().backward()
    elapsed = time.perf_counter() - started
    return {"mu_d_mm": mu_d, "mu_rho": mu_rho, "forward_backward_s": elapsed, "forward_s": forward,
            "gradient_in_forward_runs": elapsed / forward, "peak_rss_mb": round(_peak_memory_mb(), 1),
            "grad_mu_d": float(x.grad[0]), "grad_mu_rho": float(x.grad[1])}


GRADIENT_CASES = ((8.0, 3.0), (30.0, 8.0))  # a typical tumor, and a fast proliferative one (once > 24 GB)


def gradient_cases(operator):
    rows = []
    for mu_d, mu_rho in GRADIENT_CASES:
        rows.append(gradient_case(operator, mu_d, mu_rho))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["cases_2mm"]
    mu_ds = sorted({r["mu_d_mm"] for r in rows})
    mu_rhos = sorted({r["mu_rho"] for r in rows})
    wall = np.full((len(mu_rhos), len(mu_ds)), np.nan)
    error = np.full_like(wall, np.nan)
    for r in rows:
        i, j = mu_rhos.index(r["mu_rho"]), mu_ds.index(r["mu_d_mm"])
        wall[i, j], error[i, j] = r["wall_s"], r.get("max_abs_error", np.nan)
    figure, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for axis, values, title, fmt in ((axes[0], wall, "wall time at 2 mm (s)", "{:.2f}"),
                                     (axes[1], error, "max |c - c_ref| at 2 mm", "{:.1e}")):
        image = axis.imshow(values, origin="lower", cmap="viridis", aspect="auto")
        axis.set_xticks(range(len(mu_ds)), [f"{v:g}" for v in mu_ds])
        axis.set_yticks(range(len(mu_rhos)), [f"{v:g}" for v in mu_rhos])
        axis.set_xlabel("mu_D (mm)")
        axis.set_ylabel("mu_rho")
        axis.set_title(title)
        for (i, j), v in np.ndenumerate(values):
            axis.text(j, i, fmt.format(v), ha="center", va="center", color="white", fontsize=8)
        figure.colorbar(image, ax=axis)
    labels, ours, toolkit = [], [], []
    for r in results["cases_1mm"] + [r for r in rows if (r["mu_d_mm"], r["mu_rho"]) == (8.0, 3.0)]:
        grid = "1mm" if r in results["cases_1mm"] else "2mm"
        labels.append(f"{grid}\nmu_D {r['mu_d_mm']:g}, mu_rho {r['mu_rho']:g}")
        ours.append(r["wall_s"])
        toolkit.append(TOOLKIT_SECONDS[grid] if (r["mu_d_mm"], r["mu_rho"]) == (8.0, 3.0) else np.nan)
    x = np.arange(len(labels))
    axes[2].bar(x - 0.2, ours, 0.4, label="this solver")
    axes[2].bar(x + 0.2, toolkit, 0.4, label="reference toolkit (numpy, DESIGN.md)")
    axes[2].set_xticks(x, labels, fontsize=7)
    axes[2].set_yscale("log")
    axes[2].set_ylabel("wall time (s)")
    axes[2].legend(fontsize=8)
    axes[2].set_title("typical cases")
    figure.suptitle(f"FD solver on the bundled atlas, {results['machine']['cpu_threads']} CPU threads, "
                    f"torch {results['machine']['torch']}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few cases only")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "solver.json")
    parser.add_argument("--gradient-only", action="store_true",
                        help="rerun only the gradient cases and update them in --out (the rest is kept)")
    args = parser.parse_args()
    if args.gradient_only:
        results = json.loads(args.out.read_text())
        results["gradient_2mm"] = gradient_cases(TissueOperator(load_atlas(2)))
        results["gradient_measured"] = time.strftime("%Y-%m-%d")
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"updated the gradient cases in {args.out}")
        return

    mu_ds = [2.0, 8.0, 30.0] if args.quick else [2.0, 5.0, 8.0, 15.0, 30.0]
    mu_rhos = [1.0, 3.0, 10.0] if args.quick else [1.0, 3.0, 6.0, 10.0]
    results = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                           "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                           "torch": torch.__version__, "dtype": "float32", "device": "cpu"},
               "seed_ras_mm": SEED_RAS_MM, "toolkit_seconds_quoted": TOOLKIT_SECONDS,
               "cases_2mm": [], "cases_1mm": [], "gradient_2mm": None}
    atlas2 = TissueOperator(load_atlas(2))
    for mu_d in mu_ds:
        for mu_rho in mu_rhos:
            row = run_case(atlas2, mu_d, mu_rho, refinement=4, repeats=3)
            results["cases_2mm"].append(row)
            print(json.dumps(row), flush=True)
    results["gradient_2mm"] = gradient_cases(atlas2)
    del atlas2
    atlas1 = TissueOperator(load_atlas(1))
    for mu_d, mu_rho in ([(8.0, 3.0)] if args.quick else [(8.0, 3.0), (4.0, 2.0), (15.0, 5.0)]):
        row = run_case(atlas1, mu_d, mu_rho, refinement=3, repeats=2)
        results["cases_1mm"].append(row)
        print(json.dumps(row), flush=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
