#!/usr/bin/env python
"""Generate the surrogate training set: FD simulations on the bundled atlas, cropped to a 128 mm cube around each
tumor and area-averaged to the surrogate grid. Deterministic under --seed, resumable (rerun the same command), and
parallel on a Dask LocalCluster (--workers) or an existing cluster (--scheduler tcp://host:8786; with dask-jobqueue
on SLURM, start the cluster there and pass its scheduler address).

    python scripts/generate_dataset.py --out data/train --samples 3000 --grid 32 --workers 2
    python scripts/generate_dataset.py --out data/test --samples 200 --seed 1      # held out: another seed
    python scripts/generate_dataset.py --out data/train_anatomy --samples 3000 --recipe anatomy --workers 2
    python scripts/generate_dataset.py --out data/test_shifted --samples 200 --recipe shifted --seed 3000
    python scripts/generate_dataset.py --out data/train128 --samples 30000 --grid 128 --simulation-spacing 1 \
        --device cuda --scheduler tcp://scheduler:8786                         # the published-size data, on a cluster
"""
import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from TumorPersonalizationLib.offline.dataset import RECIPES, generate, recipe_config  # noqa: E402
from TumorPersonalizationLib.errors import InputError  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="dataset folder (shards, progress.json, manifest.json)")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0, help="dataset seed: sample i depends only on (seed, i)")
    parser.add_argument("--grid", type=int, default=32, help="surrogate grid points per side of the 128 mm cube")
    parser.add_argument("--shard-size", type=int, default=50)
    parser.add_argument("--recipe", default="atlas", choices=sorted(RECIPES),
                        help="anatomy and time steps (dataset.RECIPES): atlas (the first datasets), anatomy "
                             "(training for patients' brains), shifted (the shifted test set)")
    parser.add_argument("--scheduler", help="address of a running Dask scheduler (default: a LocalCluster)")
    parser.add_argument("--simulation-spacing", type=int, default=2, choices=(1, 2),
                        help="atlas spacing (mm) of the FD runs; 1 for the 128^3 (1 mm) grid of the GPU recipe")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the FD runs go")
    parser.add_argument("--workers", type=int, default=1, help="LocalCluster worker processes")
    parser.add_argument("--local", action="store_true", help="no Dask: compute in this process")
    args = parser.parse_args(argv)

    from tqdm import tqdm

    config = recipe_config(args.recipe, samples=args.samples, seed=args.seed, grid=args.grid,
                           shard_size=args.shard_size, simulation_spacing_mm=args.simulation_spacing)
    bar = tqdm(total=config.shards, desc="shards", unit="shard", file=sys.stderr)

    def progress(fraction, message):
        bar.n = round(fraction * config.shards)
        bar.refresh()

    started = time.perf_counter()
    try:
        manifest = generate(config, args.out, scheduler=args.scheduler, workers=args.workers, local=args.local,
                            progress=progress, device=args.device)
    except InputError as error:
        print(f"generate_dataset: error: {error}", file=sys.stderr)
        return 2
    finally:
        bar.close()
    print(f"{manifest['samples']} samples in {args.out} ({time.perf_counter() - started:.0f} s this run), "
          f"manifest sha256 {manifest['sha256'][:12]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
