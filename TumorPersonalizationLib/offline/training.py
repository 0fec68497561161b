"""Training of the surrogate and the direct inverse network from a JSON recipe: plain PyTorch, CPU or CUDA.

Resumable (a checkpoint after every epoch holds model, optimiser, schedule, history, best weights and RNG states),
fixed seeds, a validation split, early stopping, a progress bar and a loss-curve plot; at the end the best weights
and their model card go to Resources/Models through the registry; the held-out check samples go apart from them.
"""
import json
import math
import time
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from .dataset import load_dataset
from ..errors import InputError
from .evaluation import summarise
from ..inverse_net import inverse_answer
from ..metrics import compare
from ..parameters import ParameterScaling
from ..progress import ProgressCallback, check_cancel, report
from ..surrogate import brain_mask_from_tissue, masked_bce_with_logits


def read_recipe(path) -> Dict:
    path = Path(path)
    if not path.exists():
        raise InputError(f"recipe not found: {path}")
    recipe = json.loads(path.read_text())
    for key in ("name", "kind", "config", "train_data", "epochs", "batch_size", "learning_rate"):
        if key not in recipe:
            raise InputError(f"recipe {path} lacks '{key}'")
    return recipe


def to_tensors(data: Dict[str, np.ndarray], scaling: ParameterScaling) -> Dict[str, torch.Tensor]:
    tissue = torch.as_tensor(data["tissue"].astype(np.float32))
    concentration = torch.as_tensor(data["concentration"].astype(np.float32))
    parameters = scaling.normalise(torch.as_tensor(data["seed_offset_mm"], dtype=torch.float32),
                                   torch.as_tensor(data["mu_d_mm"], dtype=torch.float32),
                                   torch.as_tensor(data["mu_rho"], dtype=torch.float32))
    out = {"tissue": tissue, "concentration": concentration, "parameters": parameters,
           "mask": brain_mask_from_tissue(tissue)}
    if "segmentation_input" in data:  # format 3: the tumor also as a segmentation, for the inverse net
        out["segmentation_input"] = torch.as_tensor(data["segmentation_input"].astype(np.float32))
    return out


def batch_loss(kind: str, model, batch: Dict[str, torch.Tensor], segmentation_fraction: float = 0.0) -> torch.Tensor:
    """The training loss of a batch. segmentation_fraction (inverse net only): the share of samples shown as their
    segmentation (segmentation_input) instead of their concentration, drawn per sample from torch's RNG (which the
    checkpoint saves, so a resumed run draws the same)."""
    if kind == "surrogate":
        return masked_bce_with_logits(model.logits(batch["tissue"], batch["parameters"]), batch["concentration"],
                                      batch["mask"])
    tumor = batch["concentration"]
    if segmentation_fraction > 0:
        if "segmentation_input" not in batch:
            raise InputError("segmentation_fraction needs a dataset with segmentation_input (format 3)")
        shown = torch.rand(len(tumor)) < segmentation_fraction
        tumor = torch.where(shown.to(tumor.device)[:, None, None, None], batch["segmentation_input"], tumor)
    return torch.mean((model(batch["tissue"], tumor) - batch["parameters"]) ** 2)


def _batches(tensors, indices, batch_size, device):
    for start in range(0, len(indices), batch_size):
        chosen = indices[start:start + batch_size]
        yield {k: v[chosen].to(device) for k, v in tensors.items()}


def evaluate_surrogate(model, tensors, device="cpu", batch_size=8) -> Dict:
    """Per-sample metrics inside the brain: MSE, MAE, tumor-normalised MSE/MAE, NCC; mean, s.e. and worst 5 %."""
    rows = []
    model.eval()
    with torch.no_grad():
        for batch in _batches(tensors, torch.arange(len(tensors["tissue"])), batch_size, device):
            predicted = model(batch["tissue"], batch["parameters"]).cpu().numpy()
            for p, t, m in zip(predicted, batch["concentration"].cpu().numpy(), batch["mask"].cpu().numpy() > 0):
                rows.append(compare(p, t, m, thresholds=()))
    return summarise(rows, worst_is_low={"ncc"})


