#!/usr/bin/env python
"""Timing and accuracy of the atlas registration (TumorPersonalizationLib/registration.py) at 1 mm.

Cases (each a known deformation of the bundled atlas: rotation 8 degrees, scale 1.05, shift 6 mm, a smooth 3 mm
field, on an oblique grid, as in Testing/test_registration.py):
  tissue_1mm       register_atlas_to_tissue on the 1 mm atlas tissue deformed onto a 1 mm grid, a 36 mm lesion
                   relabelled CSF (what segmentation tools do to a tumor core)
  t1_1mm           tissue_from_t1 on the atlas's 1 mm T1 deformed onto a 1 mm grid
  t1_1x1x5mm       the same onto an axial 1 x 1 x 5 mm grid (thick slices)
and, for the quality thresholds, the figures on either side of them: another brain (nipype's 3 mm template brain
from another segmentation tool, the testbrain extra; soft and hard labels) and random noise.

Each case runs --repeats times; wall-clock and process CPU seconds are recorded per run with the machine's load
average (the machine is shared: the CPU seconds are the load-independent figure; the wall-clock of an idle 2-core
machine is at most that). Writes benchmarks/results/registration.json and registration.png (checkerboards of patient and
registered atlas, WM outlines).

    PYTHONPATH=. python benchmarks/registration.py [--repeats 2] [--no-other-brain]
"""
import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from TumorPersonalizationLib.atlas import load_atlas, load_atlas_t1  # noqa: E402
from TumorPersonalizationLib.geometry import Volume  # noqa: E402
from TumorPersonalizationLib.metrics import dice  # noqa: E402
from TumorPersonalizationLib import registration  # noqa: E402
from TumorPersonalizationLib.tissue import Tissue  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from known_deformation import centre_of, known_deformation, oblique_grid, warp  # noqa: E402

def timed(function, *args, **kwargs):
    load = os.getloadavg()[0]
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(*args, **kwargs)
    return result, {"wall_s": round(time.perf_counter() - wall, 2), "cpu_s": round(time.process_time() - cpu, 2),
                    "runtime_s": round(result.runtime_s, 2), "load_average_1min_before": round(load, 2)}


def summary(runs):
    return {"wall_s_min": min(r["wall_s"] for r in runs), "cpu_s_min": min(r["cpu_s"] for r in runs), "runs": runs}


def case_tissue(atlas1, transform, repeats):
    grid = oblique_grid(centre_of(atlas1.geometry), (1.0, 1.0, 1.0))
    truth = Tissue(*(np.clip(warp(a, atlas1.geometry, transform, grid), 0, 1)
                     for a in (atlas1.wm, atlas1.gm, atlas1.csf)), grid)
    lesion = np.linalg.norm(grid.ras_grid() - (centre_of(grid) + np.array([28.0, 5.0, 12.0])), axis=-1) < 18.0
    patient = Tissue(np.where(lesion, 0, truth.wm), np.where(lesion, 0, truth.gm), np.where(lesion, 1, truth.csf),
                     grid)
    runs = []
    for _ in range(repeats):
        result, run = timed(registration.register_atlas_to_tissue, patient, lesion)
        runs.append(run)
    was_brain = lesion & (truth.brain_fraction >= 0.5)
    identity_wm = warp(atlas1.wm, atlas1.geometry, sitk.Transform(), grid)
    record = {
        "grid": grid.describe(), "voxels": int(np.prod(grid.shape_kji)), "lesion_cm3": round(lesion.sum() / 1000, 1),
        "quality_ncc": round(result.quality, 4), "passed": result.passed, "metrics": _rounded(result.metrics),
        "wm_dice": round(dice(result.tissue.wm > 0.5, truth.wm > 0.5), 4),
        "wm_dice_unregistered": round(dice(identity_wm > 0.5, truth.wm > 0.5), 4),
        "wm_dice_in_lesion": round(dice(result.tissue.wm[lesion] > 0.5, truth.wm[lesion] > 0.5), 4),
        "wm_dice_in_lesion_unregistered": round(dice(identity_wm[lesion] > 0.5, truth.wm[lesion] > 0.5), 4),
        "lesion_brain_refilled": round(float((result.tissue.brain_fraction >= 0.5)[was_brain].mean()), 4),
        "warnings": result.warnings, **summary(runs)}
    synthetic = registration._synthetic_intensity
    figure = (synthetic(patient.wm, patient.gm, patient.csf), synthetic(result.tissue.wm, result.tissue.gm,
                                                                         result.tissue.csf), truth.wm, result.tissue.wm)
    return record, figure


def case_t1(atlas1, template1, transform, spacing, repeats):
    grid = oblique_grid(centre_of(atlas1.geometry), spacing, angles_deg=(0, 0, 0) if spacing[2] > 2 else (10, -7, 5))
    t1 = warp(template1.array * 800.0, template1.geometry, transform, grid)
    truth_wm = _slab_average(atlas1.wm, atlas1.geometry, transform, grid)
    runs = []
    for _ in range(repeats):
        result, run = timed(registration.tissue_from_t1, Volume(t1, grid))
        runs.append(run)
    identity_wm = _slab_average(atlas1.wm, atlas1.geometry, sitk.Transform(), grid)
    warped_t1 = _slab_average(template1.array, template1.geometry, registration._as_field(result.transform, grid)[0],
                              grid)
    record = {"grid": grid.describe(), "voxels": int(np.prod(grid.shape_kji)),
              "quality_ncc": round(result.quality, 4), "passed": result.passed, "metrics": _rounded(result.metrics),
              "wm_dice": round(dice(result.tissue.wm > 0.5, truth_wm > 0.5), 4),
              "wm_dice_unregistered": round(dice(identity_wm > 0.5, truth_wm > 0.5), 4),
              "warnings": result.warnings, **summary(runs)}
    return record, (t1 / 800.0, warped_t1, truth_wm, result.tissue.wm)


