#!/usr/bin/env python
"""Personalisation on synthetic patients whose brains are not the bundled atlas, each tumor given as a BraTS
segmentation, with each of five tissue inputs (benchmarks/patient_inputs.py): the healthy tissue (the reference), a
segmentation tool's labels of the tumor-bearing brain (core as CSF, oedema as GM), the same with the core cut out,
registration-warped probability maps, and a T1 alone.

Patients: the inversion benchmark's held-out cases on other brains (benchmarks/inversion.py, Cases): "shifted"
brains (the atlas deformed beyond the training range by the shifted test set's recipe, half re-acquired on an
oblique 0.9 x 0.9 x 3 mm grid) and nipype's template brain (the testbrain extra), each with hidden true parameters,
the truth grown by the project's FD solver (steps / 4) and the same tumor grown on to 1.5x its age (the later
growth). Every input is made on the patient's own grid from the case's healthy tissue and its segmentation (core
0.675, oedema 0.25 of the truth), from its own random stream.

Arms: the tissue inputs run with each --arms value as `personalize(..., lesion_tissue=ARM)` ("atlas": the lesion
refilled from the registered atlas, the library's default; "keep": the input as given); the T1 runs as
`personalize(None, observation, t1=T1)` (arm "t1"). Where this library's `personalize` has no `lesion_tissue`
(or `t1`) argument, the arms that need it are recorded "not available" and tried again on the next run; "keep" then
runs without the argument (the library's behaviour before the option, which keeps the given tissue).

Per (patient, input, arm), one JSON row (resumable: rows already in --rows with status ok or refused are skipped):
NCC and the other metrics against the hidden truth inside the healthy brain (WM+GM >= 0.1), seed error (mm), relative
errors of mu_D and mu_rho, runtime (result.runtime_s: refill or T1 registration included), the 1-minute load average,
warnings, and the share of the later growth covered at equal volume by the model plan, the 15 mm margin plan and
the blurred-label plan, all three on the healthy brain (the same standard and blurred plans for every input of a
patient, so differences between inputs are the model's). An input the library refuses (InputError) is a row with
status "refused" and its message.

    python benchmarks/patients.py --shifted-cases 20 --nipype-cases 10          # run (resumes), then report
    python benchmarks/patients.py --report-only                                 # md/json/png from the rows
    python benchmarks/patients.py --limit 3 --inputs healthy,labels,core-cut,warped --rows R.jsonl --out-prefix P
"""
import argparse
import inspect
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from inversion import LATER_AGE_FACTOR, Cases, observation_of, segmentation_of  # noqa: E402
from patient_inputs import INPUT_TITLES, INPUTS, core_and_edema, make_input  # noqa: E402

from TumorPersonalizationLib.constants import EDEMA_THRESHOLD  # noqa: E402
from TumorPersonalizationLib.errors import InputError  # noqa: E402
from TumorPersonalizationLib.geometry import Volume, resample_linear  # noqa: E402
from TumorPersonalizationLib.metrics import compare  # noqa: E402
from TumorPersonalizationLib.pipeline import personalize  # noqa: E402
from TumorPersonalizationLib.plans import coverage, later_growth_coverage, make_plans  # noqa: E402
from TumorPersonalizationLib.tissue import Tissue  # noqa: E402

ROWS = ROOT / "benchmarks" / "results" / "patients_rows.jsonl"
OUT_PREFIX = ROOT / "benchmarks" / "results" / "patients"
ARMS = ("keep", "atlas")
T1_ARM = "t1"
# The input streams of a patient (seed, brain, case, INPUT_STREAM, input): apart from its brain's and its tumor's.
INPUT_STREAM = 12
BRAIN_STREAM = {"shifted": 0, "nipype": 1}
# Targets the report checks per (input, arm).
NCC_TOLERANCE = 0.03
RUNTIME_TARGET_S = {"tissue": 45.0, "t1": 90.0}
CLEAN_LOAD = 2.5
DONE_STATUSES = ("ok", "refused")
RUN_ID = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def capabilities() -> dict:
    """Which patient-input options this library's `personalize` takes."""
    parameters = inspect.signature(personalize).parameters
    return {"lesion_tissue": "lesion_tissue" in parameters, "t1": "t1" in parameters}


