"""Command line: ``tumor-personalization simulate | demo``.

Every option has --help; progress goes to stderr; bad input ends with a one-line error and exit code 2, and no
output file is left half-written.
"""
import argparse
import json
import sys
import time
from pathlib import Path
from typing import List, Optional


from .errors import InputError
from .progress import BarProgress, JsonLinesProgress

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


def load_tissue_from_args(args):
    from .atlas import load_atlas
    from .tissue import Tissue, TissueLabels

    maps = [args.wm, args.gm, args.csf]
    if args.tissue and any(maps):
        raise InputError("give either --tissue or --wm/--gm/--csf, not both")
    if any(maps):
        if not all(maps):
            raise InputError("probability maps need all three of --wm, --gm and --csf")
        return Tissue.from_probabilities(*maps)
    if not args.tissue:
        raise InputError("no tissue given: use --tissue FILE (or --tissue atlas) or --wm/--gm/--csf")
    if args.tissue in ATLAS_NAMES:
        return load_atlas(ATLAS_NAMES[args.tissue])
    return Tissue.from_file(args.tissue, TissueLabels(*args.labels))


def _check_device(name: str) -> str:
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda requested but no CUDA device is available (use --device cpu)")
    return name


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
        "visible_volume_cm3_c>=0.25": round(tumor_volume_cm3(concentration.array, voxel, 0.25, tissue.brain_mask), 2),
        "core_volume_cm3_c>=0.675": round(tumor_volume_cm3(concentration.array, voxel, 0.675, tissue.brain_mask), 2),
        "grid": tissue.geometry.describe(),
    }


def command_simulate(args) -> int:
    from .parameters import GrowthParameters
    from .report import save_concentration_figure

    out = _check_output_path(Path(args.out))
    if args.picture:
        from .imageio import check_writable_file

        check_writable_file(Path(args.picture), suffixes=(".png",))
    if args.spacing is not None and not 0.1 <= args.spacing <= 10:
        raise InputError(f"--spacing {args.spacing:g} mm is outside [0.1, 10] mm")
    device = _check_device(args.device)
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


# A right-hemisphere white-matter seed in MNI space and a mid-range tumor (front ~48 mm travelled).
DEMO_SEED_RAS_MM = (28.0, -12.0, 24.0)
DEMO_MU_D_MM = 8.0
DEMO_MU_RHO = 3.0


def command_demo(args) -> int:
    from .atlas import load_atlas
    from .parameters import GrowthParameters
    from .report import save_concentration_figure

    from .imageio import check_writable_directory

    out_dir = Path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out-dir {out_dir} exists and is not a directory")
    check_writable_directory(out_dir)
    tissue = load_atlas(args.atlas_mm)
    parameters = GrowthParameters(DEMO_SEED_RAS_MM, DEMO_MU_D_MM, DEMO_MU_RHO)
    print(f"demo: bundled MNI ICBM152 atlas ({tissue.geometry.describe()}), simulating mu_D = {parameters.mu_d_mm} mm,"
          f" mu_rho = {parameters.mu_rho}, seed {parameters.seed_ras_mm} RAS mm", file=sys.stderr)
    concentration, runtime = _run_simulation(tissue, parameters, None, _check_device(args.device), args.quiet)
    summary = _summary(tissue, concentration, parameters, runtime)
    out_dir.mkdir(parents=True, exist_ok=True)
    concentration.save(out_dir / "infiltration.nii.gz")
    picture = save_concentration_figure(out_dir / "report.png", tissue, concentration,
                                        seed_ras_mm=parameters.seed_ras_mm, title=_title(parameters, summary))
    from .imageio import atomic_write_bytes

    atomic_write_bytes(out_dir / "parameters.json", (json.dumps(summary, indent=2) + "\n").encode())
    print(json.dumps(summary, indent=2))
    print(f"wrote {out_dir / 'infiltration.nii.gz'}, {picture}, {out_dir / 'parameters.json'}", file=sys.stderr)
    return 0


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

    demo = commands.add_parser("demo", help="simulate a typical tumor on the bundled atlas and draw it",
                               description="Simulate a mid-range tumor on the bundled MNI atlas; write "
                                           "infiltration.nii.gz, parameters.json and report.png.")
    demo.add_argument("--out-dir", default="demo_output", help="output folder (default: demo_output)")
    demo.add_argument("--atlas-mm", type=int, choices=(1, 2), default=2, help="atlas resolution (default: 2)")
    demo.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(handler=command_demo)
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
    except KeyboardInterrupt:
        print("tumor-personalization: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
