"""How long runs wait for a new best score: the evidence for the paper-budget runs' --patience.

    python scripts/best_waits.py [--root results/search] [--min_epochs 40]

For every run directory below --root that trained at least --min_epochs epochs, the waits between one new best
evaluation (main.py's best checkpoint: a higher mean of Bin0 and Bin1) and the next, in epochs. Prints how many
runs and waits there are, the longest waits, and percentiles. A run cannot show a wait longer than its own
length, so the numbers say what the 40-epoch search saw, not what a longer run would.
"""
import argparse
import sys
from pathlib import Path

import experiment  # first: it puts the repository root on sys.path
from experiment import REPO_ROOT


def waits_between_new_bests(records):
    """Epochs from each new best evaluation to the next one, in a run's metrics.jsonl records."""
    best_score, best_epoch, waits = 0.0, None, []
    for record in records:
        score = experiment.evaluation_score(record)
        if score > best_score:  # as main.py: only a higher score, and only above 0, is a new best
            if best_epoch is not None:
                waits.append(record["epoch"] - best_epoch)
            best_score, best_epoch = score, record["epoch"]
    return waits


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=str(REPO_ROOT / "results" / "search"), help="where the run directories are")
    parser.add_argument("--min_epochs", type=int, default=40, help="only runs that trained at least this many epochs")
    args = parser.parse_args(argv)
    runs, waits = 0, []
    for args_file in sorted(Path(args.root).rglob("args.json")):
        records = experiment.read_metrics(args_file.parent)
        if records and records[-1]["epoch"] >= args.min_epochs:
            runs += 1
            waits += waits_between_new_bests(records)
    if not waits:
        print(f"error: no run of at least {args.min_epochs} epochs with two new bests below {args.root}",
              file=sys.stderr)
        return 2
    waits.sort()
    percentiles = ", ".join(f"p{p}: {waits[min(len(waits) - 1, p * len(waits) // 100)]}" for p in (50, 90, 99))
    print(f"{runs} runs of >= {args.min_epochs} epochs, {len(waits)} waits between new bests (epochs): "
          f"{percentiles}; longest: {', '.join(map(str, waits[-5:]))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