def patients(shifted: int, nipype: int, limit: int = None):
    """(brain, case index) in the order they run: the two brains interleaved in proportion, so a --limit (or a run
    that stops early) still has both."""
    order, taken = [], {"shifted": 0, "nipype": 0}
    counts = {"shifted": shifted, "nipype": nipype}
    while any(taken[b] < counts[b] for b in counts):
        brain = min((b for b in counts if taken[b] < counts[b]), key=lambda b: (taken[b] + 0.5) / counts[b])
        order.append((brain, taken[brain]))
        taken[brain] += 1
    return order[:limit] if limit is not None else order


def tasks_of(inputs, arms):
    """(input, arm) pairs in report order."""
    return [(name, T1_ARM) if name == "t1" else (name, arm) for name in inputs
            for arm in ((T1_ARM,) if name == "t1" else arms)]


def row_key(row):
    return row["brain"], row["case"], row["input"], row["arm"]


def read_rows(path: Path):
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def latest(rows):
    out = {}
    for row in rows:
        out[row_key(row)] = row
    return list(out.values())


# ---- one task ----------------------------------------------------------------------------------------------------
def tissue_of_input(name: str, made):
    """The Tissue a user would build from the input (InputError if the library refuses it)."""
    if name == "healthy":
        return made
    if name in ("labels", "core-cut"):
        return Tissue.from_labelmap(made)
    if name == "warped":
        return Tissue.from_probabilities(made["wm"], made["gm"], made["csf"])
    raise ValueError(name)


def patient_input(cases: Cases, index: int, seed: int, name: str, healthy: Tissue, segmentation: np.ndarray):
    """Patient `index`'s named input (patient_inputs.make_input) from its own random stream: the input every
    benchmark that names this patient sees."""
    rng = np.random.default_rng([seed, BRAIN_STREAM[cases.brain_kind], index, INPUT_STREAM, INPUTS.index(name)])
    return make_input(name, healthy, segmentation, rng)


def run_one(cases: Cases, index: int, seed: int, name: str, arm: str, caps: dict) -> dict:
    import torch

    truth, today, later, info = cases.get(index)
    healthy = cases.tissue_of(index)
    segmentation = segmentation_of(today)
    core, _ = core_and_edema(segmentation)
    visible = segmentation > 0
    observation = observation_of(healthy, today, "segmentation")
    row = {"brain": cases.brain_kind, "case": index, "input": name, "arm": arm, "seed": seed, "run_id": RUN_ID,
           "truth": info, "lesion_tissue_option": caps["lesion_tissue"], "t1_option": caps["t1"]}
    needs = "t1" if arm == T1_ARM else ("lesion_tissue" if arm != "keep" else None)
    if needs and not caps[needs]:
        return {**row, "status": "not available",
                "message": f"personalize has no {needs!r} argument in this library"}
    made = patient_input(cases, index, seed, name, healthy, segmentation)
    load_before = os.getloadavg()[0]
    try:
        if name == "t1":
            result = personalize(None, observation, method=None, device="cpu", t1=made)
        else:
            tissue = tissue_of_input(name, made)
            extra = {"lesion_tissue": arm} if caps["lesion_tissue"] else {}
            result = personalize(tissue, observation, method=None, device="cpu", **extra)
    except InputError as error:
        return {**row, "status": "refused", "message": str(error), "loadavg_before": load_before}
    load_after = os.getloadavg()[0]
    concentration = result.concentration
    if not concentration.geometry.same_grid(healthy.geometry):
        concentration = Volume(resample_linear(concentration.array, concentration.geometry, healthy.geometry),
                               healthy.geometry)
    c = np.asarray(concentration.array, np.float32)
    p = result.parameters
    # Plans on the healthy brain from this run's concentration: the 15 mm and blurred-label plans are then the same
    # for every input of the patient, and the comparison between inputs is the model's alone.
    plans = make_plans(healthy, c, core, visible)
    growth = (later >= EDEMA_THRESHOLD) & (today < EDEMA_THRESHOLD)
    covered = later_growth_coverage(healthy, plans, growth, visible, core, today)
    own_plan = None
    if result.plans.model is not None and result.plans.model.shape == growth.shape and \
            result.plans.geometry.same_grid(healthy.geometry):
        own_plan = coverage(result.plans.model > 0, growth & healthy.brain_mask)
    return {**row, "status": "ok", "metrics": compare(c, today, healthy.brain_mask),
            "found": p.to_dict(),
            "seed_error_mm": float(np.linalg.norm(np.subtract(p.seed_ras_mm, truth.seed_ras_mm))),
            "mu_d_relative_error": abs(p.mu_d_mm - truth.mu_d_mm) / truth.mu_d_mm,
            "mu_rho_relative_error": abs(p.mu_rho - truth.mu_rho) / truth.mu_rho,
            "runtime_s": result.runtime_s, "loadavg_before": load_before, "loadavg_after": load_after,
            "threads": torch.get_num_threads(), "warnings": list(result.warnings), "method": result.method,
            "coverage_model": covered["model"], "coverage_standard": covered["standard"],
            "coverage_blur": covered["blurred_labels"], "coverage_truth": covered["true_parameters"],
            "coverage_model_own_plan": own_plan, "plan_cm3": plans.volumes_cm3["standard_cm3"]}


