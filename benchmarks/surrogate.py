#!/usr/bin/env python
"""Held-out accuracy and speed of the bundled surrogate (and inverse network, when bundled) against the FD solver.

On the held-out test set (never used in training; generated with another dataset seed):
  1. on the surrogate grid: surrogate vs the FD solution block-averaged to that grid;
  2. at FD resolution: the surrogate upsampled (trilinear) to the 2 mm crop vs the FD solution in that crop, re-run
     from the sample's stored parameters and atlas variant;
  1b. the same, for the surrogate's answer averaged with its answer to the left-right mirrored input (a check of
     what test-time mirroring would buy; the inversion asks the surrogate once);
  3. inference time for one case and a batch of 8, against the FD solver on the same cases;
  4. the inverse net's parameter and seed errors, from one pass and averaged with its answer to the left-right
     mirrored input (as the inversion asks it), for the tumors given as concentrations and as segmentations.
Metrics are inside the brain (WM+GM >= 0.1): MSE, MAE, tumor-normalised MSE/MAE, NCC; mean, standard error, median
and the mean of the worst 5 %. Before scoring, the test set is checked against the model's training data (when that
is on this machine) for samples that drew the same anatomy and seed (augment.shared_samples): it refuses to score
a test set that shares any, and records the count as shared_with_training.

    python benchmarks/surrogate.py --model surrogate32 --test data/test32
    python benchmarks/surrogate.py --model surrogate32 --test data/test32_shifted \
        --out benchmarks/results/surrogate32_test32_shifted.json
(the shifted test set: brains deformed beyond the training range, half re-acquired on oblique 3 mm slices; each
sample is re-run at FD resolution on its own brain, rebuilt from its stored draw).
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from TumorPersonalizationLib.offline.dataset import DatasetConfig, SampleBrains, load_dataset  # noqa: E402
from TumorPersonalizationLib.metrics import compare  # noqa: E402
from TumorPersonalizationLib.parameters import ParameterScaling  # noqa: E402
from TumorPersonalizationLib.registry import SHIPPED_MODELS, load_model, read_card  # noqa: E402
from TumorPersonalizationLib.solver import simulate_tensor  # noqa: E402
from TumorPersonalizationLib.frame import SurrogateFrame  # noqa: E402
from TumorPersonalizationLib.inverse_net import MIRROR_AXIS, MIRROR_SIGNS  # noqa: E402
from TumorPersonalizationLib.offline.evaluation import summarise  # noqa: E402
from TumorPersonalizationLib.offline.training import (evaluate_inverse, evaluate_surrogate, predict_inverse,  # noqa: E402
                                              to_tensors)


def fd_resolution_rows(model, arrays, tensors, cube_mm, limit, config):
    brains = SampleBrains(config, arrays)
    rows, fd_times = [], []
    for n in range(min(limit, len(arrays["mu_d_mm"]))):
        # The sample's own brain: its atlas variant, deformed / re-acquired as it drew (shifted test set).
        tissue = brains.tissue(n)
        operator = brains.operator(tissue)
        started = time.perf_counter()
        with torch.no_grad():
            c = simulate_tensor(operator, [float(arrays["mu_d_mm"][n])], [float(arrays["mu_rho"][n])],
                                [arrays["seed_ras_mm"][n].astype(np.float64)])[0].numpy()
        fd_times.append(time.perf_counter() - started)
        frame = SurrogateFrame.around(arrays["crop_center_ras_mm"][n].astype(np.float64), tissue.geometry,
                                      int(tensors["tissue"].shape[-1]), cube_mm)
        fine = frame.crop_source(c)
        brain = frame.crop_source(tissue.brain_mask)
        with torch.no_grad():
            coarse = model(tensors["tissue"][n:n + 1], tensors["parameters"][n:n + 1])
            upsampled = F.interpolate(coarse[:, None], size=fine.shape, mode="trilinear",
                                      align_corners=False)[0, 0].numpy()
        rows.append(compare(upsampled, fine, brain, thresholds=()))
    return summarise(rows, worst_is_low={"ncc"}), fd_times


class MirrorAveragedSurrogate(torch.nn.Module):
    """The surrogate asked twice: its logits for the input and for the left-right mirrored input (tissue flipped
    along the frame's RAS x axis, the seed's x offset negated; inverse_net.MIRROR_AXIS / MIRROR_SIGNS), flipped back,
    averaged before the sigmoid. A test-time check scored with training.evaluate_surrogate, not what the inversion
    uses: it asks whether the cheapest fix there is (two passes instead of one) closes the gap to the accuracy
    target."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.register_buffer("signs", torch.tensor(MIRROR_SIGNS, dtype=torch.float32))

    def forward(self, tissue, parameters):
        plain = self.model.logits(tissue, parameters)
        mirrored = self.model.logits(torch.flip(tissue, (MIRROR_AXIS,)), parameters * self.signs)
        return torch.sigmoid((plain + torch.flip(mirrored, (MIRROR_AXIS,))) / 2.0)


