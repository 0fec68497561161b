"""Command line: ``tumor-personalization simulate | personalize | demo | batch | predict-gbm``.

Every option has --help; progress goes to stderr; bad input ends with a one-line error and exit code 2, and no
output file is left half-written.
"""
import argparse
import json
import sys
import time
from pathlib import Path
from typing import List, Optional


from .constants import CORE_THRESHOLD, DEFAULT_TUMOR_LABELS, EDEMA_THRESHOLD, STANDARD_MARGIN_MM
from .errors import InputError
from .progress import BarProgress, Cancelled, JsonLinesProgress

EXIT_INPUT_ERROR = 2
ATLAS_NAMES = {"atlas": 2, "atlas-2mm": 2, "atlas-1mm": 1}


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line (same style as our input errors)."""

    def error(self, message):
        self.exit(EXIT_INPUT_ERROR, f"{self.prog}: error: {message}\n")


def _add_tissue_options(parser):
    group = parser.add_argument_group("tissue (a label map, a 3-component WM/GM/CSF image, the atlas, or 3 maps)")
    group.add_argument("--tissue", help="tissue label map or (WM, GM, CSF) fraction image (.nii.gz/.nrrd/.mha); "
                                        "'atlas' (2 mm) or 'atlas-1mm' for the bundled MNI ICBM152 atlas")
    group.add_argument("--labels", nargs=3, type=int, metavar=("CSF", "GM", "WM"), default=(1, 2, 3),
                       help="label values of the label map (default: 1 2 3)")
    group.add_argument("--wm", help="white-matter probability map (instead of --tissue)")
    group.add_argument("--gm", help="grey-matter probability map")
    group.add_argument("--csf", help="CSF probability map")


def _add_t1_option(parser):
    parser.add_argument_group("no tissue segmentation").add_argument(
        "--t1", help="a skull-stripped T1-weighted image instead of a tissue: the bundled atlas's T1 is registered to "
                     "it (the lesion masked) and its WM/GM/CSF warped onto the T1's grid")


def tissue_source(args):
    """Which tissue the --tissue / --wm --gm --csf options name, checked before anything is read (the command line
    and scripts/slicer_batch.py share it): ("maps", (wm, gm, csf) paths), ("atlas", spacing in mm) or ("file",
    path). Raises InputError when no tissue is given, when the maps are incomplete, or when both kinds are given."""
    maps = (args.wm, args.gm, args.csf)
    if args.tissue and any(maps):
        raise InputError("give either --tissue or --wm/--gm/--csf, not both")
    t1 = getattr(args, "t1", None)
    if t1:
        if args.tissue or any(maps):
            raise InputError("give either --t1 or a tissue (--tissue, --wm/--gm/--csf), not both")
        return "t1", t1
    if any(maps):
        if not all(maps):
            raise InputError("probability maps need all three of --wm, --gm and --csf")
        return "maps", maps
    if not args.tissue:
        raise InputError("no tissue given: use --tissue FILE (or --tissue atlas), --wm/--gm/--csf"
                         + (" or --t1 FILE" if hasattr(args, "t1") else ""))
    if args.tissue in ATLAS_NAMES:
        return "atlas", ATLAS_NAMES[args.tissue]
    return "file", args.tissue


def load_tissue_from_args(args):
    """The Tissue the options name, or for --t1 the T1 as a Volume (the pipeline derives the tissue from it)."""
    from .atlas import load_atlas
    from .geometry import Volume
    from .tissue import Tissue, TissueLabels

    kind, source = tissue_source(args)
    if kind == "t1":
        return Volume.load(source)
    if kind == "maps":
        return Tissue.from_probabilities(*source)
    if kind == "atlas":
        return load_atlas(source)
    return Tissue.from_file(source, TissueLabels(*args.labels))


def _check_output_path(path: Path) -> Path:
    from .imageio import check_writable_file

    return check_writable_file(path)


def _run_simulation(tissue, parameters, spacing, device, quiet):
    from .solver import simulate

    progress = BarProgress("simulating", enabled=not quiet)
    started = time.perf_counter()
    try:
        concentration = simulate(tissue, parameters, spacing_mm=spacing, device=device, progress=progress)
    finally:
        progress.close()
    return concentration, time.perf_counter() - started


def _summary(tissue, concentration, parameters, runtime_s):
    from .metrics import tumor_volume_cm3

    voxel = concentration.geometry.voxel_volume_mm3()
    return {
        **parameters.to_dict(),
        "runtime_s": round(runtime_s, 3),
        "visible_volume_cm3_c>=0.25": round(tumor_volume_cm3(concentration.array, voxel, EDEMA_THRESHOLD,
                                                             tissue.brain_mask), 2),
        "core_volume_cm3_c>=0.675": round(tumor_volume_cm3(concentration.array, voxel, CORE_THRESHOLD,
                                                           tissue.brain_mask), 2),
        "grid": tissue.geometry.describe(),
    }


def command_simulate(args) -> int:
    from .parameters import GrowthParameters
    from .figures import save_concentration_figure

    out = _check_output_path(Path(args.out))
    if args.picture:
        from .imageio import check_writable_file

        check_writable_file(Path(args.picture), suffixes=(".png",))
    if args.spacing is not None and not 0.1 <= args.spacing <= 10:
        raise InputError(f"--spacing {args.spacing:g} mm is outside [0.1, 10] mm")
    from .pipeline import resolve_device

    device = resolve_device(args.device)
    parameters = GrowthParameters(tuple(args.seed_ras), args.mu_d, args.mu_rho)
    tissue = load_tissue_from_args(args)
    concentration, runtime = _run_simulation(tissue, parameters, args.spacing, device, args.quiet)
    concentration.save(out)
    summary = _summary(tissue, concentration, parameters, runtime)
    if args.picture:
        save_concentration_figure(args.picture, tissue, concentration, seed_ras_mm=parameters.seed_ras_mm,
                                  title=_title(parameters, summary))
    print(json.dumps({"out": str(out), **summary}))
    return 0


def _title(parameters, summary):
    seed = ", ".join(f"{x:.0f}" for x in parameters.seed_ras_mm)
    return (f"seed RAS ({seed}) mm, mu_D {parameters.mu_d_mm:g} mm, mu_rho {parameters.mu_rho:g}: "
            f"visible {summary['visible_volume_cm3_c>=0.25']:.1f} cm^3, core {summary['core_volume_cm3_c>=0.675']:.1f}"
            f" cm^3, {summary['runtime_s']:.2f} s")


# A right-hemisphere white-matter seed in MNI space and a mid-range tumor (front ~48 mm travelled): the demo's hidden
# truth, grown with time steps refined 2x so that no method matches it by construction.
DEMO_SEED_RAS_MM = (28.0, -12.0, 24.0)
DEMO_MU_D_MM = 8.0
DEMO_MU_RHO = 3.0


def _make_progress(mode: str, description: str):
    if mode == "json":
        return JsonLinesProgress()
    return BarProgress(description, enabled=(mode == "bar"))


def _add_personalize_options(parser, with_method_default=True):
    from .constants import DEFAULT_METHOD, DEFAULT_WORKING_SPACING_MM, METHODS, STANDARD_MARGIN_MM
    from .lesion import DEFAULT_LESION_TISSUE, LESION_TISSUE_MODES

    group = parser.add_argument_group("personalisation")
    group.add_argument("--method", choices=METHODS, default=None,
                       help=f"inversion method (default: {DEFAULT_METHOD}, the best the benchmark shows within the "
                            f"time target; see the README)")
    group.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="where networks and solver run (default auto: CUDA when present)")
    group.add_argument("--working-spacing", type=float, default=DEFAULT_WORKING_SPACING_MM, metavar="MM",
                       help="voxel size of the grid the search's FD runs use (default 2 mm; the final run is always "
                            "on the tissue's own grid)")
    group.add_argument("--iso-level", type=float, metavar="C",
                       help="also write plan_iso.nii.gz: brain voxels with concentration >= C")
    group.add_argument("--margin", type=float, default=STANDARD_MARGIN_MM, metavar="MM",
                       help=f"margin of the standard plan around the tumor core (default {STANDARD_MARGIN_MM:g} mm)")
    group.add_argument("--edema-threshold", type=float, default=EDEMA_THRESHOLD,
                       help=f"imaging model: concentration visible on FLAIR/T2 (default {EDEMA_THRESHOLD:g})")
    group.add_argument("--core-threshold", type=float, default=CORE_THRESHOLD,
                       help=f"imaging model: concentration visible on T1Gd (default {CORE_THRESHOLD:g})")
    group.add_argument("--cma-budget", type=int, metavar="N",
                       help="evaluation budget of the CMA-ES methods (default 3000 surrogate, 1500 solver runs)")
    group.add_argument("--close-call-ratio", type=float, metavar="R",
                       help="hybrid: when the two candidates' FD losses on the working grid are within this factor, "
                            "judge them again on the tissue's own grid (default 1.5; 0: never)")
    group.add_argument("--close-call-max-runs", type=float, metavar="N",
                       help="hybrid: ... unless the whole search would then cost more than N runs of the winner's "
                            "on the tissue's grid, priced by their plans (default 3.5)")
    group.add_argument("--lesion-tissue", choices=LESION_TISSUE_MODES, default=DEFAULT_LESION_TISSUE,
                       help="what fills the lesion (visible tumor + 3 mm) of a tumor-bearing brain's tissue before the "
                            "fit: the bundled atlas registered to the tissue (default), the healthy WM/GM around it, "
                            "or keep the tissue as given")
    group.add_argument("--progress", choices=("bar", "json", "none"), default="bar",
                       help="progress on stderr: a bar, one JSON object per update ({\"fraction\", \"message\"}), "
                            "or nothing")


def _add_tumor_options(parser, required=True):
    group = parser.add_argument_group("tumor")
    group.add_argument("--tumor", required=required, help="observed tumor: a concentration map in [0, 1] or a "
                                                          "segmentation (.nii.gz/.nrrd/.mha)")
    group.add_argument("--tumor-kind", choices=("concentration", "segmentation"), default="concentration",
                       help="what --tumor holds (default: concentration)")
    group.add_argument("--tumor-labels", nargs=3, type=int, default=DEFAULT_TUMOR_LABELS,
                       metavar=("NECROTIC", "EDEMA", "ENHANCING"),
                       help="segmentation labels (default BraTS 2023: 1 2 3; BraTS 2021: 1 2 4)")


def _add_recurrence_options(parser, per_case=False):
    group = parser.add_argument_group("follow-up")
    if not per_case:
        group.add_argument("--recurrence", metavar="FILE",
                           help="a later tumor segmentation of the same patient (any grid): parameters.json and the "
                                "report get the share of it inside each plan (all labels, and enhancing only)")
    group.add_argument("--recurrence-labels", nargs=3, type=int, metavar=("NECROTIC", "EDEMA", "ENHANCING"),
                       help="labels of the recurrence segmentation (default: those of --tumor-labels)")


def _settings_from_args(args) -> dict:
    """The personalisation settings of a command line, as plain values (a batch sends them to workers)."""
    if args.working_spacing is not None and not 0.2 <= args.working_spacing <= 10:
        raise InputError(f"--working-spacing {args.working_spacing:g} mm is outside [0.2, 10] mm")
    if args.margin < 0:
        raise InputError(f"--margin must be >= 0 mm, got {args.margin:g}")
    if args.iso_level is not None and not 0 < args.iso_level < 1:
        raise InputError(f"--iso-level must be in (0, 1), got {args.iso_level:g}")
    if args.cma_budget is not None and args.cma_budget < 10:
        raise InputError(f"--cma-budget must be at least 10 evaluations, got {args.cma_budget}")
    if args.close_call_ratio is not None and not (args.close_call_ratio == 0 or args.close_call_ratio >= 1):
        raise InputError(f"--close-call-ratio must be 0 (off) or >= 1, got {args.close_call_ratio:g}")
    if args.close_call_max_runs is not None and not args.close_call_max_runs >= 1:
        raise InputError(f"--close-call-max-runs must be >= 1 run, got {args.close_call_max_runs:g}")
    from .observation import ImagingModel

    ImagingModel(args.edema_threshold, args.core_threshold)  # validates the thresholds
    return {"method": args.method, "device": args.device, "working_spacing_mm": args.working_spacing,
            "iso_level": args.iso_level, "margin_mm": args.margin, "edema_threshold": args.edema_threshold,
            "core_threshold": args.core_threshold, "cma_budget": args.cma_budget,
            "close_call_ratio": args.close_call_ratio, "close_call_max_runs": args.close_call_max_runs,
            "tumor_kind": getattr(args, "tumor_kind", "concentration"),
            "tumor_labels": list(getattr(args, "tumor_labels", DEFAULT_TUMOR_LABELS)),
            "lesion_tissue": getattr(args, "lesion_tissue", "atlas"),
            "recurrence_labels": list(getattr(args, "recurrence_labels", None)
                                      or getattr(args, "tumor_labels", DEFAULT_TUMOR_LABELS))}


def _personalize(tissue, observation, settings: dict, progress, recurrence=None):
    """tissue: a Tissue, or a Volume taken as the patient's T1 (the tissue is then derived from it). recurrence: a
    follow-up label map (checked before the search, its coverage stored on the result)."""
    from dataclasses import replace

    from .geometry import Volume
    from .inversion import InversionOptions
    from .pipeline import personalize

    options = InversionOptions()
    if settings.get("cma_budget"):
        options = replace(options, cma_surrogate_budget=settings["cma_budget"],
                          cma_solver_budget=settings["cma_budget"])
    if settings.get("close_call_ratio") is not None:
        options = replace(options, tissue_judge_ratio=settings["close_call_ratio"])
    if settings.get("close_call_max_runs") is not None:
        options = replace(options, tissue_judge_max_runs=settings["close_call_max_runs"])
    t1 = tissue if isinstance(tissue, Volume) else None
    return personalize(None if t1 is not None else tissue, observation, method=settings.get("method"),
                       progress=progress, device=settings.get("device", "auto"),
                       working_spacing_mm=settings.get("working_spacing_mm"), options=options,
                       iso_level=settings.get("iso_level"), margin_mm=settings.get("margin_mm", STANDARD_MARGIN_MM),
                       lesion_tissue=settings.get("lesion_tissue", "atlas"), t1=t1, recurrence=recurrence,
                       recurrence_labels=_recurrence_labels(settings))


def _load_observation(path, settings: dict):
    from .observation import ImagingModel, Observation

    return Observation.from_file(path, settings.get("tumor_kind", "concentration"),
                                 tuple(settings.get("tumor_labels", DEFAULT_TUMOR_LABELS)),
                                 ImagingModel(settings.get("edema_threshold", EDEMA_THRESHOLD),
                                              settings.get("core_threshold", CORE_THRESHOLD)))


def _load_recurrence(path, settings: dict):
    """The follow-up segmentation, read and checked before any long work (InputError naming the file)."""
    from .recurrence import load_recurrence

    return load_recurrence(path, _recurrence_labels(settings))


def _recurrence_labels(settings: dict) -> tuple:
    return tuple(settings.get("recurrence_labels") or settings.get("tumor_labels", DEFAULT_TUMOR_LABELS))


def _result_summary(result) -> dict:
    summary = {**result.parameters.to_dict(), "method": result.method, "loss": result.loss,
               "runtime_s": round(result.runtime_s, 2), "plans": result.plans.to_dict(), "fit": result.fit,
               "warnings": result.warnings}
    if getattr(result, "recurrence", None) is not None:
        summary["recurrence"] = result.recurrence
    return summary


def command_personalize(args) -> int:
    from .pipeline import check_output_dir, write_outputs

    settings = _settings_from_args(args)
    check_output_dir(Path(args.out_dir))
    from .pipeline import resolve_device

    resolve_device(args.device)
    recurrence = _load_recurrence(args.recurrence, settings) if args.recurrence else None
    tissue = load_tissue_from_args(args)
    observation = _load_observation(args.tumor, settings)
    progress = _make_progress(args.progress, "personalising")
    try:
        result = _personalize(tissue, observation, settings, progress, recurrence)
    finally:
        progress.close()
    write_outputs(result, args.out_dir)
    for warning in result.warnings:
        print(f"tumor-personalization: warning: {warning}", file=sys.stderr)
    print(json.dumps({"out_dir": str(args.out_dir), **_result_summary(result)}, indent=2))
    return 0


def command_demo(args) -> int:
    from .atlas import load_atlas
    from .metrics import compare
    from .observation import Observation
    from .observation import labels_from_concentration
    from .parameters import GrowthParameters, later_growth, parameter_errors
    from .pipeline import check_output_dir, write_outputs
    from .plans import later_growth_coverage
    from .solver import StepControl, simulate

    settings = _settings_from_args(args)
    out_dir = Path(args.out_dir)
    check_output_dir(out_dir)
    tissue = load_atlas(args.atlas_mm)
    truth = GrowthParameters(DEMO_SEED_RAS_MM, DEMO_MU_D_MM, DEMO_MU_RHO)
    print(f"demo: bundled MNI ICBM152 atlas ({tissue.geometry.describe()}); a synthetic tumor with hidden parameters "
          f"(seed {truth.seed_ras_mm} RAS mm, mu_D {truth.mu_d_mm} mm, mu_rho {truth.mu_rho}) given as a "
          f"{args.tumor_kind}", file=sys.stderr)
    hidden = simulate(tissue, truth, control=StepControl(refinement=2.0), device="cpu")
    if args.tumor_kind == "segmentation":
        labels = labels_from_concentration(hidden.array, args.edema_threshold, args.core_threshold)
        observation = Observation.from_volume(tissue.volume(labels), "segmentation")
    else:
        observation = Observation.from_volume(hidden, "concentration")
    progress = _make_progress(args.progress, "personalising")
    try:
        result = _personalize(tissue, observation, settings, progress)
    finally:
        progress.close()
    p = result.parameters
    scores = compare(result.concentration.array, hidden.array, tissue.brain_mask)
    # What the plans are for: the same tumor grown on to 1.5x its age; its visible part beyond today's is the growth
    # a plan should have covered. Equal volumes, so only where each plan puts its volume counts.
    later = simulate(tissue, later_growth(truth), control=StepControl(refinement=2.0), device="cpu")
    growth = (later.array >= args.edema_threshold) & (hidden.array < args.edema_threshold)
    coverage = later_growth_coverage(tissue, result.plans, growth, result.observation.visible,
                                     result.observation.core, hidden.array)
    errors = parameter_errors(p, truth)
    versus = {"true_parameters": truth.to_dict(),
              "errors": {"seed_mm": round(errors["seed_mm"], 2), "mu_d_relative": round(errors["mu_d_relative"], 4),
                         "mu_rho_relative": round(errors["mu_rho_relative"], 4)},
              "metrics_vs_truth": {k: round(v, 5) for k, v in scores.items()},
              "later_growth_covered": {k: round(v, 4) for k, v in coverage.items()}}
    write_outputs(result, out_dir, extra=versus)
    print(f"{'':10s} {'true':>22s} {'recovered':>22s}", file=sys.stderr)
    print(f"{'seed RAS':10s} {_fmt_seed(truth.seed_ras_mm):>22s} {_fmt_seed(p.seed_ras_mm):>22s}", file=sys.stderr)
    print(f"{'mu_D mm':10s} {truth.mu_d_mm:22.2f} {p.mu_d_mm:22.2f}", file=sys.stderr)
    print(f"{'mu_rho':10s} {truth.mu_rho:22.2f} {p.mu_rho:22.2f}", file=sys.stderr)
    print(f"NCC vs the hidden truth {scores['ncc']:.4f}, Dice 0.25 {scores['dice_0.25']:.3f}, {result.runtime_s:.1f} s "
          f"({result.method})", file=sys.stderr)
    print(f"later growth (1.5x age) covered by plans of {result.plans.volumes_cm3['standard_cm3']:.0f} cm^3: model "
          f"{coverage['model']:.3f}, 15 mm margin {coverage['standard']:.3f}, blurred labels "
          f"{coverage['blurred_labels']:.3f}, true parameters {coverage['true_parameters']:.3f}", file=sys.stderr)
    print(json.dumps({"out_dir": str(out_dir), **_result_summary(result), **versus}, indent=2))
    return 0


def _fmt_seed(seed):
    return "(" + ", ".join(f"{x:.1f}" for x in seed) + ")"


# ---- batch ---------------------------------------------------------------------------------------------------------
SUMMARY_COLUMNS = ("case", "status", "seed_x_mm", "seed_y_mm", "seed_z_mm", "mu_d_mm", "mu_rho", "loss", "runtime_s",
                   "standard_cm3", "model_cm3", "warnings", "error")
# Shares of a case's follow-up segmentation (its recurrence column or file) inside the plans.
SUMMARY_COLUMNS += ("recurrence_standard", "recurrence_model")


def read_cases(source) -> list:
    """Cases of a batch: a CSV (columns case, tissue, tumor; optional tumor_kind, recurrence) or a folder of case
    folders, each holding tissue.* and tumor.* images (and optionally recurrence.*, a follow-up segmentation).
    Relative paths in a CSV are relative to the CSV's folder."""
    import csv

    source = Path(source)
    if not source.exists():
        raise InputError(f"cases not found: {source}")
    cases = []
    if source.is_dir():
        for folder in sorted(p for p in source.iterdir() if p.is_dir()):
            found = {kind: sorted(folder.glob(f"{kind}.*")) for kind in ("tissue", "tumor", "t1", "recurrence")}
            cases.append({"case": folder.name, **{kind: str(paths[0]) if paths else ""
                                                  for kind, paths in found.items()}})
    else:
        with open(source, newline="") as stream:
            reader = csv.DictReader(stream)
            fields = set(reader.fieldnames or ())
            missing = {"case", "tumor"} - fields
            if missing or not fields & {"tissue", "t1"}:
                raise InputError(f"{source}: the CSV needs the columns case, tumor and tissue or t1 (missing "
                                 f"{', '.join(sorted(missing) or ['tissue or t1'])})")
            for row in reader:
                row = {k: (v or "").strip() for k, v in row.items() if k}
                for key in ("tissue", "tumor", "t1", "recurrence"):
                    if row.get(key) and not Path(row[key]).is_absolute() and row[key] not in ATLAS_NAMES:
                        row[key] = str(source.parent / row[key])
                cases.append(row)
    if not cases:
        raise InputError(f"no cases in {source}")
    names = [c["case"] for c in cases]
    if len(set(names)) != len(names) or any(not n or "/" in n for n in names):
        raise InputError(f"{source}: case names must be unique, non-empty and contain no '/'")
    return cases


