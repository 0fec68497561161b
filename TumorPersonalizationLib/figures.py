"""Pictures: orthogonal slices of a tumor-cell concentration map over the tissue, optional loss curve."""
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .constants import CORE_THRESHOLD, EDEMA_THRESHOLD, VISIBLE_THRESHOLDS
from .geometry import Volume
from .tissue import Tissue


def tissue_background(tissue: Tissue) -> np.ndarray:
    """A T1-like grey image from the fractions: WM bright, GM mid, CSF dark."""
    return 0.15 * tissue.csf + 0.55 * tissue.gm + 0.95 * tissue.wm


def _slices(array: np.ndarray, center_kji):
    k, j, i = (int(x) for x in center_kji)
    # Axial (k fixed), coronal (j fixed), sagittal (i fixed); transposed so that up is +k / +j on screen.
    return [("axial", array[k, :, :]), ("coronal", array[:, j, :]), ("sagittal", array[:, :, i])]


def slice_center(concentration: np.ndarray, seed_kji: Optional[Sequence[float]] = None):
    """The voxel to cut through: the concentration's maximum (the seed if given and the map is empty)."""
    if concentration.max() > 0:
        return np.unravel_index(int(np.argmax(concentration)), concentration.shape)
    if seed_kji is not None:
        return tuple(int(round(x)) for x in seed_kji)
    return tuple(n // 2 for n in concentration.shape)


# Axis labels of the three slices: index axes, with their RAS meaning where the image is RAS-aligned (the atlas).
INDEX_AXES = {"axial": ("+i", "+j"), "coronal": ("+i", "+k"), "sagittal": ("+j", "+k")}
RAS_ALIGNED_AXES = {"axial": ("+i (R)", "+j (A)"), "coronal": ("+i (R)", "+k (S)"), "sagittal": ("+j (A)", "+k (S)")}


def _draw_infiltration(axis, name: str, tissue_slice, c_slice, axis_labels, max_alpha: float, line_width: float):
    """One slice: the tissue in grey, the concentration in Inferno whose opacity grows with c (so the faint
    infiltration tail shows without hiding the anatomy), its iso-lines at the imaging thresholds, title and labels."""
    import matplotlib.pyplot as plt

    axis.imshow(tissue_slice, cmap="gray", origin="lower", vmin=0, vmax=1, interpolation="nearest")
    colours = plt.get_cmap("inferno")(np.clip(c_slice, 0, 1))
    colours[..., 3] = np.clip(0.15 + 0.85 * np.sqrt(np.clip(c_slice, 0, 1)), 0, max_alpha) * (c_slice >= 1e-3)
    axis.imshow(colours, origin="lower", interpolation="nearest")
    if c_slice.max() >= EDEMA_THRESHOLD:
        axis.contour(c_slice, levels=list(VISIBLE_THRESHOLDS), colors=["#55ccff", "#33ff66"], linewidths=line_width)
    axis.set_title(name)
    right, up = axis_labels[name]
    axis.set_xlabel(right, fontsize=8)
    axis.set_ylabel(up, fontsize=8)
    axis.set_xticks([])
    axis.set_yticks([])


def _write_png(figure, path, dpi: int) -> Path:
    import io

    import matplotlib.pyplot as plt

    from .imageio import atomic_write_bytes

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def save_concentration_figure(path, tissue: Tissue, concentration: Volume, title: str = "",
                              seed_ras_mm: Optional[Sequence[float]] = None,
                              loss_history: Optional[Sequence[float]] = None,
                              observed: Optional[np.ndarray] = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = concentration.array
    seed_kji = None if seed_ras_mm is None else tissue.geometry.ras_to_index_kji(seed_ras_mm)
    center = slice_center(c, seed_kji)
    background = tissue_background(tissue)
    panels = 3 + (1 if loss_history else 0)
    figure, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 4.6))
    for axis, (name, tissue_slice), (_, c_slice) in zip(axes, _slices(background, center), _slices(c, center)):
        _draw_infiltration(axis, name, tissue_slice, c_slice, RAS_ALIGNED_AXES, max_alpha=0.9, line_width=0.9)
        if observed is not None:
            (_, o_slice), = [s for s in _slices(observed, center) if s[0] == name]
            if o_slice.max() >= EDEMA_THRESHOLD:
                axis.contour(o_slice, levels=[EDEMA_THRESHOLD], colors=["white"], linewidths=0.8, linestyles="dashed")
    image = matplotlib.cm.ScalarMappable(norm=matplotlib.colors.Normalize(0, 1), cmap="inferno")
    figure.colorbar(image, ax=list(axes[:3]), fraction=0.02, pad=0.01, label="tumor-cell concentration")
    if loss_history:
        axes[3].semilogy(np.arange(1, len(loss_history) + 1), loss_history, color="tab:blue")
        axes[3].set_xlabel("iteration")
        axes[3].set_ylabel("data loss")
        axes[3].set_title("optimisation")
    figure.suptitle(title + f"\ncontours: c = {EDEMA_THRESHOLD:g} (edema-visible, blue), c = {CORE_THRESHOLD:g} "
                            "(core-visible, green)",
                    fontsize=10)
    return _write_png(figure, path, dpi=110)


# Recorded in parameters.json ("report_png") and among its warnings when the picture is not drawn.
REPORT_SKIPPED = "report.png skipped: matplotlib is not installed (the other outputs are complete)"


