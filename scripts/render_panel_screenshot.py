#!/usr/bin/env python
"""The extension's screenshot (Resources/Images/TumorPersonalization_panel.png), rendered from the headless scene.

It is a rendering, not a capture of the running application: the module's Logic personalises a synthetic tumor on
the bundled 2 mm atlas in the headless MRML scene (slicer-core), and this script draws what the panel and the slice
views would show from the scene's nodes: the results box (the panel's own texts, Logic.resultLabels), and axial,
coronal and sagittal slices of the infiltration node over the tissue, with the target-plan segments and the seed
point. The picture says so in its footer. Replace it by a capture of Slicer once one is taken (docs/slicer.md).

    python scripts/render_panel_screenshot.py [--out Resources/Images/TumorPersonalization_panel.png]

Needs the test environment (slicer-core, torch, matplotlib: `make setup`).
"""
import argparse
import sys
from pathlib import Path

import numpy as np

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))
sys.path.insert(0, str(REPOSITORY / "Testing"))

TRUE_SEED_RAS_MM = (28.0, -12.0, 24.0)
FOOTER = ("Rendered from the headless MRML scene by scripts/render_panel_screenshot.py (the module's Logic and result "
          "nodes); not a capture of the running application.")


def personalise_in_the_headless_scene():
    """(module, scene, summary, nodes, atlas) after the Logic's personalize on a synthetic tumor."""
    from conftest_slicer import load_module_file
    from TumorPersonalizationLib import GrowthParameters, load_atlas, mrml, simulate
    from TumorPersonalizationLib.geometry import Volume

    module = load_module_file()
    scene = mrml.create_headless_scene()
    atlas = load_atlas(2)
    tissue_nodes = tuple(mrml.volume_to_node(scene, Volume(getattr(atlas, n), atlas.geometry), f"atlas {n.upper()}")
                         for n in ("wm", "gm", "csf"))
    tumor = mrml.volume_to_node(scene, simulate(atlas, GrowthParameters(TRUE_SEED_RAS_MM, 6.0, 2.5)), "tumor")
    logic = module.TumorPersonalizationLogic()
    result, nodes = logic.personalize(tissue_nodes, tumor, method="direct", device="cpu")
    return module, scene, result.to_dict(), nodes, atlas, tissue_nodes, tumor


def render(out: Path) -> Path:
    """Draw the screenshot into `out` (PNG, 1600 x 900 pixels). Returns out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from TumorPersonalizationLib import mrml
    from TumorPersonalizationLib.figures import tissue_background

    module, scene, summary, nodes, atlas, tissue_nodes, tumor = personalise_in_the_headless_scene()
    labels = module.TumorPersonalizationLogic.resultLabels(summary)
    infiltration = mrml.volume_from_node(nodes["infiltration"])
    geometry = infiltration.geometry
    plan_names = module.PLAN_SEGMENT_NAMES
    plans = {key: mrml.labels_from_segmentation_node(nodes["plans"], geometry, {plan_names[key]: 1}).array
             for key in ("standard", "model")}
    seed_ras = nodes["seed"].GetNthControlPointPositionWorld(0)
    seed_kji = np.round(geometry.ras_to_index_kji(seed_ras)).astype(int)
    background = tissue_background(atlas)

    figure = plt.figure(figsize=(16, 9), dpi=100, facecolor="#f0f0f0")
    panel = figure.add_axes([0.0, 0.0, 0.3, 1.0])
    panel.axis("off")
    lines = [("Tumor Personalization", 17, "bold"), ("", 8, "normal"),
             ("Inputs", 13, "bold"),
             (f"  Tissue: probability maps ({', '.join(n.GetName() for n in tissue_nodes)})", 10, "normal"),
             (f"  Tumor: concentration map ({tumor.GetName()})", 10, "normal"),
             ("  Method: direct     Device: cpu", 10, "normal"), ("", 8, "normal"),
             ("[ Personalize ]   [ Cancel ]", 12, "normal"), ("Done", 10, "normal"), ("", 8, "normal"),
             ("Results", 13, "bold"),
             (f"  mu_D: {labels['mu_D']}", 11, "normal"), (f"  mu_rho: {labels['mu_rho']}", 11, "normal"),
             (f"  Seed: {labels['seed']}", 11, "normal"), (f"  Loss: {labels['loss']}", 11, "normal"),
             (f"  Runtime: {labels['runtime']}", 11, "normal"), ("  Plan volumes:", 11, "normal"),
             (f"    {labels['plans']}", 10, "normal"), ("  Warnings:", 11, "normal")]
    lines += [(f"    {w}", 9, "normal") for w in labels["warnings"].splitlines()[:4]]
    y = 0.96
    for text, size, weight in lines:
        panel.text(0.05, y, text, fontsize=size, fontweight=weight, va="top", family="DejaVu Sans")
        y -= 0.012 + size / 400
    panel.text(0.05, 0.03, "For research use only. Not for clinical decisions.", fontsize=9, style="italic")

    k, j, i = seed_kji
    cuts = [("Axial (red)", np.s_[k, :, :]), ("Coronal (green)", np.s_[:, j, :]), ("Sagittal (yellow)", np.s_[:, :, i])]
    for index, (title, cut) in enumerate(cuts):
        axis = figure.add_axes([0.31 + index * 0.23, 0.1, 0.22, 0.8], facecolor="black")
        axis.imshow(background[cut], cmap="gray", origin="lower", interpolation="nearest")
        c = infiltration.array[cut]
        overlay = plt.get_cmap("inferno")(np.clip(c, 0, 1))
        overlay[..., 3] = np.where(c > 0.01, 0.35 + 0.5 * np.clip(c, 0, 1), 0.0)
        axis.imshow(overlay, origin="lower", interpolation="nearest")
        for key, colour in (("standard", "orange"), ("model", "magenta")):
            if plans[key][cut].any():
                axis.contour(plans[key][cut], levels=[0.5], colors=colour, linewidths=1.2)
        axis.set_title(title, color="black", fontsize=11)
        axis.set_xticks([])
        axis.set_yticks([])
    figure.text(0.31, 0.05, "Infiltration (inferno), standard plan (orange), model plan (magenta)", fontsize=10)
    figure.text(0.31, 0.02, FOOTER, fontsize=9, style="italic", color="#333333")
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100, facecolor=figure.get_facecolor())
    plt.close(figure)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Render the extension's screenshot from the headless scene.")
    parser.add_argument("--out", type=Path, default=REPOSITORY / "Resources" / "Images" /
                        "TumorPersonalization_panel.png")
    args = parser.parse_args(argv)
    print(render(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
