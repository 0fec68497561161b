#!/usr/bin/env python
"""Throughput of the training-data generator, with the first datasets' settings and with the current ones, on this
machine, and the accuracy of the faster time steps.

Settings (the same sample indices of the same random stream, --seed):
- before: the first datasets' generator, recipe "atlas" (the solver's default steps), one Dask worker process
  with torch's default threads there (one: Dask starts workers with OMP_NUM_THREADS=1), as
  `generate_dataset.py --workers 1` ran;
- steps: recipe "atlas" with the longer steps of the "anatomy" recipe (front 1 voxel, reaction accuracy 0.4),
  same process layout: what the steps alone buy;
- memory: the same with the worker's malloc left as glibc sets it (cluster.LOCAL_WORKER_ENVIRON: Dask's
  MALLOC_TRIM_THRESHOLD_ unset), one single-threaded worker: what that fix buys;
- after: recipe "anatomy" (deformations, border noise, crop shifts, longer steps) on a Dask LocalCluster of one
  single-threaded worker per core, as `generate_dataset.py --recipe anatomy --workers 2` runs it.
The before and steps settings run the workers in Dask's default environment, as the first generator did.
Samples per hour = samples / wall time of `generate` (cluster start included).

Accuracy: for the first --check samples of the "after" setting, the FD run at the sample's final parameters with
the recipe's steps against the same run with every step divided by 4 (converged): max abs difference on the grid.
The recipe promises < 1e-3.

    python benchmarks/dataset_throughput.py --samples 16 --check 8     # writes results/dataset_throughput.json / .png
Do not run it while another job shares the cores.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from TumorPersonalizationLib import cluster  # noqa: E402
from TumorPersonalizationLib.offline.dataset import SampleMaker, generate, recipe_config  # noqa: E402

FIXED_ENVIRON = dict(cluster.LOCAL_WORKER_ENVIRON)


def timed_generate(config, workers, local, dask_default_environ=False):
    directory = Path(tempfile.mkdtemp(prefix="throughput-"))
    cluster.LOCAL_WORKER_ENVIRON = {} if dask_default_environ else FIXED_ENVIRON
    try:
        started = time.perf_counter()
        manifest = generate(config, directory, workers=workers, local=local)
        seconds = time.perf_counter() - started
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return {"samples": manifest["samples"], "wall_s": seconds, "samples_per_hour": manifest["samples"] * 3600 / seconds,
            "loadavg_after": os.getloadavg()[0]}


def step_errors(config, count):
    import torch

    from TumorPersonalizationLib.solver import StepControl, simulate_tensor

    maker = SampleMaker(config)
    rows = []
    for index in range(count):
        run = maker.simulate(index)
        physical = run["physical"]
        args = ([physical["mu_d_mm"]], [physical["mu_rho"]], [run["seed_ras_mm"]])
        with torch.no_grad():
            fast = simulate_tensor(run["operator"], *args, control=config.step_control())
            converged = simulate_tensor(run["operator"], *args, control=StepControl(
                max_front_step_voxels=config.front_step_voxels, reaction_accuracy=config.reaction_accuracy,
                refinement=4.0))
        rows.append({"index": index, "mu_d_mm": physical["mu_d_mm"], "mu_rho": physical["mu_rho"],
                     "visible_cm3": run["visible_cm3"], "max_abs_error": float((fast - converged).abs().max())})
        print(f"sample {index}: mu_D {physical['mu_d_mm']:.1f} mm, mu_rho {physical['mu_rho']:.2f}, "
              f"max abs error {rows[-1]['max_abs_error']:.2e}", flush=True)
    return rows


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    names = list(result["settings"])
    rates = [result["settings"][n]["samples_per_hour"] for n in names]
    axes[0].bar(names, rates, color=["#888888", "#5b8bd0", "#8a6bd0", "#2a9d55"][:len(names)])
    for x, rate in enumerate(rates):
        axes[0].text(x, rate, f"{rate:.0f}", ha="center", va="bottom")
    axes[0].set_ylabel("samples per hour (this machine)")
    axes[0].set_title(f"generator throughput, {result['samples']} samples each")
    errors = [r["max_abs_error"] for r in result["step_accuracy"]]
    mu_rho = [r["mu_rho"] for r in result["step_accuracy"]]
    axes[1].scatter(mu_rho, errors)
    axes[1].axhline(1e-3, color="red", linestyle="--", label="1e-3")
    axes[1].set_xlabel("mu_rho")
    axes[1].set_ylabel("max |c - c converged|")
    axes[1].set_yscale("log")
    axes[1].legend()
    axes[1].set_title("accuracy of the anatomy recipe's steps")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--check", type=int, default=8, help="samples whose steps are checked against converged")
    parser.add_argument("--seed", type=int, default=500, help="random stream (not a training or test stream)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    import torch

    common = dict(samples=args.samples, seed=args.seed, shard_size=max(1, args.samples // (2 * args.workers)))
    recipe_steps = recipe_config("atlas", front_step_voxels=1.0, reaction_accuracy=0.4, **common)
    settings = {  # name: (config, workers, local, Dask's default worker environment)
        "before": (recipe_config("atlas", **common), 1, False, True),
        "steps": (recipe_steps, 1, False, True),
        "memory": (recipe_steps, 1, False, False),
        "after": (recipe_config("anatomy", **common), args.workers, False, False),
    }
    result = {"machine": f"{os.cpu_count()}-core CPU (development machine)", "torch": torch.__version__,
              "samples": args.samples, "seed": args.seed, "settings": {}}
    for name, (config, workers, local, dask_default) in settings.items():
        result["settings"][name] = dict(timed_generate(config, workers, local, dask_default), workers=workers,
                                        recipe_steps=[config.front_step_voxels, config.reaction_accuracy],
                                        dask_default_worker_environ=dask_default)
        print(name, result["settings"][name], flush=True)
    before = result["settings"]["before"]["samples_per_hour"]
    result["speed_up"] = {n: s["samples_per_hour"] / before for n, s in result["settings"].items()}
    result["step_accuracy"] = step_errors(settings["after"][0], args.check)
    result["max_step_error"] = max(r["max_abs_error"] for r in result["step_accuracy"])
    out = ROOT / "benchmarks" / "results" / "dataset_throughput.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    print(f"speed-up {result['speed_up']}, max step error {result['max_step_error']:.2e}; wrote {out}")


if __name__ == "__main__":
    main()