def run_case(case: dict, out_root: str, settings: dict) -> dict:
    """Personalise one case into out_root/CASE (a function of plain values, so a Dask worker can run it). Returns
    its summary row; a failure is reported in the row, not raised."""
    from .pipeline import write_outputs
    from .tissue import Tissue

    row = {"case": case["case"], "status": "failed"}
    try:
        case_settings = dict(settings)
        if case.get("tumor_kind"):
            case_settings["tumor_kind"] = case["tumor_kind"]
        if not case.get("tumor") or not (case.get("tissue") or case.get("t1")):
            raise InputError("the case needs a tumor image and a tissue or a T1 image")
        if case.get("tissue") and case.get("t1"):
            raise InputError("the case has both a tissue and a T1 image: give one")
        recurrence = _load_recurrence(case["recurrence"], case_settings) if case.get("recurrence") else None
        if case.get("t1"):
            from .geometry import Volume

            tissue = Volume.load(case["t1"])
        elif case["tissue"] in ATLAS_NAMES:
            from .atlas import load_atlas

            tissue = load_atlas(ATLAS_NAMES[case["tissue"]])
        else:
            tissue = Tissue.from_file(case["tissue"])
        observation = _load_observation(case["tumor"], case_settings)
        result = _personalize(tissue, observation, case_settings, None, recurrence)
        if recurrence is not None:
            row.update(recurrence_standard=result.recurrence["all"]["standard"],
                       recurrence_model=result.recurrence["all"]["model"])
        write_outputs(result, Path(out_root) / case["case"], extra={"case": case["case"]})
        p = result.parameters
        row.update(status="done", seed_x_mm=p.seed_ras_mm[0], seed_y_mm=p.seed_ras_mm[1], seed_z_mm=p.seed_ras_mm[2],
                   mu_d_mm=p.mu_d_mm, mu_rho=p.mu_rho, loss=result.loss, runtime_s=round(result.runtime_s, 2),
                   standard_cm3=result.plans.volumes_cm3["standard_cm3"],
                   model_cm3=result.plans.volumes_cm3["model_cm3"], warnings=" | ".join(result.warnings))
    except Exception as error:  # one broken case must not stop the others: report it in its row
        row["error"] = " ".join(f"{type(error).__name__}: {error}".split()) if not isinstance(error, InputError) \
            else " ".join(str(error).split())
    return row


