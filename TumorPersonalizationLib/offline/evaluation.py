"""Summaries of per-case metrics, shared by training, the benchmarks and the inversion's evaluation (run-time code
never imports training or dataset generation, so what both need lives here)."""
import math
from typing import Dict, Iterable, List, Mapping

import numpy as np


def summarise(rows: List[Mapping[str, float]], worst_is_low: Iterable[str]) -> Dict:
    """Mean, standard error, median and the mean of the worst 5 % of every metric over cases.

    rows: one dict of metrics per case; worst_is_low: the metrics for which low values are the bad ones (NCC);
    for the others (errors) the worst 5 % are the highest values.
    """
    worst_is_low = set(worst_is_low)
    out = {"samples": len(rows)}
    for key in rows[0]:
        values = np.asarray([r[key] for r in rows])
        worst = np.sort(values)[: max(1, len(values) // 20)] if key in worst_is_low else \
            np.sort(values)[-max(1, len(values) // 20):]
        out[key] = {"mean": float(values.mean()), "standard_error": float(values.std(ddof=1) / math.sqrt(len(values)))
                    if len(values) > 1 else 0.0, "median": float(np.median(values)),
                    "worst_5_percent_mean": float(worst.mean())}
    return out
