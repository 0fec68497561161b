"""Agreement between a predicted and a reference tumor-cell concentration map, inside the brain (WM+GM).

As in the published evaluation of learned tumor-growth models, errors are taken over brain voxels only, and the
normalised errors divide by the reference tumor's size so that small and large tumors weigh alike. Here that size is
the reference's total concentration (sum of c over the brain, in voxels), a threshold-free tumor volume.
"""
from typing import Dict, Optional, Sequence

import numpy as np

from .constants import EDEMA_THRESHOLD, VISIBLE_THRESHOLDS
from .errors import InputError

# Dice is reported at the imaging model's visible-tumor thresholds (FLAIR/edema, T1Gd/core).
DICE_THRESHOLDS = VISIBLE_THRESHOLDS


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks; 1.0 when both are empty (nothing to disagree on)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float(np.logical_and(a, b).sum()) / total


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two sets of values; 1.0 if both are constant and equal, 0.0 if only one is."""
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    norm = np.sqrt((a * a).sum() * (b * b).sum())
    if norm == 0:
        return 1.0 if np.allclose(a, b) else 0.0
    return float((a * b).sum() / norm)


def compare(predicted: np.ndarray, reference: np.ndarray, brain_mask: np.ndarray,
            thresholds: Sequence[float] = DICE_THRESHOLDS) -> Dict[str, float]:
    """MSE, MAE, their tumor-size-normalised versions, NCC and Dice at thresholds, all inside brain_mask."""
    predicted, reference = np.asarray(predicted), np.asarray(reference)
    brain_mask = np.asarray(brain_mask, bool)
    if predicted.shape != reference.shape or predicted.shape != brain_mask.shape:
        raise InputError(f"maps to compare have different shapes: {predicted.shape}, {reference.shape}, "
                         f"brain {brain_mask.shape}")
    p = predicted[brain_mask].astype(np.float64)
    r = reference[brain_mask].astype(np.float64)
    if p.size == 0:
        raise InputError("the brain mask is empty: nothing to compare")
    if not (np.all(np.isfinite(p)) and np.all(np.isfinite(r))):
        raise InputError("maps to compare contain NaN or infinite values inside the brain")
    difference = p - r
    tumor_size = max(float(r.sum()), 1e-12)
    out = {
        "mse": float(np.mean(difference ** 2)),
        "mae": float(np.mean(np.abs(difference))),
        "mse_normalised": float(np.sum(difference ** 2) / tumor_size),
        "mae_normalised": float(np.sum(np.abs(difference)) / tumor_size),
        "ncc": ncc(p, r),
    }
    for threshold in thresholds:
        out[f"dice_{threshold:g}"] = dice(p >= threshold, r >= threshold)
    return out


def tumor_volume_cm3(concentration: np.ndarray, voxel_volume_mm3: float, threshold: float = EDEMA_THRESHOLD,
                     brain_mask: Optional[np.ndarray] = None) -> float:
    """Volume where the concentration reaches a threshold (the visible tumor at 0.25), in cm^3."""
    mask = np.asarray(concentration) >= threshold
    if brain_mask is not None:
        mask &= np.asarray(brain_mask, bool)
    return float(mask.sum()) * voxel_volume_mm3 / 1000.0
