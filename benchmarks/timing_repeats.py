#!/usr/bin/env python
"""Is 'no case over 4 forward runs' a property of the default method or of one lucky run?

The inversion benchmark times every (case, method) once. On a shared 2-core machine one timing of a 3-5 s run can
be off by tens of percent, and the target is judged on the worst case, the one where a single noisy timing matters
most. This script takes the --top atlas cases whose default-method runs came closest to the target in
benchmarks/results/inversion_runs.jsonl.gz and times them again, --repeats rounds, both input kinds (concentration and
segmentation), exactly as the benchmark does (benchmarks/inversion.py: the same cases, the same Observation, the
same `personalize(..., device="cpu", options=InversionOptions())`, the yardstick `simulate(tissue, truth)` best of
two). Rounds are interleaved (round 1 of every case, then round 2, ...), so a slow spell of the machine falls on all
cases alike, and each round's ratio uses that round's own yardstick.

Two arms in every round, in alternating order: the library as it is (numpy's BLAS held to one thread during
`personalize`, pipeline.blas_single_threaded) and the same code with that limit switched off (what the benchmark's
rows before the limit measured). So the limit's effect is measured in one run, case by case, against the same
yardsticks.

It also checks determinism: every repeat must find the same answer (NCC against the hidden truth) as the committed
benchmark row did.

    python benchmarks/timing_repeats.py --top 5 --repeats 4    # about 20 minutes on 2 cores; needs the cores alone
    python benchmarks/timing_repeats.py --arms limited --out timing_repeats_hybrid4    # the shipped arm only

Writes benchmarks/results/timing_repeats.json and .png (or --out's name).
"""
import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from inversion import Cases, brain_of, is_current, latest_per_task, observation_of, read_runs  # noqa: E402

import TumorPersonalizationLib.pipeline as pipeline  # noqa: E402
from TumorPersonalizationLib.constants import DEFAULT_METHOD  # noqa: E402
from TumorPersonalizationLib.inversion import InversionOptions  # noqa: E402
from TumorPersonalizationLib.metrics import compare  # noqa: E402
from TumorPersonalizationLib.pipeline import personalize  # noqa: E402

KINDS = ("concentration", "segmentation")
# The two arms: "limited" is the library as shipped; "unlimited" switches pipeline.blas_single_threaded off.
ARMS = ("limited", "unlimited")
LIMITER = pipeline.blas_single_threaded
TARGET_FORWARD_RUNS = 4.0
OUT = ROOT / "benchmarks" / "results" / "timing_repeats"


def single_shots(seed: int):
    """{(case, kind): committed row} of the default method on the atlas (current rows only)."""
    rows = [r for r in read_runs() if r.get("seed", seed) == seed and is_current(r)]
    return {(r["case"], r["kind"]): r for r in latest_per_task(rows)
            if r["method"] == DEFAULT_METHOD and brain_of(r) == "atlas"}


def hardest_cases(shots, top: int):
    """The top cases by their worst single-shot ratio over the two input kinds."""
    worst = {}
    for (case, _), row in shots.items():
        worst[case] = max(worst.get(case, 0.0), row["runtime_in_forward_runs"])
    return sorted(worst, key=lambda case: -worst[case])[:top]


def summarise(records, shots, cases_run, arms=ARMS):
    per_task = []
    for case in cases_run:
        for kind in KINDS:
            shot = shots[(case, kind)]
            entry = {"case": case, "kind": kind, "single_shot_ratio": shot["runtime_in_forward_runs"],
                     "single_shot_runtime_s": shot["runtime_s"], "single_shot_forward_s": shot["forward_1mm_s"],
                     "ncc_committed": shot["metrics"]["ncc"]}
            for arm in arms:
                mine = [r for r in records if r["case"] == case and r["kind"] == kind and r["arm"] == arm]
                ratios = [r["ratio"] for r in mine]
                entry[arm] = {
                    "repeats": len(mine), "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
                    "ratio_max": max(ratios), "runtime_median_s": statistics.median(r["runtime_s"] for r in mine),
                    "forward_median_s": statistics.median(r["forward_1mm_s"] for r in mine),
                    "rounds_over_target": sum(x > TARGET_FORWARD_RUNS for x in ratios),
                    "ncc_max_deviation": max(abs(r["ncc"] - shot["metrics"]["ncc"]) for r in mine),
                    "evaluations": sorted({r["evaluations"] for r in mine})}
            if set(ARMS) <= set(arms):
                entry["runtime_unlimited_over_limited"] = (entry["unlimited"]["runtime_median_s"]
                                                           / entry["limited"]["runtime_median_s"])
            per_task.append(entry)
    return per_task