# ---- report ------------------------------------------------------------------------------------------------------
def _mean_se(values):
    values = np.asarray([v for v in values if v is not None and not math.isnan(v)], np.float64)
    if len(values) == 0:
        return None
    se = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")
    return {"mean": float(values.mean()), "standard_error": se, "n": int(len(values))}


def summarise_rows(rows, inputs, arms):
    """Per (input, arm): counts by status, NCC (mean, 5th percentile), seed error, runtime, coverage leads, targets."""
    rows = latest(rows)
    by_group = {}
    for row in rows:
        by_group.setdefault((row["input"], row["arm"]), []).append(row)
    ok = lambda group: [r for r in by_group.get(group, []) if r["status"] == "ok"]  # noqa: E731
    reference_group = ("healthy", "keep") if ok(("healthy", "keep")) else next(
        ((n, a) for n, a in tasks_of(("healthy",), arms) if ok((n, a))), None)
    reference = {(r["brain"], r["case"]): r["metrics"]["ncc"] for r in ok(reference_group)} if reference_group else {}
    groups = {}
    for name, arm in tasks_of(inputs, arms):
        group_rows = by_group.get((name, arm), [])
        done = ok((name, arm))
        entry = {"input": name, "arm": arm, "title": INPUT_TITLES[name],
                 "rows": {s: int(sum(r["status"] == s for r in group_rows))
                          for s in ("ok", "refused", "not available", "error")}}
        messages = sorted({r.get("message", "") for r in group_rows if r["status"] != "ok"})
        if messages:
            entry["messages"] = messages[:3]
        if done:
            ncc = np.array([r["metrics"]["ncc"] for r in done])
            entry["ncc_mean"] = float(ncc.mean())
            entry["ncc_worst_5_percent"] = float(np.percentile(ncc, 5))
            entry["ncc_min"] = float(ncc.min())
            entry["seed_error_mm_mean"] = float(np.mean([r["seed_error_mm"] for r in done]))
            runtimes = [r["runtime_s"] for r in done]
            entry["runtime_s_median"] = float(np.median(runtimes))
            entry["runtime_s_max"] = float(np.max(runtimes))
            entry["timed_under_load_above_2_5"] = int(sum(r["loadavg_after"] >= CLEAN_LOAD for r in done))
            entry["threads"] = sorted({r["threads"] for r in done})
            paired = [r["metrics"]["ncc"] - reference[(r["brain"], r["case"])] for r in done
                      if (r["brain"], r["case"]) in reference]
            entry["ncc_minus_reference"] = _mean_se(paired)
            for other, key in (("standard", "lead_over_15mm"), ("blur", "lead_over_blurred_labels")):
                entry[key] = _mean_se([r["coverage_model"] - r[f"coverage_{other}"] for r in done])
            entry["coverage_model"] = _mean_se([r["coverage_model"] for r in done])
            entry["coverage_model_own_plan"] = _mean_se([r.get("coverage_model_own_plan") for r in done])
            entry["warned_cases"] = int(sum(bool(r["warnings"]) for r in done))
        entry["targets"] = targets_of(entry)
        groups[f"{name}/{arm}"] = entry
    return {"reference": "/".join(reference_group) if reference_group else None, "groups": groups,
            "patients": sorted({(r["brain"], r["case"]) for r in rows}),
            "brains": {b: int(len({r["case"] for r in rows if r["brain"] == b})) for b in ("shifted", "nipype")}}


