#!/usr/bin/env python
"""Headless personalisation through Slicer's scene: files -> MRML nodes -> TumorPersonalizationLib -> nodes -> files.

Inside Slicer (5.6 and later; the main window is not needed):
    Slicer --no-main-window --python-script scripts/slicer_batch.py -- --tissue T --tumor O --out-dir D
Under plain Python with the PyPI package slicer-core (Python >= 3.11):
    python scripts/slicer_batch.py --tissue T --tumor O --out-dir D

Inputs are read into nodes by Slicer's own readers (storage nodes), or, for the bundled atlas and fraction images,
built from arrays through the MRML bridge; the nodes become the library's types through the same bridge functions
the module's Logic uses; after the personalisation the output nodes are created as the module creates them and
written with Slicer's writers. The output folder gets, as one set (nothing on failure):
    parameters.json          the parameters, loss, plan volumes, warnings (as the command line writes it)
    infiltration.nrrd        tumor-cell concentration on the tissue's grid
    target_plans.seg.nrrd    standard (core + 15 mm) and model (equal volume) plans, one segment each
    seed.mrk.json            the seed point (RAS mm)
    results.tsv              the results table
    report.png               slices, iso-lines, plans and loss curve (unless --no-report; skipped without
                             matplotlib, which parameters.json records)
Exit code 0 on success, 2 with a one-line error on bad input.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence, Tuple


def _make_library_importable() -> None:
    """Inside Slicer with the extension installed the library is importable already; from a checkout it sits one
    folder up from this script."""
    try:
        import TumorPersonalizationLib  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


_make_library_importable()

from TumorPersonalizationLib import mrml  # noqa: E402
from TumorPersonalizationLib.cli import tissue_source  # noqa: E402
from TumorPersonalizationLib.constants import DEFAULT_TUMOR_LABELS  # noqa: E402
from TumorPersonalizationLib.errors import InputError  # noqa: E402

EXIT_INPUT_ERROR = 2
OUTPUT_FILES = ("parameters.json", "infiltration.nrrd", "target_plans.seg.nrrd", "seed.mrk.json", "results.tsv",
                "report.png")
SEGMENTATION_SUFFIX = ".seg.nrrd"


# ---- command line -----------------------------------------------------------------------------------------------
def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="slicer_batch.py", description="Personalise a tumor growth model through Slicer's scene, headless.")
    tissue = parser.add_argument_group("tissue")
    tissue.add_argument("--tissue", help="tissue label map, (WM, GM, CSF) fraction image, segmentation "
                                         "(.seg.nrrd with WM/GM/CSF segments), or 'atlas' / 'atlas-1mm'")
    tissue.add_argument("--labels", nargs=3, type=int, default=(1, 2, 3), metavar=("CSF", "GM", "WM"),
                        help="label values of a tissue label map (default 1 2 3)")
    tissue.add_argument("--segment-names", nargs=3, default=("WM", "GM", "CSF"), metavar=("WM", "GM", "CSF"),
                        help="segment names of a tissue segmentation (default WM GM CSF)")
    tissue.add_argument("--wm", help="white-matter probability map (with --gm and --csf, instead of --tissue)")
    tissue.add_argument("--gm", help="grey-matter probability map")
    tissue.add_argument("--csf", help="CSF probability map")
    tumor = parser.add_argument_group("tumor")
    tumor.add_argument("--tumor", required=True, help="concentration map, tumor label map, or tumor segmentation "
                                                      "(.seg.nrrd with Necrotic/Edema/Enhancing segments)")
    tumor.add_argument("--tumor-kind", choices=("concentration", "segmentation"), default="concentration",
                       help="what an image given as --tumor holds (default concentration)")
    tumor.add_argument("--tumor-labels", nargs=3, type=int, default=DEFAULT_TUMOR_LABELS,
                       metavar=("NECROTIC", "EDEMA", "ENHANCING"), help="tumor labels (default BraTS 2023: 1 2 3)")
    run = parser.add_argument_group("run")
    run.add_argument("--method", default=None, help="inversion method (default: the library's)")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    run.add_argument("--progress", choices=("bar", "json", "none"), default="bar",
                     help="progress on stderr (json: one {\"fraction\", \"message\"} object per line)")
    run.add_argument("--no-report", action="store_true", help="do not draw report.png")
    run.add_argument("--out-dir", required=True, help="output folder (created; a previous output is replaced)")
    # Slicer passes what follows "--" on its command line to the script, the "--" included in some versions.
    return parser.parse_args([a for a in argv if a != "--"])


# ---- files -> nodes ---------------------------------------------------------------------------------------------
def read_volume_node(scene, path, name: str, labelmap: bool = False):
    """A volume node read by Slicer's reader (vtkMRMLVolumeArchetypeStorageNode)."""
    return _read_node(scene, path, name, "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode",
                      "vtkMRMLVolumeArchetypeStorageNode", "image", " (NIfTI, NRRD and MHA are supported)")