def timing(model, tensors, repeats=5):
    with torch.no_grad():
        one = (tensors["tissue"][:1], tensors["parameters"][:1])
        eight = (tensors["tissue"][:8], tensors["parameters"][:8])
        model(*one)
        times = {}
        for name, inputs in (("one_case_s", one), ("batch_of_8_s", eight)):
            samples = []
            for _ in range(repeats):
                started = time.perf_counter()
                model(*inputs)
                samples.append(time.perf_counter() - started)
            times[name] = statistics.median(samples)
    return times


# The inverse net's results: one pass and mirror-averaged, each for concentrations and segmentations.
INVERSE_KEYS = ("inverse", "inverse_segmentation_input", "inverse_mirror_averaged",
                "inverse_mirror_averaged_segmentation_input")


def shared_with_training(card, test_arrays):
    """Test samples that drew the same anatomy and seed as a sample of the model's training data (augment.
    shared_samples, on what was drawn, not on the random streams); refuses to score a test set that shares any.
    Returns their count, or a note when the training data are not on this machine."""
    from TumorPersonalizationLib.offline.augment import shared_samples

    train_folder = ROOT / card["training_data"]["path"]
    if not (train_folder / "manifest.json").exists():
        return f"not checked: {card['training_data']['path']} is not on this machine"
    pairs = shared_samples(load_dataset(train_folder), test_arrays)
    if pairs:
        raise SystemExit(f"{len(pairs)} test samples drew the same anatomy and seed as training samples, e.g. "
                         f"(training, test) = {pairs[:3]}")
    return 0


def surrogate_part(args, model, card, arrays, tensors) -> dict:
    """The surrogate's accuracy on the surrogate grid and at FD resolution, and its speed against the solver."""
    results = {"model": args.model, "model_sha256": card["sha256"], "test_data": str(args.test),
               "test_samples": int(len(arrays["mu_d_mm"])), "torch": torch.__version__,
               "threads": torch.get_num_threads(),
               "shared_with_training": shared_with_training(card, arrays)}
    results["surrogate_grid"] = evaluate_surrogate(model, tensors)
    results["surrogate_grid_mirror_averaged"] = evaluate_surrogate(MirrorAveragedSurrogate(model), tensors)
    print("surrogate grid:", json.dumps({k: v["mean"] for k, v in results["surrogate_grid"].items()
                                          if isinstance(v, dict)}), flush=True)
    print("surrogate grid, mirror-averaged:", json.dumps({
        k: v["mean"] for k, v in results["surrogate_grid_mirror_averaged"].items() if isinstance(v, dict)}), flush=True)
    config = DatasetConfig.from_dict(json.loads((args.test / "manifest.json").read_text())["config"])
    results["fd_resolution"], fd_times = fd_resolution_rows(model, arrays, tensors, card["cube_mm"], args.fd_samples,
                                                            config)
    print("FD resolution:", json.dumps({k: v["mean"] for k, v in results["fd_resolution"].items()
                                         if isinstance(v, dict)}), flush=True)
    results["inference"] = timing(model, tensors)
    results["fd_solver_s"] = {"median": statistics.median(fd_times), "mean": float(np.mean(fd_times)),
                              "samples": len(fd_times), "note": "whole 2 mm atlas, active box, same cases"}
    results["speed_up_one_case_median"] = results["fd_solver_s"]["median"] / results["inference"]["one_case_s"]
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=SHIPPED_MODELS["surrogate"])
    parser.add_argument("--inverse", default=SHIPPED_MODELS["inverse"], help="evaluated too if bundled")
    parser.add_argument("--test", type=Path, default=ROOT / "data" / "test32")
    parser.add_argument("--fd-samples", type=int, default=200, help="samples re-run with the FD solver")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "surrogate.json")
    parser.add_argument("--part", choices=("both", "surrogate", "inverse"), default="both",
                        help="surrogate: leave the inverse net out; inverse: evaluate only it, keeping the surrogate's "
                             "results already in --out (the same model and test set)")
    args = parser.parse_args()

    model, card = load_model(args.model, kind="surrogate")
    scaling = ParameterScaling.from_dict(card["scaling"])
    arrays = load_dataset(args.test)
    if card["training_data"]["manifest_sha256"] == json.loads((args.test / "manifest.json").read_text())["sha256"]:
        raise SystemExit("the test set is the training set")
    tensors = to_tensors(arrays, scaling)
    # The other part's results, kept from an earlier run on the same model and test set.
    earlier = json.loads(args.out.read_text()) if args.out.exists() else None
    same = earlier is not None and (earlier.get("model_sha256"), earlier.get("test_data")) == (card["sha256"],
                                                                                            str(args.test))
    if args.part == "inverse":
        if not same:
            raise SystemExit(f"{args.out} holds no surrogate results of this model on this test set: run --part "
                             f"both (or surrogate) first")
        results = earlier
    else:
        results = surrogate_part(args, model, card, arrays, tensors)
        if args.part == "surrogate" and same:
            results.update({k: v for k, v in earlier.items() if k.startswith("inverse")})
    predictions = None
    if args.part != "surrogate":
        for key in INVERSE_KEYS:
            results.pop(key, None)
        try:
            read_card(args.inverse)
        except Exception as error:  # not bundled: say so in the results instead of failing
            results["inverse"] = {"status": f"not evaluated: {error}"}
        else:
            inverse, inverse_card = load_model(args.inverse, kind="inverse")
            inverse_scaling = ParameterScaling.from_dict(inverse_card["scaling"])
            # One pass (the network alone), and averaged with the mirrored input's answer as the inversion's direct
            # method asks it (inverse_net.predict_mirror_averaged); each for the tumors as concentrations and as
            # BraTS-like segmentations.
            inputs = ("concentration", "segmentation_input") if "segmentation_input" in tensors else ("concentration",)
            for mirror in (False, True):
                for tumor_input in inputs:
                    key = "inverse" + ("_mirror_averaged" if mirror else "") + (
                        "_segmentation_input" if tumor_input == "segmentation_input" else "")
                    results[key] = evaluate_inverse(inverse, tensors, inverse_scaling, tumor_input=tumor_input,
                                                    mirror_average=mirror)
            results["inverse"] = {"model": args.inverse, "model_sha256": inverse_card["sha256"], **results["inverse"]}
            predictions = predict_inverse(inverse, tensors, inverse_scaling, mirror_average=True)
            for key in INVERSE_KEYS:
                if key in results:
                    print(key, json.dumps({k: (v["mean"], v["median"]) for k, v in results[key].items()
                                           if isinstance(v, dict)}), flush=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, card, predictions, args.out.with_suffix(".png"))
    print(f"wrote {args.out}")


