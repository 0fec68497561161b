#!/usr/bin/env python
"""A behaviour check for restructurings of the library: the default method on the first atlas cases of
benchmarks/inversion.py (seed 2026, concentration input, as run_task runs it), one torch thread so two runs compare;
writes each case's found seed, mu_d and mu_rho to a JSON file. Run it before and after a change and compare.

    python benchmarks/refactor_check.py benchmarks/results/refactor_check_before.json --cases 10
    python benchmarks/refactor_check.py benchmarks/results/refactor_check_after.json --cases 10 \
        --compare benchmarks/results/refactor_check_before.json
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def case_row(cases, index: int) -> dict:
    """The default method's answer on case `index` of `cases` (benchmarks/inversion.py's Cases), as run_task runs
    it with a concentration input: {"case", "method", "seed_ras_mm", "mu_d_mm", "mu_rho", "loss"}."""
    from inversion import observation_of  # benchmarks/inversion.py

    from TumorPersonalizationLib.constants import DEFAULT_METHOD
    from TumorPersonalizationLib.inversion import InversionOptions
    from TumorPersonalizationLib.pipeline import personalize

    _, today, _, _ = cases.get(index)
    tissue = cases.tissue_of(index)
    result = personalize(tissue, observation_of(tissue, today, "concentration"), method=DEFAULT_METHOD,
                         device="cpu", options=InversionOptions(), lesion_tissue="keep")
    p = result.parameters
    return {"case": index, "method": DEFAULT_METHOD, "seed_ras_mm": [float(v) for v in p.seed_ras_mm],
            "mu_d_mm": float(p.mu_d_mm), "mu_rho": float(p.mu_rho), "loss": float(result.loss)}


def largest_difference(rows, reference_rows) -> float:
    """The largest absolute difference of seed (mm), mu_D (mm) or mu_rho between rows and the reference rows of the
    same cases (every case of rows must be in reference_rows)."""
    before = {row["case"]: row for row in reference_rows}
    worst = 0.0
    for row in rows:
        old = before[row["case"]]
        values = np.array(row["seed_ras_mm"] + [row["mu_d_mm"], row["mu_rho"]])
        reference = np.array(old["seed_ras_mm"] + [old["mu_d_mm"], old["mu_rho"]])
        worst = max(worst, float(np.max(np.abs(values - reference))))
    return worst


def main():
    import torch

    from inversion import Cases  # benchmarks/inversion.py

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--compare", type=Path, help="an earlier output: fail unless every case agrees to 1e-6")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cases = Cases(2026, "atlas")
    rows = []
    for index in range(args.cases):
        rows.append(case_row(cases, index))
        print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    if args.compare:
        worst = largest_difference(rows, json.loads(args.compare.read_text()))
        print(f"{len(rows)} cases, largest difference {worst:.3g}")
        if worst > 1e-6:
            raise SystemExit("the parameters differ")


if __name__ == "__main__":
    main()