def read_segmentation_node(scene, path, name: str):
    """A segmentation node read by Slicer's reader (vtkMRMLSegmentationStorageNode)."""
    return _read_node(scene, path, name, "vtkMRMLSegmentationNode", "vtkMRMLSegmentationStorageNode", "segmentation")


def _read_node(scene, path, name: str, node_class: str, storage_class: str, what: str, hint: str = ""):
    """A node of node_class read from a file by a storage node of storage_class; nothing is left in the scene when
    the file cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"file not found: {path}")
    node = scene.AddNewNodeByClass(node_class, name)
    storage = scene.AddNewNodeByClass(storage_class)
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        scene.RemoveNode(node)
        scene.RemoveNode(storage)
        raise InputError(f"cannot read {what} {path}{hint}")
    node.SetAndObserveStorageNodeID(storage.GetID())
    return node


def _component_count(path) -> int:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise InputError(f"cannot read image {path} (NIfTI, NRRD and MHA are supported)") from None
    return reader.GetNumberOfComponents()


def _probability_nodes_from_tissue(scene, tissue):
    from TumorPersonalizationLib.geometry import Volume

    return tuple(mrml.volume_to_node(scene, Volume(fraction, tissue.geometry), f"tissue {name}")
                 for name, fraction in (("WM", tissue.wm), ("GM", tissue.gm), ("CSF", tissue.csf)))


def load_tissue(scene, args):
    """(Tissue, the node or nodes it was read from), through the same bridge calls as the module's Logic."""
    from TumorPersonalizationLib.tissue import Tissue, TissueLabels

    kind, source = tissue_source(args)
    if kind == "maps":
        nodes = tuple(read_volume_node(scene, path, f"tissue {name}")
                      for name, path in zip(("WM", "GM", "CSF"), source))
        return mrml.tissue_from_probability_nodes(*nodes), nodes
    if kind == "atlas":
        from TumorPersonalizationLib.atlas import load_atlas

        nodes = _probability_nodes_from_tissue(scene, load_atlas(source))
        return mrml.tissue_from_probability_nodes(*nodes), nodes
    if source.lower().endswith(SEGMENTATION_SUFFIX):
        node = read_segmentation_node(scene, source, "tissue")
        names = dict(zip(("wm", "gm", "csf"), args.segment_names))
        return mrml.tissue_from_segmentation_node(node, segment_names=names), node
    if Path(source).is_file() and _component_count(source) == 3:
        nodes = _probability_nodes_from_tissue(scene, Tissue.from_file(source))
        return mrml.tissue_from_probability_nodes(*nodes), nodes
    node = read_volume_node(scene, source, "tissue labels", labelmap=True)
    return mrml.tissue_from_labelmap_node(node, TissueLabels(*args.labels)), node


def load_tumor(scene, args, tissue) -> Tuple[object, str, object]:
    """(tumor Volume, kind, node): a segmentation file becomes labels on the tissue's grid; an image keeps its
    own grid (the library resamples it)."""
    labels = tuple(args.tumor_labels)
    if args.tumor.lower().endswith(SEGMENTATION_SUFFIX):
        node = read_segmentation_node(scene, args.tumor, "tumor")
        mapping = mrml.tumor_segment_labels(node, labels)
        return mrml.labels_from_segmentation_node(node, tissue.geometry, mapping), "segmentation", node
    node = read_volume_node(scene, args.tumor, "tumor", labelmap=args.tumor_kind == "segmentation")
    return mrml.volume_from_node(node), args.tumor_kind, node


# ---- the personalisation ----------------------------------------------------------------------------------------
def run_personalization(tissue, tumor_volume, kind: str, labels: Sequence[int], method: Optional[str] = None,
                        device: str = "auto", progress=None, cancel=None):
    """The library's personalisation of a tumor Volume (kind "concentration" or "segmentation") on the tissue."""
    from TumorPersonalizationLib.observation import Observation
    from TumorPersonalizationLib.pipeline import personalize

    observation = Observation.from_volume(tumor_volume, kind=kind, labels=tuple(labels))
    return personalize(tissue, observation, method=method, device=device, progress=progress, cancel=cancel)