def plot(per_task, records, path, arms=ARMS, every_case=False):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Wide enough that 100 (case, kind) columns stay legible when every case is timed.
    figure, axis = plt.subplots(figsize=(max(12.0, 0.22 * len(per_task)), 5))
    labels = []
    colours = {"limited": "tab:blue", "unlimited": "tab:orange"}
    names = {"limited": "BLAS held to 1 thread (shipped)", "unlimited": "BLAS threads unlimited (before)"}
    for x, entry in enumerate(per_task):
        for offset, arm in zip((-0.17, 0.17) if len(arms) > 1 else (0.17,), arms):
            ratios = [r["ratio"] for r in records
                      if r["case"] == entry["case"] and r["kind"] == entry["kind"] and r["arm"] == arm]
            axis.scatter(np.full(len(ratios), x + offset), ratios, s=18, color=colours[arm], alpha=0.7,
                         label=names[arm] if x == 0 else None)
            axis.plot([x + offset - 0.14, x + offset + 0.14], [entry[arm]["ratio_median"]] * 2, "k-", linewidth=1.5,
                      label="median of repeats" if x == 0 and arm == arms[0] else None)
        axis.scatter([x], [entry["single_shot_ratio"]], marker="x", s=60, color="tab:red",
                     label="the benchmark's single shot" if x == 0 else None)
        labels.append(f"case {entry['case']}\n{'seg.' if entry['kind'] == 'segmentation' else 'conc.'}")
    axis.axhline(TARGET_FORWARD_RUNS, color="grey", linestyle="--", label="target: 4 forward runs")
    axis.set_xticks(range(len(per_task)))
    if len(per_task) <= 20:
        axis.set_xticklabels(labels, fontsize=8)
    else:  # one line per column, upright, so 100 of them do not overlap
        axis.set_xticklabels([label.replace("\n", " ") for label in labels], fontsize=6, rotation=90)
    axis.set_ylabel("wall time / one 1 mm forward run")
    which = "every atlas case" if every_case else "the atlas cases closest to the target"
    axis.set_title(f"{DEFAULT_METHOD}: {which}, timed again in {len(records) // max(1, len(per_task) * len(arms))} "
                   "interleaved rounds")
    axis.legend(loc="upper right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--top", type=int, default=5, help="how many of the slowest cases (by single-shot ratio)")
    parser.add_argument("--repeats", type=int, default=4, help="timed rounds per case and input kind")
    parser.add_argument("--seed", type=int, default=2026, help="the inversion benchmark's case stream")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated arms to time (default both)")
    parser.add_argument("--out", default=OUT.name, help="output name under benchmarks/results/ (.json and .png)")
    args = parser.parse_args()
    arms = tuple(a for a in args.arms.split(",") if a)
    if not arms or set(arms) - set(ARMS):
        parser.error(f"--arms: choose from {', '.join(ARMS)}")
    out = OUT.with_name(args.out)
    import torch

    shots = single_shots(args.seed)
    if not shots:
        raise SystemExit(f"no current {DEFAULT_METHOD} rows in benchmarks/results/inversion_runs.jsonl.gz: run "
                         "benchmarks/inversion.py first")
    cases_run = hardest_cases(shots, args.top)
    missing = [(c, k) for c in cases_run for k in KINDS if (c, k) not in shots]
    if missing:
        raise SystemExit(f"no committed single shot for {missing}: run benchmarks/inversion.py first")
    cases = Cases(args.seed, "atlas")
    observations = {(c, k): observation_of(cases.tissue_of(c), cases.get(c)[1], k)
                    for c in cases_run for k in KINDS}  # untimed
    # Warm-up (untimed): loads the networks and the first operator, as the benchmark's run had before its rows.
    personalize(cases.tissue_of(cases_run[0]), observations[(cases_run[0], KINDS[0])], method=DEFAULT_METHOD,
                device="cpu", options=InversionOptions())
    records = []
    for round_index in range(args.repeats):
        for case in cases_run:
            today = cases.get(case)[1]
            tissue = cases.tissue_of(case)
            # The benchmark's yardstick: simulate(tissue, truth) at 1 mm, best of two, in this round.
            forward = cases.forward_seconds(case)["forward_1mm_s"]
            for kind in KINDS:
                # Alternate which arm goes first, so neither always runs on a machine the other just warmed.
                for arm in arms if (round_index + KINDS.index(kind)) % 2 == 0 else arms[::-1]:
                    pipeline.blas_single_threaded = LIMITER if arm == "limited" else contextlib.nullcontext
                    load_before = os.getloadavg()[0]
                    result = personalize(tissue, observations[(case, kind)], method=DEFAULT_METHOD, device="cpu",
                                         options=InversionOptions())
                    pipeline.blas_single_threaded = LIMITER
                    record = {"round": round_index, "case": case, "kind": kind, "arm": arm,
                              "runtime_s": result.runtime_s, "forward_1mm_s": forward,
                              "ratio": result.runtime_s / forward, "evaluations": len(result.history),
                              "winner": result.provenance["winner"],
                              "ncc": compare(result.concentration.array, today, tissue.brain_mask)["ncc"],
                              "loadavg_before": load_before, "loadavg_after": os.getloadavg()[0]}
                    records.append(record)
                    print(f"round {round_index} case {case} {kind} {arm}: {record['runtime_s']:.2f} s / "
                          f"{forward:.2f} s = {record['ratio']:.2f} forward runs (load "
                          f"{record['loadavg_after']:.1f})", flush=True)
    per_task = summarise(records, shots, cases_run, arms)
    output = {"method": DEFAULT_METHOD, "seed": args.seed, "repeats": args.repeats, "cases": cases_run,
              "target_forward_runs": TARGET_FORWARD_RUNS, "threads": torch.get_num_threads(),
              "machine": f"{os.cpu_count()} CPU cores (this project's 2-core dev machine unless stated)",
              "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "method_revision": shots[(cases_run[0], KINDS[0])].get("method_revision", 1), "arms": list(arms),
              "worst_median_ratio": {arm: max(e[arm]["ratio_median"] for e in per_task) for arm in arms},
              "worst_single_round_ratio": {arm: max(e[arm]["ratio_max"] for e in per_task) for arm in arms},
              "rounds_over_target": {arm: sum(e[arm]["rounds_over_target"] for e in per_task) for arm in arms},
              "rounds_per_arm": sum(e[arms[0]]["repeats"] for e in per_task),
              "ncc_max_deviation": max(e[arm]["ncc_max_deviation"] for e in per_task for arm in arms),
              "per_task": per_task, "records": records}
    if "runtime_unlimited_over_limited" in per_task[0]:
        output["runtime_unlimited_over_limited_median"] = statistics.median(
            e["runtime_unlimited_over_limited"] for e in per_task)
    out.with_suffix(".json").write_text(json.dumps(output, indent=1))
    plot(per_task, records, out.with_suffix(".png"), arms, every_case=len(cases_run) == len({c for c, _ in shots}))
    for e in per_task:
        print(f"case {e['case']} {e['kind']}: " + "; ".join(
            f"{arm} median {e[arm]['ratio_median']:.2f} (min {e[arm]['ratio_min']:.2f}, max "
            f"{e[arm]['ratio_max']:.2f})" for arm in arms)
            + f"; single shot {e['single_shot_ratio']:.2f}")
    print(f"worst median {output['worst_median_ratio']}; rounds over {TARGET_FORWARD_RUNS:g}: "
          f"{output['rounds_over_target']} of {output['rounds_per_arm']} per arm; NCC deviation "
          f"{output['ncc_max_deviation']:.1e}")


if __name__ == "__main__":
    main()