def predict_inverse(model, tensors, scaling: ParameterScaling, device="cpu", batch_size=8,
                    tumor_input: str = "concentration", mirror_average: bool = False) -> Dict[str, np.ndarray]:
    """Predicted and true physical parameters of every sample: seed offsets (mm), mu_D (mm), mu_rho; the network
    shown tensors[tumor_input] ("concentration" or "segmentation_input"); mirror_average=True: the answer averaged
    with the mirrored input's (inverse_net.inverse_answer, as the inversion's direct method asks it)."""
    out = {k: [] for k in ("seed_predicted", "seed_true", "mu_d_predicted", "mu_d_true", "mu_rho_predicted",
                           "mu_rho_true")}
    model.eval()
    with torch.no_grad():
        for batch in _batches(tensors, torch.arange(len(tensors["tissue"])), batch_size, device):
            predicted = inverse_answer(model, batch["tissue"], batch[tumor_input], mirror_average)
            for suffix, values in (("predicted", predicted.cpu()),
                                   ("true", batch["parameters"].cpu())):
                seed, mu_d, mu_rho = scaling.denormalise(values)
                out["seed_" + suffix].append(seed.numpy())
                out["mu_d_" + suffix].append(mu_d.numpy())
                out["mu_rho_" + suffix].append(mu_rho.numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def evaluate_inverse(model, tensors, scaling: ParameterScaling, device="cpu", batch_size=8,
                     tumor_input: str = "concentration", mirror_average: bool = False) -> Dict:
    """Relative errors of mu_D and mu_rho and the seed error in mm; mean, s.e., median and worst 5 %
    (mirror_average: see predict_inverse)."""
    p = predict_inverse(model, tensors, scaling, device, batch_size, tumor_input, mirror_average)
    rows = [{"mu_d_relative_error": float(abs(p["mu_d_predicted"][n] - p["mu_d_true"][n]) / p["mu_d_true"][n]),
             "mu_rho_relative_error": float(abs(p["mu_rho_predicted"][n] - p["mu_rho_true"][n]) / p["mu_rho_true"][n]),
             "seed_error_mm": float(np.linalg.norm(p["seed_predicted"][n] - p["seed_true"][n]))}
            for n in range(len(p["mu_d_true"]))]
    return summarise(rows, worst_is_low=set())


def load_initial_weights(model, start, start_config: Dict, config: Dict, start_name: str) -> None:
    """Copy a registered network's weights into a new one of the same design, or of the same design plus seed
    fields (surrogate.SurrogateConfig.seed_fields): then the layers that read the fields get zero weights for them,
    so the new network starts as exactly the old function. InputError for any other difference."""
    # Every key either side has (a key only the start has is a difference too, as in the plain equality this was).
    differ = {k for k in set(config) | set(start_config) if config.get(k) != start_config.get(k)}
    grows = differ <= {"seed_fields", "seed_field_scale"} and bool(config.get("seed_fields")) \
        and not start_config.get("seed_fields")
    if differ and not grows:
        raise InputError(f"initial weights {start_name} have another design ({sorted(differ)} differ)")
    target, source = model.state_dict(), start.state_dict()
    for key, value in target.items():
        if key not in source:
            continue  # a layer only the new design has (its own initialisation)
        old = source[key]
        if old.shape == value.shape:
            value.copy_(old)
        elif grows and old.dim() == value.dim() and old.shape[0] == value.shape[0] and old.shape[1] < value.shape[1] \
                and old.shape[2:] == value.shape[2:]:
            value.zero_()
            value[:, :old.shape[1]].copy_(old)  # the fields are the last input channels
        else:
            raise InputError(f"initial weights {start_name}: {key} has shape {tuple(old.shape)}, the new network "
                             f"{tuple(value.shape)}")
    missing = set(source) - set(target)
    if missing:
        raise InputError(f"initial weights {start_name} hold layers the new network lacks: {sorted(missing)[:3]}")
    model.load_state_dict(target)


def build(recipe: Dict):
    from ..registry import build_model

    return build_model(recipe["kind"], recipe["config"])


def train(recipe: Dict, work_dir, device="cpu", progress: Optional[ProgressCallback] = None,
          models_directory: Optional[Path] = None, max_epochs: Optional[int] = None, cancel=None,
          checks_directory: Optional[Path] = None) -> Dict:
    """Train (or resume) per recipe; returns the model card written to the registry.

    models_directory: where the weights and card go (None: the registry's, Resources/Models). checks_directory:
    where the held-out check samples (NAME_check.npz, named in the card) go (None: work_dir); they are not shipped.

    progress(fraction of the epochs, message) after every epoch; cancel (progress.py) is checked between batches
    and stops at the last checkpoint (an epoch boundary), from which a later call resumes."""
    from tqdm import tqdm

    from ..registry import read_card, save_model

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.get("seed", 0))
    scaling = ParameterScaling.from_dict(recipe.get("scaling", ParameterScaling().to_dict()))
    data = load_dataset(recipe["train_data"])
    manifest = json.loads((Path(recipe["train_data"]) / "manifest.json").read_text())
    grid = int(recipe["config"]["grid"])
    if data["tissue"].shape[-1] != grid:
        raise InputError(f"dataset {recipe['train_data']} has grid {data['tissue'].shape[-1]}, recipe wants {grid}")
    if recipe["config"].get("seed_fields"):
        # The fields place voxels in units of the frame's half side, the seed in units of its offset range.
        cube_mm = manifest["surrogate_geometry"]["cube_mm"]
        expected = cube_mm / (2.0 * scaling.seed_offset_half_range_mm)
        if abs(recipe["config"].get("seed_field_scale", 1.0) - expected) > 1e-9:
            raise InputError(f"seed_field_scale must be cube_mm / (2 * seed_offset_half_range_mm) = {expected:g} for "
                             f"{recipe['train_data']}")
    tensors = to_tensors(data, scaling)
    count = len(tensors["tissue"])
    order = torch.randperm(count, generator=torch.Generator().manual_seed(recipe.get("seed", 0)))
    validation_count = max(1, int(round(count * recipe.get("validation_fraction", 0.1))))
    validation, training = order[:validation_count], order[validation_count:]

    model = build(recipe).to(device)
    initial = None
    if recipe.get("initial_weights"):
        # A second stage: start from a registered model (same kind, grid and design), e.g. a longer schedule at a
        # lower learning rate after a first run; the card records which weights it started from.
        from ..registry import load_model

        start, start_card = load_model(recipe["initial_weights"], kind=recipe["kind"], grid=grid,
                                       directory=models_directory)
        load_initial_weights(model, start, start_card["config"], recipe["config"], recipe["initial_weights"])
        initial = {"name": recipe["initial_weights"], "sha256": start_card["sha256"],
                   "wall_time_s": start_card.get("total_wall_time_s", start_card["wall_time_s"]),
                   "epochs": start_card.get("total_epochs", start_card["epochs"])}
    optimiser = torch.optim.AdamW(model.parameters(), lr=recipe["learning_rate"],
                                  weight_decay=recipe.get("weight_decay", 1e-4))
    epochs = int(recipe["epochs"])
    steps_per_epoch = math.ceil(len(training) / recipe["batch_size"])
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=recipe["learning_rate"],
                                                   total_steps=epochs * steps_per_epoch, pct_start=0.1)
    state = {"epoch": 0, "history": [], "best_loss": math.inf, "best_state": None, "wall_s": 0.0, "stale": 0}
    checkpoint_path = work_dir / "checkpoint.pt"
    if checkpoint_path.exists():
        saved = torch.load(checkpoint_path, map_location=device, weights_only=False)  # our own file, in work_dir
        model.load_state_dict(saved["model"])
        optimiser.load_state_dict(saved["optimiser"])
        schedule.load_state_dict(saved["schedule"])
        torch.set_rng_state(saved["rng"])
        state = saved["state"]
    patience = int(recipe.get("patience", 8))
    last_epoch = epochs if max_epochs is None else min(epochs, state["epoch"] + max_epochs)
    while state["epoch"] < last_epoch and state["stale"] < patience:
        started = time.perf_counter()
        model.train()
        shuffled = training[torch.randperm(len(training))]
        losses = []
        bar = tqdm(_batches(tensors, shuffled, recipe["batch_size"], device), total=steps_per_epoch,
                   desc=f"epoch {state['epoch'] + 1}/{epochs}", leave=False)
        for batch in bar:
            check_cancel(cancel)
            optimiser.zero_grad(set_to_none=True)
            loss = batch_loss(recipe["kind"], model, batch, float(recipe.get("segmentation_fraction", 0.0)))
            loss.backward()
            optimiser.step()
            schedule.step()
            losses.append(float(loss))
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.2e}")
        model.eval()
        with torch.no_grad():
            validation_losses = [float(batch_loss(recipe["kind"], model, b)) * len(b["tissue"])
                                 for b in _batches(tensors, validation, recipe["batch_size"], device)]
        validation_loss = sum(validation_losses) / len(validation)
        state["epoch"] += 1
        state["wall_s"] += time.perf_counter() - started
        state["history"].append({"epoch": state["epoch"], "train_loss": float(np.mean(losses)),
                                 "validation_loss": validation_loss, "wall_s": state["wall_s"]})
        if validation_loss < state["best_loss"]:
            state.update(best_loss=validation_loss, stale=0,
                         best_state={k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
        else:
            state["stale"] += 1
        torch.save({"model": model.state_dict(), "optimiser": optimiser.state_dict(),
                    "schedule": schedule.state_dict(), "rng": torch.get_rng_state(), "state": state},
                   work_dir / "checkpoint.tmp")
        (work_dir / "checkpoint.tmp").replace(checkpoint_path)
        plot_history(state["history"], work_dir / "loss.png", recipe["name"])
        report(progress, state["epoch"] / epochs,
               f"epoch {state['epoch']}: train {np.mean(losses):.3e}, validation {validation_loss:.3e}, "
                     f"{state['wall_s']:.0f} s")
    if state["epoch"] < epochs and state["stale"] < patience:
        return {"finished": False, "epoch": state["epoch"]}

    model.load_state_dict(state["best_state"])
    metrics, check, segmentation_metrics = {}, {}, None
    if recipe.get("test_data"):
        test_arrays = load_dataset(recipe["test_data"])
        test = to_tensors(test_arrays, scaling)
        metrics = (evaluate_surrogate(model, test, device) if recipe["kind"] == "surrogate"
                   else evaluate_inverse(model, test, scaling, device))
        if recipe["kind"] == "inverse" and "segmentation_input" in test:
            segmentation_metrics = evaluate_inverse(model, test, scaling, device, tumor_input="segmentation_input")
        check = _write_check_samples(model, recipe, test_arrays, scaling, device,
                                     Path(checks_directory) if checks_directory is not None else work_dir)
    card = {
        "name": recipe["name"], "kind": recipe["kind"], "config": recipe["config"],
        "grid": grid, "spacing_mm": manifest["surrogate_geometry"]["spacing_mm"],
        "cube_mm": manifest["surrogate_geometry"]["cube_mm"], "scaling": scaling.to_dict(),
        "training_data": {"path": recipe["train_data"], "manifest_sha256": manifest["sha256"],
                          "samples": manifest["samples"], "config": manifest["config"]},
        "test_data": recipe.get("test_data"), "recipe": recipe, "epochs": state["epoch"],
        "stopped_early": state["stale"] >= patience and state["epoch"] < epochs,
        "wall_time_s": round(state["wall_s"], 1),
        "initial_weights": initial,
        "total_epochs": state["epoch"] + (initial["epochs"] if initial else 0),
        "total_wall_time_s": round(state["wall_s"] + (initial["wall_time_s"] if initial else 0.0), 1),
        "device": str(device), "torch": torch.__version__, "held_out_metrics": metrics,
        "history": state["history"], "check_samples": check,
    }
    if segmentation_metrics is not None:  # the same held-out tumors shown as segmentations
        card["held_out_metrics_segmentation_input"] = segmentation_metrics
    save_model(model, card, recipe["name"], models_directory)
    return read_card(recipe["name"], models_directory)  # as written: with the weights' sha256


CHECK_SAMPLES = 4


def _write_check_samples(model, recipe, arrays, scaling, device, directory: Path) -> Dict:
    """A few held-out samples written to `directory`, with the model's metrics on them: a test can then show that
    the weights still reproduce their card."""
    import io

    from ..imageio import atomic_write_bytes

    subset = {k: v[:CHECK_SAMPLES] for k, v in arrays.items()}
    tensors = to_tensors(subset, scaling)
    metrics = (evaluate_surrogate(model, tensors, device) if recipe["kind"] == "surrogate"
               else evaluate_inverse(model, tensors, scaling, device))
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **{k: subset[k] for k in ("tissue", "concentration", "seed_offset_mm", "mu_d_mm",
                                                          "mu_rho")})
    name = f"{recipe['name']}_check.npz"
    atomic_write_bytes(directory / name, buffer.getvalue())
    return {"file": name, "samples": CHECK_SAMPLES,
            "metrics": {k: v["mean"] for k, v in metrics.items() if isinstance(v, dict)}}


def plot_history(history, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.semilogy(epochs, [h["train_loss"] for h in history], label="training")
    axis.semilogy(epochs, [h["validation_loss"] for h in history], label="validation")
    axis.set_xlabel("epoch")
    axis.set_ylabel("loss")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