def _progress(mode: str):
    from TumorPersonalizationLib.progress import BarProgress, JsonLinesProgress

    if mode == "json":
        return JsonLinesProgress()
    return BarProgress("personalising", enabled=(mode == "bar"))


# ---- nodes -> files ---------------------------------------------------------------------------------------------
def _json_default(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _storage_node_for(node):
    import slicer

    if node.IsA("vtkMRMLMarkupsNode"):
        return slicer.vtkMRMLMarkupsJsonStorageNode()  # headless, markups nodes offer no default storage node
    if node.IsA("vtkMRMLTableNode"):
        return slicer.vtkMRMLTableStorageNode()
    return node.CreateDefaultStorageNode()


def write_node(node, path: Path) -> None:
    storage = _storage_node_for(node)
    storage.SetFileName(str(path))
    if not storage.WriteData(node):
        raise OSError(f"Slicer could not write {node.GetName()} to {path}")


def check_output_dir(out_dir: Path) -> None:
    """The output folder may be missing, empty, or hold an earlier output of this script; nothing else is replaced."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out-dir {out_dir} exists and is not a directory")
    if out_dir.is_dir():
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in OUTPUT_FILES)
        if foreign:
            raise InputError(f"--out-dir {out_dir} holds other files ({', '.join(foreign[:3])}); choose a new or "
                             "empty folder")


def save_outputs(nodes, summary, out_dir: Path, result=None) -> Path:
    """Write the output nodes (and report.png from `result` when given and matplotlib is installed; summary's
    "report_png" says which) into out_dir as one set: into a temporary folder beside it that then replaces it."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=str(out_dir.parent)))
    try:
        if result is not None:  # before parameters.json, which records whether the picture was drawn
            from TumorPersonalizationLib.figures import save_result_figure_if_possible

            skipped = save_result_figure_if_possible(temporary / "report.png", result)
            summary["report_png"] = skipped or "written"
            if skipped:
                summary["warnings"] = list(summary.get("warnings") or []) + [skipped]
        (temporary / "parameters.json").write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")
        write_node(nodes["infiltration"], temporary / "infiltration.nrrd")
        write_node(nodes["plans"], temporary / "target_plans.seg.nrrd")
        write_node(nodes["seed"], temporary / "seed.mrk.json")
        write_node(nodes["table"], temporary / "results.tsv")
        os.chmod(temporary, 0o755)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(temporary, out_dir)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return out_dir


# ---- main -------------------------------------------------------------------------------------------------------
def scene_for_run():
    """The application's scene inside Slicer, else the library's headless scene (slicer-core)."""
    import slicer

    if hasattr(slicer, "app"):
        return slicer.mrmlScene
    return mrml.create_headless_scene()


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_arguments(sys.argv[1:] if argv is None else argv)
    try:
        out_dir = Path(args.out_dir)
        check_output_dir(out_dir)
        scene = scene_for_run()
        tissue, _ = load_tissue(scene, args)
        tumor_volume, kind, tumor_node = load_tumor(scene, args, tissue)
        progress = _progress(args.progress)
        try:
            result = run_personalization(tissue, tumor_volume, kind, args.tumor_labels, args.method, args.device,
                                         progress)
        finally:
            progress.close()
        summary = result.to_dict()
        plans = {"standard": result.plans.standard, "model": result.plans.model,
                 "iso": getattr(result.plans, "iso", None)}
        nodes = mrml.result_nodes(scene, summary, result.concentration, plans, tumor_node.GetName())
        save_outputs(nodes, summary, out_dir, None if args.no_report else result)
    except InputError as error:
        print(f"slicer_batch: error: {' '.join(str(error).split())}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except OSError as error:  # disk full, permissions: one line too, and save_outputs left nothing partial
        print(f"slicer_batch: error: {error}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    for warning in summary.get("warnings") or []:
        print(f"slicer_batch: warning: {warning}", file=sys.stderr)
    short = {key: summary[key] for key in ("seed_ras_mm", "mu_d_mm", "mu_rho", "method", "loss", "runtime_s", "plans")
             if key in summary}
    print(json.dumps({"out_dir": str(out_dir), **short}, indent=2, default=_json_default))
    return 0


if __name__ == "__main__":
    try:
        status = main()
    except Exception:  # a bug: keep the traceback, but still end Slicer below instead of leaving it running
        import traceback

        traceback.print_exc()
        status = 1
    import slicer

    if hasattr(slicer, "app"):  # inside Slicer: end the application with the script's status
        slicer.util.exit(status)
    else:
        sys.exit(status)
