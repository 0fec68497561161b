#!/usr/bin/env python
"""Does the surrogate move its tumor where the seed goes? Its response to seed shifts, against the FD solver's.

The gradient-based inversion finds the seed by moving it through the frozen surrogate; a surrogate whose tumor stays
put when the seed moves gives that search no signal. For held-out test samples (their brain, parameters and frame as
stored), the seed is shifted by +/- --shift-mm along each RAS axis with the frame held fixed, and the tumor's centre
of mass (concentration-weighted, inside the brain, on the frame's grid) is measured for the FD solver (the truth:
2 mm, the sample's own brain, the area average to the frame grid) and for each surrogate. Shifts whose seed leaves
the brain are dropped.

Reported per model: the slope of the surrogate's displacement along the shift on the solver's (least squares through
the origin; 1 = the surrogate follows the seed as the physics does), the mean distance between the two displacement
vectors (mm), and the share of shifts where the surrogate moves its tumor at least half as far as the solver along
the shift. Not a timing benchmark: it may share the cores.

    python benchmarks/seed_response.py --models surrogate32 surrogate32_v2
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from TumorPersonalizationLib.offline.dataset import DatasetConfig, SampleBrains, load_dataset  # noqa: E402
from TumorPersonalizationLib.frame import SurrogateFrame  # noqa: E402
from TumorPersonalizationLib.registry import SHIPPED_MODELS, load_model  # noqa: E402
from TumorPersonalizationLib.solver import simulate_tensor  # noqa: E402

AXES = "RAS"


def centre_of_mass(concentration: np.ndarray, brain: np.ndarray, frame: SurrogateFrame) -> np.ndarray:
    """Concentration-weighted centre (RAS mm) of a frame-grid map inside the frame's brain voxels."""
    weights = np.where(brain, np.clip(concentration, 0.0, None), 0.0).astype(np.float64)
    points = frame.geometry.index_kji_to_ras(np.argwhere(np.ones(weights.shape, bool)).astype(np.float64))
    return (points * weights.reshape(-1, 1)).sum(axis=0) / weights.sum()


def frame_brain(arrays, n) -> np.ndarray:
    """The brain voxels of sample n's frame, as the networks' metrics take them (from its stored tissue channels)."""
    from TumorPersonalizationLib.surrogate import brain_mask_from_tissue

    return brain_mask_from_tissue(torch.as_tensor(arrays["tissue"][n:n + 1].astype(np.float32)))[0].numpy() > 0


def in_brain(tissue, seed_ras_mm) -> bool:
    index = np.round(tissue.geometry.ras_to_index_kji(np.asarray(seed_ras_mm, np.float64))).astype(int)
    if np.any(index < 0) or np.any(index >= np.asarray(tissue.geometry.shape_kji)):
        return False
    return bool(tissue.brain_mask[tuple(index)])


def shifted_seeds(base_seed: np.ndarray, shift_mm: float):
    """(axis, signed shift mm, seed) for +/- shift_mm along R, A, S."""
    for axis in range(3):
        for sign in (-1.0, 1.0):
            seed = base_seed.copy()
            seed[axis] += sign * shift_mm
            yield axis, sign * shift_mm, seed


def fd_rows(arrays, brains: SampleBrains, card, samples, shift_mm):
    """The solver's tumor centre for each sample's own seed and its shifted seeds (one batched run per sample), and
    each sample's frame (the model card's, around the sample's stored crop centre)."""
    rows, frames = [], {}
    for n in samples:
        tissue = brains.tissue(n)
        frame = frames[n] = SurrogateFrame.from_card(card, arrays["crop_center_ras_mm"][n].astype(np.float64),
                                                     tissue.geometry)
        base = arrays["seed_ras_mm"][n].astype(np.float64)
        shifts = [s for s in shifted_seeds(base, shift_mm) if in_brain(tissue, s[2])]
        seeds = np.stack([base] + [s[2] for s in shifts])
        with torch.no_grad():
            c = simulate_tensor(brains.operator(tissue), [float(arrays["mu_d_mm"][n])] * len(seeds),
                                [float(arrays["mu_rho"][n])] * len(seeds), seeds).numpy()
        brain = frame_brain(arrays, n)
        centres = [centre_of_mass(frame.sample(c_one), brain, frame) for c_one in c]
        for (axis, shift, seed), centre in zip(shifts, centres[1:]):
            rows.append({"sample": int(n), "axis": AXES[axis], "shift_mm": shift, "seed_ras_mm": seed.tolist(),
                         "fd_displacement_mm": (centre - centres[0]).tolist()})
    return rows, frames


def surrogate_displacements(model, arrays, frames, rows) -> np.ndarray:
    """(len(rows), 3) displacement of the surrogate's tumor centre for each row's shifted seed (one batch per
    sample: its own seed and its rows' shifted seeds)."""
    out = np.zeros((len(rows), 3))
    for n in sorted({row["sample"] for row in rows}):
        mine = [i for i, row in enumerate(rows) if row["sample"] == n]
        frame, brain = frames[n], frame_brain(arrays, n)
        seeds = np.stack([arrays["seed_ras_mm"][n].astype(np.float64)] + [rows[i]["seed_ras_mm"] for i in mine])
        count = len(seeds)
        tissue = torch.as_tensor(arrays["tissue"][n:n + 1].astype(np.float32)).expand(count, -1, -1, -1, -1)
        parameters = frame.normalise(torch.as_tensor(seeds),
                                     torch.full((count,), float(arrays["mu_d_mm"][n]), dtype=torch.float64),
                                     torch.full((count,), float(arrays["mu_rho"][n]), dtype=torch.float64)).float()
        with torch.no_grad():
            c = model(tissue, parameters).numpy()
        centres = [centre_of_mass(c_one, brain, frame) for c_one in c]
        for i, centre in zip(mine, centres[1:]):
            out[i] = centre - centres[0]
    return out