def _slab_average(array, source, transform, target):
    """The map warped onto target, each voxel its slab's average (as the truth of a thick-slice acquisition)."""
    from TumorPersonalizationLib.geometry import block_mean

    factors = [max(1, int(round(s))) for s in target.spacing_ijk_mm]
    if max(factors) == 1:
        return warp(array, source, transform, target)
    fine = target.with_spacing([s / f for s, f in zip(target.spacing_ijk_mm, factors)])
    return block_mean(warp(array, source, transform, fine), factors[::-1], target.shape_kji)


def case_other_brains(repeats):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from inversion import nipype_brain

    brain = nipype_brain()
    hard = Tissue.from_labelmap(brain.volume(brain.labelmap()))
    out = {}
    for name, tissue in (("nipype_soft", brain), ("nipype_hard_labels", hard)):
        result, run = timed(registration.register_atlas_to_tissue, tissue, None)
        out[name] = {"grid": tissue.geometry.describe(), "quality_ncc": round(result.quality, 4),
                     "passed": result.passed, "metrics": _rounded(result.metrics), **run}
    # A T1-like image of the same brain (another contrast than the template's: WM 0.9, GM 0.55, CSF 0.15, with a
    # smooth multiplicative bias and noise), for the T1 threshold.
    rng = np.random.default_rng(3)
    g = brain.geometry
    ras = g.ras_grid()
    bias = 1 + 0.15 * np.sin(ras[..., 0] / 60.0) * np.cos(ras[..., 2] / 70.0)
    t1 = (0.9 * brain.wm + 0.55 * brain.gm + 0.15 * brain.csf) * bias + rng.normal(0, 0.02, g.shape_kji) * (
        (brain.wm + brain.gm + brain.csf) > 0.1)
    result, run = timed(registration.tissue_from_t1, Volume(np.clip(t1, 0, None).astype(np.float32), g))
    out["nipype_synthetic_t1"] = {"quality_ncc": round(result.quality, 4), "passed": result.passed,
                                  "metrics": _rounded(result.metrics),
                                  "wm_dice_vs_its_tissue": round(dice(result.tissue.wm > 0.5, brain.wm > 0.5), 4),
                                  **run}
    noise = rng.uniform(size=(3,) + g.shape_kji).astype(np.float32)
    noise /= noise.sum(axis=0)
    result, run = timed(registration.register_atlas_to_tissue, Tissue(noise[0], noise[1], noise[2], g), None)
    out["noise_tissue"] = {"quality_ncc": round(result.quality, 4), "passed": result.passed, **run}
    return out


def _rounded(metrics):
    return {k: round(float(v), 4) for k, v in metrics.items()}


def plot(figures, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(figures), 2, figsize=(9, 4.2 * len(figures)))
    for row, (name, (patient, atlas, truth_wm, registered_wm)) in zip(axes, figures.items()):
        k = patient.shape[0] // 2
        p, a = patient[k] / max(patient[k].max(), 1e-6), atlas[k] / max(atlas[k].max(), 1e-6)
        jj, ii = np.indices(p.shape)
        checker = ((jj // 12 + ii // 12) % 2).astype(bool)
        row[0].imshow(np.where(checker, p, a), cmap="gray", origin="lower", aspect="auto")
        row[0].set_title(f"{name}: checkerboard patient / registered atlas")
        row[1].imshow(p, cmap="gray", origin="lower", aspect="auto")
        row[1].contour(truth_wm[k], levels=[0.5], colors="r", linewidths=0.8)
        row[1].contour(registered_wm[k], levels=[0.5], colors="lime", linewidths=0.8)
        row[1].set_title("WM 0.5: truth (red), registered atlas (green)")
        for axis in row:
            axis.set_xticks([])
            axis.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-other-brain", action="store_true", help="skip nipype's brain and the noise case")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "registration.json")
    args = parser.parse_args()

    atlas1, template1 = load_atlas(1), load_atlas_t1(1)
    transform = known_deformation(centre_of(atlas1.geometry))
    results, figures = {}, {}
    results["tissue_1mm"], figures["tissue_1mm"] = case_tissue(atlas1, transform, args.repeats)
    print("tissue_1mm", json.dumps({k: v for k, v in results["tissue_1mm"].items() if k != "runs"}), flush=True)
    for name, spacing in (("t1_1mm", (1.0, 1.0, 1.0)), ("t1_1x1x5mm", (1.0, 1.0, 5.0))):
        results[name], figures[name] = case_t1(atlas1, template1, transform, spacing, args.repeats)
        print(name, json.dumps({k: v for k, v in results[name].items() if k != "runs"}), flush=True)
    if not args.no_other_brain:
        results["thresholds"] = case_other_brains(args.repeats)
        print("thresholds", json.dumps(results["thresholds"]), flush=True)
    out = {
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
                    "simpleitk": sitk.Version.VersionString(),
                    "itk_threads": sitk.ProcessObject.GetGlobalDefaultNumberOfThreads(),
                    "note": "shared with other jobs: see each run's load average; cpu_s is process CPU time"},
        "settings": {"registration_spacing_mm": registration.REGISTRATION_SPACING_MM,
                     "bspline_control_spacing_mm": registration.BSPLINE_CONTROL_SPACING_MM,
                     "tissue_quality_threshold": registration.TISSUE_QUALITY_THRESHOLD,
                     "t1_quality_threshold": registration.T1_QUALITY_THRESHOLD},
        "cases": results,
    }
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    plot(figures, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
