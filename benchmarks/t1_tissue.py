#!/usr/bin/env python
"""How well the T1 path recovers a patient's tissue: the atlas registered to the patient's T1 and warped (the
prior), and the same after the T1's intensity classes (t1_classes.classify_t1), each against the patient's healthy
tissue outside the lesion.

Patients and their T1s are the patients' benchmark's (benchmarks/patients.py: the inversion benchmark's cases on
shifted brains and nipype's brain, the T1 synthesised by benchmarks/patient_inputs.py from the same random stream),
so each row here is the tissue behind one T1 row there. Per patient: Dice of WM (>= 0.5), GM (>= 0.5) and brain
(WM+GM >= 0.5) outside the lesion, the volume whose largest class changed, the fitted class means, the registration's
quality and the wall time of the whole T1 path.

    python benchmarks/t1_tissue.py --shifted-cases 3 --nipype-cases 3      # writes results/t1_tissue.{json,png}
"""
import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from inversion import Cases, observation_of, segmentation_of  # noqa: E402
from patients import patient_input  # noqa: E402

import TumorPersonalizationLib.registration as registration  # noqa: E402
from TumorPersonalizationLib.lesion import LESION_GROW_MM, lesion_mask  # noqa: E402
from TumorPersonalizationLib.metrics import dice  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "t1_tissue"
DICE_KEYS = ("wm_dice", "gm_dice", "brain_dice")  # the keys of scores()


def scores(tissue, healthy, outside):
    return {"wm_dice": dice((tissue.wm >= 0.5) & outside, (healthy.wm >= 0.5) & outside),
            "gm_dice": dice((tissue.gm >= 0.5) & outside, (healthy.gm >= 0.5) & outside),
            "brain_dice": dice(((tissue.wm + tissue.gm) >= 0.5) & outside,
                               ((healthy.wm + healthy.gm) >= 0.5) & outside)}


def run_one(brain: str, index: int, seed: int) -> dict:
    cases = Cases(seed, brain)
    _, today, _, _ = cases.get(index)
    healthy = cases.tissue_of(index)
    segmentation = segmentation_of(today)
    t1 = patient_input(cases, index, seed, "t1", healthy, segmentation)
    observation = observation_of(healthy, today, "segmentation")
    lesion = lesion_mask(observation.on_grid(t1.geometry).visible, t1.geometry, LESION_GROW_MM)
    started = time.perf_counter()
    derived = registration.tissue_from_t1(t1, lesion)
    seconds = time.perf_counter() - started
    outside = ~lesion
    return {"brain": brain, "case": index, "seconds": seconds, "loadavg": os.getloadavg()[0],
            "quality": derived.quality, "lesion_cm3": float(lesion.sum()) * t1.geometry.voxel_volume_mm3() / 1000,
            "warped_atlas": scores(derived.registered, healthy, outside),
            "classified": scores(derived.tissue, healthy, outside),
            "metrics": derived.metrics, "warnings": derived.warnings}


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(DICE_KEYS), figsize=(11, 3.6), sharey=True)
    for axis, key in zip(axes, DICE_KEYS):
        for row in rows:
            color = "tab:blue" if row["brain"] == "shifted" else "tab:orange"
            axis.plot([0, 1], [row["warped_atlas"][key], row["classified"][key]], "-o", color=color, alpha=0.8)
        axis.set_xticks([0, 1], ["warped atlas", "T1 classes"])
        axis.set_title(key.replace("_", " ").replace("dice", "Dice"), fontsize=10)
        axis.set_xlim(-0.3, 1.3)
    axes[0].set_ylabel("Dice outside the lesion\n(blue: shifted brains, orange: nipype's brain)")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shifted-cases", type=int, default=3)
    parser.add_argument("--nipype-cases", type=int, default=3)
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args()
    rows = []
    for brain, count in (("shifted", args.shifted_cases), ("nipype", args.nipype_cases)):
        for index in range(count):
            row = run_one(brain, index, args.seed)
            rows.append(row)
            warped, classified = row["warped_atlas"], row["classified"]
            print(f"{brain} {index}: WM Dice {warped['wm_dice']:.3f} -> {classified['wm_dice']:.3f}, "
                  f"GM {warped['gm_dice']:.3f} -> {classified['gm_dice']:.3f}, "
                  f"{row['seconds']:.1f} s (load {row['loadavg']:.1f})", flush=True)
    summary = {}
    for brain in ("shifted", "nipype"):
        group = [r for r in rows if r["brain"] == brain]
        if group:
            summary[brain] = {f"{stage}_{key}_mean": float(np.mean([r[stage][key] for r in group]))
                              for stage in ("warped_atlas", "classified") for key in DICE_KEYS}
            summary[brain]["cases"] = len(group)
            summary[brain]["median_seconds"] = float(np.median([r["seconds"] for r in group]))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{OUT}.json").write_text(json.dumps({"summary": summary, "rows": rows, "machine": platform.machine(),
                                               "cpus": os.cpu_count(), "seed": args.seed}, indent=1))
    plot(rows, Path(f"{OUT}.png"))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
