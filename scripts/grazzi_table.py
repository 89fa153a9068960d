"""The parity comparison with Grazzi et al. (ICLR 2025) from the runs of scripts/grazzi_parity.sh.

    python scripts/grazzi_table.py [--runs results/grazzi/runs] [--out results/grazzi/table.md]

Per run directory (args.json, final.json, best_model.pt):
- Bin0 / Bin1: sequence-level accuracy (%, cut to one decimal) of the best checkpoint on valid (lengths 3-40) and test (40-256), as in
  the main table: a string counts only if the parity of every prefix is right.
- Bin1 length-avg: the same, averaged with equal weight over the test lengths present (from final.json's by_length).
- scaled: Grazzi et al.'s measure on our test strings, (p - 1/2) / (1 - 1/2) = 2p - 1 (1 perfect, 0 chance), where p
  is the accuracy of the parity prediction for a string of length n, averaged with equal weight over n = 40..256.
  Every prefix of length n of a test string is such a string (its target is at position n); the full strings are
  not used on their own, as data.py makes each of them even (the original's fix-up), which would make the last
  position trivial. Needs best_model.pt (checkpoints are not committed), so it is computed where the runs were.
- min eig: the smallest eigenvalue 1 - beta_t |k_t|^2 of the delta rule's transitions I - beta_t k_t k_t^T over all
  layers, heads and test positions (what the trained model actually uses; below 0 = negative eigenvalues). Also
  from best_model.pt.
"""
import argparse
import json
import math
import sys
from pathlib import Path

import torch

import experiment  # noqa: F401 (first: it puts the repository root on sys.path)
import data
import model as model_module
from model import MODEL_NAMES, build_model
from utils import CheckpointError, length_sorted_batches, load_checkpoint, load_weights

TEST_LOWER = 40


@torch.no_grad()
def test_measures(net, split, pad, lower):
    """({n: (correct, total)} over every prefix of length n >= lower of the split's strings, the smallest
    eigenvalue 1 - beta |k|^2 that any delta_net_fn call of the model used at a non-pad position)."""
    correct = torch.zeros(int(split.lengths.max()) + 1, dtype=torch.long)
    total = torch.zeros_like(correct)
    eigenvalues, smallest = [], float("inf")
    operator = model_module.delta_net_fn

    def recording(q, k, v, beta, W0):
        eigenvalues.append(1 - beta[..., 0] * k.pow(2).sum(-1))   # (B, H, L)
        return operator(q, k, v, beta, W0)

    model_module.delta_net_fn = recording
    try:
        for batch in length_sorted_batches(split.lengths, 64):
            src, tgt = split.batch(batch)
            length = src.shape[1]
            right = net(src).argmax(-1) == tgt
            not_pad = tgt != pad
            correct[1:length + 1] += (right & not_pad).sum(0)
            total[1:length + 1] += not_pad.sum(0)
            for layer_eigenvalues in eigenvalues:
                smallest = min(smallest, layer_eigenvalues.masked_select(not_pad[:, None, :]).min().item())
            eigenvalues.clear()
    finally:
        model_module.delta_net_fn = operator
    return {n: (int(correct[n]), int(total[n])) for n in range(lower, len(total)) if total[n] > 0}, smallest


def checkpoint_measures(run_dir):
    """(scaled accuracy, smallest transition eigenvalue) of the run's best checkpoint on the test split."""
    args = argparse.Namespace(**json.loads((run_dir / "args.json").read_text()))
    weights = load_checkpoint(run_dir / "best_model.pt", ("model",))["model"]
    dataset = data.load_data(args.data_dir, args.level)
    net = build_model(args, len(dataset.src_vocab) + 1, len(dataset.tgt_vocab) + 1)
    load_weights(net, weights, run_dir / "best_model.pt")
    net.eval()
    counts, smallest = test_measures(net, dataset.splits["test"], dataset.tgt_pad, TEST_LOWER)
    p = sum(c / t for c, t in counts.values()) / len(counts)
    return 2 * p - 1, smallest


def truncated(value, decimals):
    """Cut, not rounded, as in results/table.md: 100.0 (or 1.000) only when every string is right."""
    if math.isnan(value):
        return "nan"
    scale = 10 ** decimals
    return f"{math.floor(value * scale + 1e-9) / scale:.{decimals}f}"


def row(run_dir):
    args = json.loads((run_dir / "args.json").read_text())
    final = json.loads((run_dir / "final.json").read_text())
    test = final["by_length"]["test"]
    length_avg = 100 * sum(c / t for c, t in test.values()) / len(test)
    has_checkpoint = (run_dir / "best_model.pt").exists()
    scaled, min_eig = checkpoint_measures(run_dir) if has_checkpoint else (float("nan"), float("nan"))
    return (args["model_type"], args["seed"], f"| {MODEL_NAMES[args['model_type']]} ({args['model_type']}) | "
            f"{args['seed']} | {truncated(final['valid_acc'], 1)} | {truncated(final['valid2_acc'], 1)} | "
            f"{truncated(length_avg, 1)} | {truncated(scaled, 3)} | {min_eig:.2f} | {final['best_step']} | "
            f"{run_dir.name} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="results/grazzi/runs")
    parser.add_argument("--out", default="results/grazzi/table.md")
    args = parser.parse_args(argv)
    runs = [d for d in sorted(Path(args.runs).iterdir()) if (d / "final.json").exists()]
    try:
        rows = sorted(row(d) for d in runs)
    except (CheckpointError, data.DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    lines = ["| model | seed | Bin0 (3-40) | Bin1 (40-256) | Bin1 length-avg | scaled (2p-1) | min eig | best step "
             "| run |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"] + [text for *_, text in rows]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