def summary(fd: np.ndarray, surrogate: np.ndarray, rows) -> dict:
    axis = np.array([AXES.index(r["axis"]) for r in rows])
    sign = np.sign([r["shift_mm"] for r in rows])
    fd_along = fd[np.arange(len(rows)), axis] * sign
    surrogate_along = surrogate[np.arange(len(rows)), axis] * sign
    return {"slope_along_shift": float((fd_along * surrogate_along).sum() / (fd_along ** 2).sum()),
            "mean_displacement_error_mm": float(np.linalg.norm(surrogate - fd, axis=1).mean()),
            "share_following_half": float(np.mean(surrogate_along >= 0.5 * fd_along)),
            "mean_along_shift_mm": float(surrogate_along.mean()),
            "per_axis_slope": {AXES[a]: float((fd_along[axis == a] * surrogate_along[axis == a]).sum()
                                              / (fd_along[axis == a] ** 2).sum()) for a in range(3)}}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=[SHIPPED_MODELS["surrogate"]])
    parser.add_argument("--test", type=Path, default=ROOT / "data" / "test32_v3")
    parser.add_argument("--samples", type=int, default=20, help="the first N test samples")
    parser.add_argument("--shift-mm", type=float, default=6.0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "seed_response.json")
    args = parser.parse_args()

    models = {name: load_model(name, kind="surrogate") for name in args.models}
    frames_of = {(int(card["grid"]), float(card["cube_mm"])) for _, card in models.values()}
    if len(frames_of) != 1:
        raise SystemExit(f"the models use different frames {sorted(frames_of)}: compare them in separate runs")
    card = next(iter(models.values()))[1]
    arrays = load_dataset(args.test)
    config = DatasetConfig.from_dict(json.loads((args.test / "manifest.json").read_text())["config"])
    samples = range(min(args.samples, len(arrays["mu_d_mm"])))
    rows, frames = fd_rows(arrays, SampleBrains(config, arrays), card, samples, args.shift_mm)
    fd = np.array([r["fd_displacement_mm"] for r in rows])
    print(f"{len(rows)} shifts on {len(samples)} samples; solver along the shift: "
          f"{np.mean([fd[i, AXES.index(r['axis'])] * np.sign(r['shift_mm']) for i, r in enumerate(rows)]):.2f} mm "
          f"(shift {args.shift_mm} mm)", flush=True)
    results = {"test_data": str(args.test.relative_to(ROOT) if args.test.is_absolute() else args.test),
               "samples": len(samples), "shift_mm": args.shift_mm, "shifts": len(rows), "models": {}}
    displacements = {}
    for name, (model, model_card) in models.items():
        model.eval()
        displacements[name] = surrogate_displacements(model, arrays, frames, rows)
        results["models"][name] = {"sha256": model_card["sha256"], **summary(fd, displacements[name], rows)}
        print(name, json.dumps(results["models"][name]), flush=True)
    for i, row in enumerate(rows):
        row["surrogate_displacement_mm"] = {name: d[i].round(3).tolist() for name, d in displacements.items()}
    results["rows"] = rows
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, fd, displacements, rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out}")


def plot(results, fd, displacements, rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axis = np.array([AXES.index(r["axis"]) for r in rows])
    sign = np.sign([r["shift_mm"] for r in rows])
    fd_along = fd[np.arange(len(rows)), axis] * sign
    figure, axes = plt.subplots(1, len(displacements), figsize=(4.5 * len(displacements), 4.2), squeeze=False)
    top = max(results["shift_mm"], float(fd_along.max())) * 1.1
    for ax, (name, d) in zip(axes[0], displacements.items()):
        along = d[np.arange(len(rows)), axis] * sign
        for a, marker in zip(range(3), "o^s"):
            ax.scatter(fd_along[axis == a], along[axis == a], s=14, marker=marker, label=f"shift along {AXES[a]}")
        ax.plot([0, top], [0, top], "k--", lw=1, label="follows the solver")
        ax.axhline(0, color="grey", lw=0.5)
        summary_ = results["models"][name]
        ax.set_title(f"{name}: slope {summary_['slope_along_shift']:.2f}, "
                     f"error {summary_['mean_displacement_error_mm']:.1f} mm", fontsize=9)
        ax.set_xlabel("FD solver: tumor centre moved along the shift (mm)")
        ax.set_ylabel("surrogate: tumor centre moved (mm)")
        ax.set_xlim(-1, top)
        ax.set_ylim(min(-1.0, float(along.min()) - 0.5), top)
        ax.legend(fontsize=7)
    figure.suptitle(f"Seed shifts of {results['shift_mm']:g} mm, frame fixed: {results['shifts']} shifts on "
                    f"{results['samples']} held-out samples ({results['test_data']})", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