def _previous_row(out_root: Path, case: dict):
    path = out_root / case["case"] / "parameters.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    seed = data["seed_ras_mm"]
    recurrence = (data.get("recurrence") or {}).get("all") or {}
    return {"case": case["case"], "status": "done", "seed_x_mm": seed[0], "seed_y_mm": seed[1], "seed_z_mm": seed[2],
            "recurrence_standard": recurrence.get("standard", ""), "recurrence_model": recurrence.get("model", ""),
            "mu_d_mm": data["mu_d_mm"], "mu_rho": data["mu_rho"], "loss": data["loss"],
            "runtime_s": data["runtime_s"], "standard_cm3": data["plans"]["standard_cm3"],
            "model_cm3": data["plans"]["model_cm3"], "warnings": " | ".join(data.get("warnings", []))}


def _write_summary(path: Path, rows: list) -> None:
    import csv
    import io

    from .imageio import atomic_write_bytes

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in SUMMARY_COLUMNS})
    atomic_write_bytes(path, buffer.getvalue().encode())


def command_batch(args) -> int:
    from .imageio import check_writable_directory

    settings = _settings_from_args(args)
    cases = read_cases(args.cases)
    out_root = Path(args.out_dir)
    if out_root.exists() and not out_root.is_dir():
        raise InputError(f"--out-dir {out_root} exists and is not a directory")
    check_writable_directory(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    rows = {}
    todo = []
    for case in cases:
        previous = _previous_row(out_root, case)
        if previous is not None:  # resumes: a case with a complete output set is done
            rows[case["case"]] = previous
        else:
            todo.append(case)
    print(f"batch: {len(cases)} cases, {len(cases) - len(todo)} already done, {len(todo)} to run", file=sys.stderr)
    progress = _make_progress(args.progress, "cases")
    summary_path = out_root / "summary.csv"

    def finish(row):
        rows[row["case"]] = row
        if row["status"] != "done":
            print(f"tumor-personalization: case {row['case']} failed: {row.get('error', '')}", file=sys.stderr)
        _write_summary(summary_path, [rows[c["case"]] for c in cases if c["case"] in rows])
        done = len(rows)
        progress(done / len(cases), f"{done}/{len(cases)} cases")

    try:
        if args.scheduler or (args.workers and args.workers > 1):
            _run_batch_on_dask(todo, str(out_root.resolve()), settings, args.scheduler, args.workers, finish)
        else:
            for case in todo:
                finish(run_case(case, str(out_root), settings))
        _write_summary(summary_path, [rows[c["case"]] for c in cases if c["case"] in rows])
    finally:
        progress.close()
    failed = [r["case"] for r in rows.values() if r["status"] != "done"]
    print(json.dumps({"cases": len(cases), "done": len(cases) - len(failed), "failed": failed,
                      "summary": str(summary_path)}, indent=2))
    return 1 if failed else 0


def _run_batch_on_dask(cases, out_root, settings, scheduler, workers, finish):
    try:
        from distributed import Client, as_completed
    except ImportError:
        raise InputError("--scheduler/--workers need Dask: pip install 'TumorPersonalizationLib[distributed]'") \
            from None
    cluster = None
    if scheduler:
        client = Client(scheduler)
    else:
        from .cluster import local_cluster

        cluster = local_cluster(workers)
        client = Client(cluster)
    try:
        futures = {client.submit(run_case, case, out_root, settings, pure=False): case for case in cases}
        for future in as_completed(list(futures)):
            try:
                row = future.result()
            except Exception as error:  # a worker died (e.g. killed for memory): that case failed, the rest go on
                row = {"case": futures[future]["case"], "status": "failed",
                       "error": " ".join(f"{type(error).__name__}: {error}".split())}
            finish(row)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def command_predict_gbm(args) -> int:
    from .pipeline import resolve_device
    from .predict_gbm import predict_gbm

    resolve_device(args.device)
    written, failed = predict_gbm(args.input, args.output, method=args.method, device=args.device,
                                  tumor_labels=tuple(args.tumor_labels))
    print(json.dumps({"written": len(written), "failed": sorted(failed), "output": str(args.output)}, indent=2))
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tumor-personalization",
                     description="Personalised Fisher-Kolmogorov brain-tumor growth modelling.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    simulate = commands.add_parser("simulate", help="simulate a tumor for given parameters",
                                   description="Simulate the tumor-cell concentration at T = 1 and write it on the "
                                               "tissue's own grid.")
    _add_tissue_options(simulate)
    simulate.add_argument("--seed-ras", nargs=3, type=float, required=True, metavar=("X", "Y", "Z"),
                          help="tumor origin in patient RAS millimetres (the coordinates Slicer shows)")
    simulate.add_argument("--mu-d", type=float, required=True, metavar="MM",
                          help="mu_D = sqrt(D_WM * T) in mm: infiltration reach")
    simulate.add_argument("--mu-rho", type=float, required=True, metavar="R",
                          help="mu_rho = sqrt(rho * T), dimensionless: proliferation")
    simulate.add_argument("--out", required=True, help="output concentration image (.nii.gz, .nrrd, .mha)")
    simulate.add_argument("--spacing", type=float, metavar="MM",
                          help="compute on an isotropic working grid of this voxel size (default: tissue grid)")
    simulate.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    simulate.add_argument("--picture", help="also write a PNG of orthogonal slices")
    simulate.add_argument("--quiet", action="store_true", help="no progress bar")
    simulate.set_defaults(handler=command_simulate)

    personalize = commands.add_parser(
        "personalize", help="find the growth parameters that explain an observed tumor",
        description="Personalise the growth model to a patient's tissue and tumor; write, as one set, "
                    "parameters.json, infiltration.nii.gz, tissue.nii.gz (the WM/GM/CSF the model ran on), "
                    "plan_standard.nii.gz, plan_model.nii.gz (plan_iso.nii.gz with --iso-level) and report.png into "
                    "--out-dir.")
    _add_tissue_options(personalize)
    _add_t1_option(personalize)
    _add_tumor_options(personalize)
    _add_recurrence_options(personalize)
    _add_personalize_options(personalize)
    personalize.add_argument("--out-dir", required=True, help="output folder (new, empty, or a previous result)")
    personalize.set_defaults(handler=command_personalize)

    demo = commands.add_parser("demo", help="personalise a synthetic tumor with hidden parameters on the atlas",
                               description="Grow a tumor with hidden parameters on the bundled MNI atlas, "
                                           "personalise it with the default method, print recovered vs true "
                                           "parameters and write the same outputs as personalize.")
    demo.add_argument("--out-dir", default="demo_output", help="output folder (default: demo_output)")
    demo.add_argument("--atlas-mm", type=int, choices=(1, 2), default=2, help="atlas resolution (default: 2)")
    demo.add_argument("--tumor-kind", choices=("concentration", "segmentation"), default="concentration",
                      help="give the hidden tumor as a concentration map or as a BraTS-style segmentation")
    _add_personalize_options(demo)
    demo.set_defaults(handler=command_demo)

    batch = commands.add_parser("batch", help="personalise many cases (locally or on a Dask cluster)",
                                description="Personalise every case of a CSV (case,tissue,tumor[,tumor_kind]"
                                            "[,recurrence]; a t1 column instead of tissue derives the tissue from a "
                                            "T1) or of a folder of case folders (tissue.* or t1.*, tumor.*[, "
                                            "recurrence.*]) into OUT/CASE/, with "
                                            "OUT/summary.csv. Resumes: cases with a complete output set are "
                                            "skipped. Exit code 1 when any case failed.")
    batch.add_argument("--cases", required=True, help="CSV file or folder of case folders")
    batch.add_argument("--out-dir", required=True, help="output folder (one subfolder per case + summary.csv)")
    batch.add_argument("--scheduler", metavar="ADDRESS", help="run on an existing Dask scheduler (tcp://host:port)")
    batch.add_argument("--workers", type=int, default=1, help="local Dask worker processes (default 1: in-process)")
    batch.add_argument("--tumor-kind", choices=("concentration", "segmentation"), default="concentration",
                       help="default kind of the tumor images (a CSV column tumor_kind overrides it per case)")
    batch.add_argument("--tumor-labels", nargs=3, type=int, default=DEFAULT_TUMOR_LABELS,
                       metavar=("NECROTIC", "EDEMA", "ENHANCING"), help="segmentation labels (default 1 2 3)")
    _add_recurrence_options(batch, per_case=True)
    _add_personalize_options(batch)
    batch.set_defaults(handler=command_batch)

    from .constants import DEFAULT_METHOD, METHODS

    predict = commands.add_parser(
        "predict-gbm", help="the PREDICT-GBM model contract: a folder of patients in, one map per patient out",
        description="Personalise every INPUT/Patient-XXXXX/ (XXXXX-gm, -wm, -csf probability maps and XXXXX-tumorseg "
                    "labels, .nii.gz) and write OUTPUT/XXXXX.nii.gz: the tumor-cell concentration on the input grid, "
                    "> 0 in the brain and free of ties, for ranking. A broken patient is reported and skipped; exit "
                    "code 1 when any failed.")
    predict.add_argument("--input", required=True, help="folder of Patient-XXXXX folders")
    predict.add_argument("--output", required=True, help="folder for the XXXXX.nii.gz maps (created)")
    predict.add_argument("--method", choices=METHODS, default=None,
                         help=f"inversion method (default: {DEFAULT_METHOD})")
    predict.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                         help="where networks and solver run (default auto: CUDA when present)")
    predict.add_argument("--tumor-labels", nargs=3, type=int, default=DEFAULT_TUMOR_LABELS,
                         metavar=("NECROTIC", "EDEMA", "ENHANCING"), help="tumorseg labels (default 1 2 3)")
    predict.set_defaults(handler=command_predict_gbm)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except InputError as error:
        message = " ".join(str(error).split())
        print(f"tumor-personalization: error: {message}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except OSError as error:
        # Disk full, permissions changed mid-run: still one line, and the atomic writes left nothing partial.
        print(f"tumor-personalization: error: {error.strerror or error}: {error.filename or ''}".rstrip(": "),
              file=sys.stderr)
        return EXIT_INPUT_ERROR
    except (KeyboardInterrupt, Cancelled):
        print("tumor-personalization: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
