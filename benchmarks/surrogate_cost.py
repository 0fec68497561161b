#!/usr/bin/env python
"""Cost of candidate surrogate designs on this CPU, measured before choosing one (the aim: train within ~2 h).

For each design: parameters, one training step (forward + backward + AdamW) per sample at batch 8, and inference
for one case and for a batch of 8; plus the direct inverse network. Writes benchmarks/results/surrogate_cost.json/.png.

    python benchmarks/surrogate_cost.py                    # every design (about 10 minutes)
    python benchmarks/surrogate_cost.py --only 8-16-48-128 # re-measure the matching designs, keep the other rows
"""
import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from TumorPersonalizationLib.inverse_net import InverseConfig, InverseNet  # noqa: E402
from TumorPersonalizationLib.surrogate import SurrogateConfig, SurrogateUNet  # noqa: E402

CANDIDATES = [
    ("ConvNeXt k3, widths 16-32-64-96, 32^3", SurrogateConfig(grid=32)),
    ("ConvNeXt k3, widths 8-16-32-64, 32^3", SurrogateConfig(grid=32, widths=(8, 16, 32, 64))),
    # The bundled design: the coarse levels are nearly free, so they get the width and the blocks after the
    # parameter injection, where the parameters have to be turned into a tumor size.
    ("ConvNeXt k3, widths 8-16-48-128, 3 bottleneck blocks, 32^3",
     SurrogateConfig(grid=32, widths=(8, 16, 48, 128), bottleneck_blocks=3)),
    ("ConvNeXt k5, widths 16-32-64-96, 32^3", SurrogateConfig(grid=32, kernel_size=5)),
    ("ConvNeXt k7, widths 16-32-64-96, 32^3", SurrogateConfig(grid=32, kernel_size=7)),
    ("ConvNeXt k3, widths 16-32-64-96, 48^3", SurrogateConfig(grid=48, widths=(16, 32, 64, 96))),
    ("ConvNeXt k3, widths 16-32-64-96, 64^3", SurrogateConfig(grid=64)),
]


def time_it(function, repeats=3):
    function()
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - started) / repeats


def measure(model, make_inputs, batch=8, repeats=2):
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    inputs, target = make_inputs(batch)

    def step():
        optimiser.zero_grad()
        loss = ((model(*inputs) - target) ** 2).mean()
        loss.backward()
        optimiser.step()

    train_s = time_it(step, repeats=repeats) / batch
    model.eval()
    with torch.no_grad():
        one, _ = make_inputs(1)
        infer1 = time_it(lambda: model(*one))
        infer8 = time_it(lambda: model(*inputs))
    return {"parameters": sum(p.numel() for p in model.parameters()), "train_step_s_per_sample": train_s,
            "inference_s_one": infer1, "inference_s_batch8": infer8}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="measure only designs whose name contains this; keep the stored other rows")
    args = parser.parse_args()
    torch.manual_seed(0)
    out = ROOT / "benchmarks" / "results" / "surrogate_cost.json"
    stored = {r["design"]: r for r in json.loads(out.read_text())["designs"]} if args.only and out.exists() else {}
    rows = []
    inverse_name = "inverse ConvNeXt k3, widths 16-32-64-96, 32^3"
    for name, config in CANDIDATES:
        if args.only and args.only not in name and name in stored:
            rows.append(stored[name])
            continue
        g = config.grid

        def make(batch, g=g):
            return (torch.rand(batch, 3, g, g, g), torch.rand(batch, 5)), torch.rand(batch, g, g, g)

        # Large designs: a smaller batch and one timed step (the cost per sample barely depends on the batch).
        large = config.grid > 32 or config.kernel_size > 5
        row = {"design": name, "kind": "surrogate", "config": config.to_dict(), "batch": 2 if large else 8,
               **measure(SurrogateUNet(config), make, batch=2 if large else 8, repeats=1 if large else 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    config = InverseConfig(grid=32)

    def make_inverse(batch):
        return (torch.rand(batch, 3, 32, 32, 32), torch.rand(batch, 32, 32, 32)), torch.rand(batch, 5)

    if args.only and args.only not in inverse_name and inverse_name in stored:
        rows.append(stored[inverse_name])
    else:
        row = {"design": inverse_name, "kind": "inverse", "config": config.to_dict(),
               **measure(InverseNet(config), make_inverse)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    out.write_text(json.dumps({"machine": {"platform": platform.platform(), "threads": torch.get_num_threads(),
                                           "torch": torch.__version__}, "designs": rows}, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 4))
    axis.barh([r["design"] for r in rows], [r["train_step_s_per_sample"] for r in rows])
    axis.set_xscale("log")
    axis.set_xlabel("training step, s per sample (2 CPU threads)")
    figure.tight_layout()
    figure.savefig(out.with_suffix(".png"), dpi=90)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