def targets_of(entry) -> dict:
    """Pass (True) / fail (False) / None (no result) per target. A refused input fails every target it refused."""
    if "ncc_mean" not in entry:
        refused = entry["rows"]["refused"] > 0
        return {k: (False if refused else None) for k in ("ncc_within_0.03", "lead_over_blur_positive", "runtime")}
    refused = entry["rows"]["refused"] > 0
    diff, lead = entry.get("ncc_minus_reference"), entry.get("lead_over_blurred_labels")
    limit = RUNTIME_TARGET_S["t1" if entry["arm"] == T1_ARM else "tissue"]
    return {"ncc_within_0.03": None if diff is None else bool(diff["mean"] >= -NCC_TOLERANCE and not refused),
            "lead_over_blur_positive": None if lead is None else bool(lead["mean"] > 0 and not refused),
            "runtime": bool(entry["runtime_s_median"] <= limit)}


def _fmt(entry, key, digits=3):
    value = entry.get(key)
    if value is None:
        return "-"
    if isinstance(value, dict):
        se = value["standard_error"]
        mean = f"{value['mean']:+.{digits}f}"
        return mean if math.isnan(se) else f"{mean} ± {se:.{digits}f}"
    return f"{value:.{digits}f}"


def _mark(flag):
    return {True: "pass", False: "**fail**", None: "-"}[flag]