def save_result_figure_if_possible(path, result) -> Optional[str]:
    """Draw save_result_figure(path, result) where matplotlib is installed. Returns None when the picture was
    written, else the sentence saying why it was skipped (REPORT_SKIPPED). A stock 3D Slicer ships no matplotlib
    and the module does not install it, so the picture is optional; any other failure while drawing raises."""
    from .slicer_deps import module_available

    if not module_available("matplotlib"):
        return REPORT_SKIPPED
    save_result_figure(path, result)
    return None


def save_result_figure(path, result) -> Path:
    """The personalisation at a glance: three orthogonal slices through the observed tumor with the inferred
    infiltration (colour, iso-lines at the imaging thresholds), the observed tumor (white dashed), the standard
    15 mm plan (orange) and the equal-volume model plan (magenta), the seed (cross); and the loss curve. With a
    follow-up (result.recurrence), the share of the recurrence each plan covers is printed under the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    tissue, c = result.tissue, result.concentration.array
    observation = result.observation
    seed_kji = tissue.geometry.ras_to_index_kji(result.parameters.seed_ras_mm)
    visible = observation.visible if observation is not None else c >= EDEMA_THRESHOLD
    if np.any(visible > 0.5):
        center = tuple(int(round(x)) for x in np.argwhere(visible > 0.5).mean(axis=0))
    else:
        center = slice_center(c, seed_kji)
    background = tissue_background(tissue)
    # The extra space between panels keeps the loss axis's label off the sagittal slice.
    figure, axes = plt.subplots(1, 4, figsize=(17, 4.8), gridspec_kw={"width_ratios": [1, 1, 1, 1.1], "wspace": 0.3})
    overlays = [(observation.visible if observation is not None else None, "white", "dashed", [0.5]),
                (result.plans.standard, "#ff9900", "solid", [0.5]), (result.plans.model, "#ff44ff", "solid", [0.5])]
    seed_position = {"axial": (seed_kji[2], seed_kji[1]), "coronal": (seed_kji[2], seed_kji[0]),
                     "sagittal": (seed_kji[1], seed_kji[0])}
    for axis, (name, tissue_slice), (_, c_slice) in zip(axes, _slices(background, center), _slices(c, center)):
        # Index-axis labels only: a patient's grid may be oblique.
        _draw_infiltration(axis, name, tissue_slice, c_slice, INDEX_AXES, max_alpha=0.85, line_width=0.8)
        for mask, colour, style, levels in overlays:
            if mask is None:
                continue
            (_, m_slice), = [s for s in _slices(np.asarray(mask, np.float32), center) if s[0] == name]
            if m_slice.max() > 0.5:
                axis.contour(m_slice, levels=levels, colors=[colour], linewidths=1.0, linestyles=style)
        axis.plot(*seed_position[name], marker="+", color="cyan", markersize=9)
    axes[0].legend(handles=[Line2D([], [], color="white", linestyle="dashed", label="observed tumor"),
                            Line2D([], [], color="#55ccff", label=f"model c = {EDEMA_THRESHOLD:g}"),
                            Line2D([], [], color="#33ff66", label=f"model c = {CORE_THRESHOLD:g}"),
                            Line2D([], [], color="#ff9900", label="standard plan (15 mm)"),
                            Line2D([], [], color="#ff44ff", label="model plan (equal volume)"),
                            Line2D([], [], color="cyan", marker="+", linestyle="none", label="seed")],
                   loc="lower left", fontsize=6, framealpha=0.6)
    loss_axis = axes[3]
    kinds = {"surrogate": "tab:orange", "fd": "tab:blue"}
    for kind, colour in kinds.items():
        points = [(h["evaluation"], h["loss"]) for h in result.history if h["loss_kind"] == kind and h["loss"] > 0]
        if points:
            x, y = zip(*points)
            loss_axis.semilogy(x, y, ".", markersize=3, color=colour,
                               label="surrogate loss (frame)" if kind == "surrogate" else "FD data loss")
    loss_axis.set_xlabel("loss evaluation")
    loss_axis.set_ylabel("data loss")
    loss_axis.set_title(f"{result.method}: {len(result.history)} evaluations, {result.runtime_s:.1f} s")
    loss_axis.legend(fontsize=7)
    p = result.parameters
    seed = ", ".join(f"{x:.0f}" for x in p.seed_ras_mm)
    volumes = result.plans.volumes_cm3
    fit_ncc = f"NCC {result.fit['ncc']:.3f}, " if "ncc" in result.fit else ""
    recurrence = getattr(result, "recurrence", None)
    if recurrence:
        from .recurrence import coverage_summary

        recurrence_line = "\n" + coverage_summary(recurrence)
    else:
        recurrence_line = ""
    figure.suptitle(f"seed RAS ({seed}) mm, mu_D {p.mu_d_mm:.2f} mm, mu_rho {p.mu_rho:.2f}; fit {fit_ncc}"
                    f"Dice visible {result.fit.get('dice_visible', 0):.2f};"
                    f" plans {volumes['standard_cm3']:.0f} cm^3 each" + recurrence_line
                    + ("\n" + "; ".join(result.warnings) if result.warnings else ""), fontsize=9)
    return _write_png(figure, path, dpi=100)
