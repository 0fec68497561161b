#!/usr/bin/env python
"""Train a surrogate or a direct inverse network from a committed recipe (scripts/recipes/*.json).

    python scripts/generate_dataset.py --out data/train32 --samples 3000 --grid 32 --workers 2
    python scripts/generate_dataset.py --out data/test32 --samples 250 --seed 1000 --grid 32 --workers 2
    python scripts/train.py scripts/recipes/surrogate32.json            # CPU; rerun the same command to resume
    python scripts/train.py scripts/recipes/surrogate32.json --device cuda

Checkpoints, the loss curve (loss.png) and logs go to --work-dir (default runs/<recipe name>); the best weights and
their model card go to Resources/Models/<name>.pt/.json, the held-out check samples the card names to
scripts/recipes/checks/<name>_check.npz (not shipped: the tests read them there).
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from TumorPersonalizationLib.errors import InputError  # noqa: E402
from TumorPersonalizationLib.offline.training import read_recipe, train  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--work-dir", type=Path)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--max-epochs", type=int, help="stop after this many epochs in this run (resume later)")
    args = parser.parse_args(argv)
    try:
        recipe = read_recipe(args.recipe)
        card = train(recipe, args.work_dir or ROOT / "runs" / recipe["name"], device=args.device,
                     progress=lambda fraction, line: print(line, file=sys.stderr, flush=True),
                     max_epochs=args.max_epochs, checks_directory=ROOT / "scripts" / "recipes" / "checks")
    except InputError as error:
        print(f"train: error: {error}", file=sys.stderr)
        return 2
    if not card.get("finished", True):
        print(f"stopped after epoch {card['epoch']}; rerun the same command to resume", file=sys.stderr)
        return 0
    print(f"{card['name']}: {card['epochs']} epochs, {card['wall_time_s']:.0f} s, held-out "
          f"{ {k: v['mean'] for k, v in card['held_out_metrics'].items() if isinstance(v, dict)} }")
    return 0


if __name__ == "__main__":
    sys.exit(main())