def write_markdown(summary, path: Path, title_note: str = ""):
    lines = [f"# Personalisation on patients' inputs{title_note}", "",
             f"Patients: {summary['brains']['shifted']} on shifted brains, {summary['brains']['nipype']} on nipype's "
             "template brain; tumors given as BraTS segmentations (core >= 0.675, oedema >= 0.25 of the hidden "
             f"truth); default method; 2-core CPU, torch threads {summary['threads']}. NCC against the truth inside "
             "the healthy brain (WM+GM >= 0.1); "
             "coverage: share of the later growth (the same tumor at 1.5x its age) inside each plan at the 15 mm "
             "plan's volume, all plans on the healthy brain; leads are paired differences, mean ± standard error.",
             "", f"Reference: `{summary['reference']}`. Targets: mean NCC within {NCC_TOLERANCE} of the reference "
             f"(paired, same patients); model plan's lead over the blurred labels > 0; median runtime <= "
             f"{RUNTIME_TARGET_S['tissue']:.0f} s from tissue, <= {RUNTIME_TARGET_S['t1']:.0f} s from a T1.", "",
             "| input | arm | ok / refused / n.a. | mean NCC | worst 5 % NCC | NCC - ref | seed err (mm) | "
             "median s | model - 15 mm | model - blur | NCC target | blur target | time target |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for entry in summary["groups"].values():
        counts = entry["rows"]
        status = f"{counts['ok']} / {counts['refused']} / {counts['not available']}"
        t = entry["targets"]
        ncc = _fmt(entry, 'ncc_mean') if counts["ok"] else ("refused" if counts["refused"] else
                                                            "not available" if counts["not available"] else "-")
        lines.append(f"| {entry['title']} | {entry['arm']} | {status} | {ncc} | "
                     f"{_fmt(entry, 'ncc_worst_5_percent')} | {_fmt(entry, 'ncc_minus_reference')} | "
                     f"{_fmt(entry, 'seed_error_mm_mean', 1)} | {_fmt(entry, 'runtime_s_median', 1)} | "
                     f"{_fmt(entry, 'lead_over_15mm')} | {_fmt(entry, 'lead_over_blurred_labels')} | "
                     f"{_mark(t['ncc_within_0.03'])} | {_mark(t['lead_over_blur_positive'])} | {_mark(t['runtime'])} |")
    notes = [f"- `{key}`: {entry['rows']['refused']} refused, {entry['rows']['not available']} not available: "
             f"{'; '.join(entry['messages'])}" for key, entry in summary["groups"].items() if entry.get("messages")]
    loaded = [f"`{key}` ({entry['timed_under_load_above_2_5']})" for key, entry in summary["groups"].items()
              if entry.get("timed_under_load_above_2_5")]
    if notes:
        lines += ["", "Not run or refused:", ""] + notes
    if loaded:
        lines += ["", "Runs timed while the 1-minute load average was >= 2.5 (the cores shared; their times are "
                      "upper bounds): " + ", ".join(loaded) + "."]
    lines += ["", "Arms: `keep` the tissue as given (before the lesion option: the library's only behaviour), `atlas` "
                  "the lesion refilled from the registered atlas (the default), `t1` tissue derived from the T1. "
                  "A refused input fails the targets it could not reach. Made by benchmarks/patients.py from its "
                  "rows file; the inputs by benchmarks/patient_inputs.py.", ""]
    path.write_text("\n".join(lines))


def plot(rows, summary, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in latest(rows) if r["status"] == "ok"]
    keys = list(summary["groups"])
    labels = [f"{summary['groups'][k]['title']}\n[{summary['groups'][k]['arm']}]" for k in keys]
    figure, axes = plt.subplots(1, 2, figsize=(13, 0.55 * len(keys) + 2.2), sharey=True)
    rng = np.random.default_rng(0)
    for position, key in enumerate(keys):
        entry = summary["groups"][key]
        mine = [r for r in rows if f"{r['input']}/{r['arm']}" == key]
        if not mine:
            counts = entry["rows"]
            text = "refused" if counts["refused"] else ("not available" if counts["not available"] else "no rows")
            for axis in axes:
                axis.text(0.5, position, text, transform=axis.get_yaxis_transform(), ha="center", va="center",
                          color="grey", fontsize=9)
            continue
        ncc = np.array([r["metrics"]["ncc"] for r in mine])
        try:  # matplotlib >= 3.10 names the orientation; older ones take vert
            axes[0].boxplot(ncc, positions=[position], orientation="horizontal", widths=0.5, showfliers=False)
        except TypeError:
            axes[0].boxplot(ncc, positions=[position], vert=False, widths=0.5, showfliers=False)
        axes[0].scatter(ncc, position + rng.uniform(-0.18, 0.18, len(ncc)), s=14, alpha=0.7,
                        c=["tab:blue" if r["brain"] == "shifted" else "tab:orange" for r in mine])
        for offset, (other, color) in enumerate((("standard", "tab:green"), ("blur", "tab:purple"))):
            lead = np.array([r["coverage_model"] - r[f"coverage_{other}"] for r in mine])
            y = position + (offset - 0.5) * 0.35
            axes[1].scatter(lead, y + rng.uniform(-0.06, 0.06, len(lead)), s=10, alpha=0.45, color=color)
            se = lead.std(ddof=1) / math.sqrt(len(lead)) if len(lead) > 1 else 0.0
            axes[1].errorbar([lead.mean()], [y], xerr=[se], fmt="D", color=color, markersize=6, capsize=4,
                             label=("model - 15 mm" if other == "standard" else "model - blurred labels")
                             if position == 0 else None)
    reference = summary["groups"].get(summary["reference"] or "", {}).get("ncc_mean")
    if reference is not None:
        axes[0].axvline(reference - NCC_TOLERANCE, color="red", linestyle=":", linewidth=1,
                        label=f"reference mean - {NCC_TOLERANCE}")
        axes[0].legend(fontsize=8, loc="lower left")
    axes[0].set_yticks(range(len(keys)))
    axes[0].set_yticklabels(labels, fontsize=8)
    axes[0].set_ylim(len(keys) - 0.4, -0.6)  # first input on top
    axes[0].set_xlabel("NCC vs hidden truth (healthy brain)\nblue: shifted brains, orange: nipype's brain")
    axes[0].set_title("NCC per patient", fontsize=10)
    axes[1].axvline(0, color="black", linewidth=0.8)
    axes[1].set_xlabel("share of later growth covered:\nmodel plan minus the other plan (equal volume)")
    axes[1].set_title("coverage lead (mean ± SE, points per patient)", fontsize=10)
    axes[1].legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def report(rows_path: Path, out_prefix: Path, inputs, arms, title_note=""):
    import torch

    rows = read_rows(rows_path)
    summary = summarise_rows(rows, inputs, arms)
    summary["threads"] = sorted({r["threads"] for r in latest(rows) if "threads" in r})
    inside = ROOT in rows_path.parents
    summary.update({"rows_file": str(rows_path.relative_to(ROOT) if inside else rows_path),
                    "torch": torch.__version__, "machine": "2-core CPU (development machine)",
                    "later_age_factor": LATER_AGE_FACTOR})
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out_prefix}.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_markdown(summary, Path(f"{out_prefix}.md"), title_note)
    plot(rows, summary, Path(f"{out_prefix}.png"))
    print(f"wrote {out_prefix}.{{json,md,png}} from {len(latest(rows))} rows", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shifted-cases", type=int, default=20)
    parser.add_argument("--nipype-cases", type=int, default=10, help="needs the testbrain extra (nipype)")
    parser.add_argument("--limit", type=int, help="run only the first LIMIT patients (brains interleaved)")
    parser.add_argument("--seed", type=int, default=2026, help="the inversion benchmark's case stream (its other "
                                                                 "brains' cases)")
    parser.add_argument("--inputs", default=",".join(INPUTS), help=f"comma-separated, of {', '.join(INPUTS)}")
    parser.add_argument("--arms", default=",".join(ARMS), help="lesion_tissue values for the tissue inputs "
                                                               "(keep, atlas, surround)")
    parser.add_argument("--rows", type=Path, default=ROWS, help="the rows file (one JSON line per patient, input "
                                                                "and arm; resumed)")
    parser.add_argument("--out-prefix", type=Path, default=OUT_PREFIX, help="writes PREFIX.{md,json,png}")
    parser.add_argument("--hours", type=float, default=24.0, help="stop starting new patients after this long")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    inputs = [n for n in args.inputs.split(",") if n]
    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(inputs) - set(INPUTS))
    if unknown:
        parser.error(f"--inputs: unknown {', '.join(unknown)}")
    rows_path, out_prefix = args.rows.resolve(), args.out_prefix.resolve()
    note = " (trial)" if "trial" in out_prefix.name else ""
    if args.report_only:
        report(rows_path, out_prefix, inputs, arms, note)
        return
    caps = capabilities()
    print(f"personalize takes lesion_tissue: {caps['lesion_tissue']}, t1: {caps['t1']}", flush=True)
    done = {row_key(r) for r in read_rows(rows_path) if r["status"] in DONE_STATUSES and r.get("seed") == args.seed}
    rows_path.parent.mkdir(parents=True, exist_ok=True)
    cases = {}
    started = time.perf_counter()
    for brain, index in patients(args.shifted_cases, args.nipype_cases, args.limit):
        if time.perf_counter() - started > args.hours * 3600:
            print("time budget reached; run again to resume", flush=True)
            break
        todo = [(n, a) for n, a in tasks_of(inputs, arms) if (brain, index, n, a) not in done]
        if not todo:
            continue
        if brain not in cases:
            cases[brain] = Cases(args.seed, brain)
        patient_started = time.perf_counter()
        cases[brain].get(index)  # grown (untimed) before the timed runs
        for name, arm in todo:
            try:
                row = run_one(cases[brain], index, args.seed, name, arm, caps)
            except Exception as error:  # a failure of one input is a row, not the end of the benchmark
                row = {"brain": brain, "case": index, "input": name, "arm": arm, "seed": args.seed,
                       "run_id": RUN_ID, "status": "error", "message": f"{type(error).__name__}: {error}"}
            with open(rows_path, "a") as stream:
                stream.write(json.dumps(row) + "\n")
            if row["status"] == "ok":
                print(f"{brain} {index} {name}/{arm}: NCC {row['metrics']['ncc']:.3f}, seed {row['seed_error_mm']:.1f}"
                      f" mm, {row['runtime_s']:.1f} s (load {row['loadavg_after']:.1f}), coverage model "
                      f"{row['coverage_model']:.3f} / 15 mm {row['coverage_standard']:.3f} / blur "
                      f"{row['coverage_blur']:.3f}", flush=True)
            else:
                print(f"{brain} {index} {name}/{arm}: {row['status']}: {row.get('message', '')}", flush=True)
        print(f"patient {brain} {index}: {time.perf_counter() - patient_started:.0f} s wall (inputs made, runs, "
              f"scoring)", flush=True)
    report(rows_path, out_prefix, inputs, arms, note)


if __name__ == "__main__":
    main()