def plot(results, card, predictions, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 4 if predictions is not None else 2,
                                figsize=(20 if predictions is not None else 11, 4))
    history = card.get("history", [])
    axes[0].semilogy([h["epoch"] for h in history], [h["train_loss"] for h in history], label="training")
    axes[0].semilogy([h["epoch"] for h in history], [h["validation_loss"] for h in history], label="validation")
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("masked BCE (logits)")
    axes[0].legend()
    axes[0].set_title(f"{card['name']} training ({card['wall_time_s'] / 60:.0f} min)")
    labels = ["NCC mean", "NCC worst 5 %"]
    grid = results["surrogate_grid"]["ncc"]
    fine = results["fd_resolution"]["ncc"]
    x = np.arange(2)
    axes[1].bar(x - 0.2, [grid["mean"], grid["worst_5_percent_mean"]], 0.4, label="surrogate grid")
    axes[1].bar(x + 0.2, [fine["mean"], fine["worst_5_percent_mean"]], 0.4, label="FD resolution (2 mm)")
    axes[1].axhline(0.98, color="k", linestyle="--", linewidth=0.8)
    axes[1].axhline(0.9, color="k", linestyle=":", linewidth=0.8)
    axes[1].set_xticks(x, labels)
    axes[1].set_ylim(0.8, 1.0)  # the targets (dashed 0.98, dotted 0.9) stay visible
    axes[1].legend(loc="lower right")
    axes[1].set_title(f"held out, {results['test_samples']} samples")
    if predictions is not None:
        for axis, key, unit in ((axes[2], "mu_d", "mm"), (axes[3], "mu_rho", "")):
            true, predicted = predictions[key + "_true"], predictions[key + "_predicted"]
            axis.scatter(true, predicted, s=6, alpha=0.6)
            top = float(max(true.max(), predicted.max()))
            axis.plot([0, top], [0, top], "k--", linewidth=0.8)
            name = "mu_D" if key == "mu_d" else "mu_rho"
            axis.set_xlabel(f"true {name} {unit}".strip())
            axis.set_ylabel(f"direct inverse net {name}")
            error = results["inverse_mirror_averaged"][key + "_relative_error"]
            axis.set_title(f"{name} (mirror-averaged): relative error mean {error['mean']:.2f}, "
                           f"median {error['median']:.2f}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
