"""main.py's optimiser rules against a training loop written here from the README: --grad_cummulate (the gradients
of a group of batches summed into one Adam step), --clip (global gradient norm) and train_loss in metrics.jsonl.

The loop below shares only the model constructor, the loader and the original's data order (test_main's
original_batches) with main.py; batch losses, the step points, the clipping and the optimiser are its own.
"""
import math
import random

import pytest
import torch
import torch.nn.functional as F

import data
import main
from model import build_model
from test_main import TINY, original_batches, read_metrics, run_main, write_tiny_parity

# TINY: an LSTM on 48 training lines in batches of 8 (6 batches per epoch), 2 epochs, evaluations after batches 0
# and 4 of each epoch and at its end. stop_acc 101: no evaluation ends a run early.
FLAGS = TINY + ["--stop_acc", "101"]
ADAM_BETA1 = 0.9


def clip_by_hand(grads, max_norm):
    """Scale all gradients together so that their joint Euclidean norm is at most max_norm."""
    norm = math.sqrt(sum(float(grad.double().square().sum()) for grad in grads))
    if norm > max_norm:
        for grad in grads:
            grad.mul_(max_norm / norm)


def reference_training(data_dir, flags):
    """Train the seed's initial model on the original's batches: the loss of every batch (one list per epoch) and
    the optimiser after the last batch."""
    args = main.build_parser().parse_args(["--data_dir", str(data_dir), *flags])
    dataset = data.load_data(data_dir)
    train, pad = dataset.splits["train"], dataset.tgt_pad
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    model = build_model(args, len(dataset.src_vocab) + 1, len(dataset.tgt_vocab) + 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate, betas=(ADAM_BETA1, 0.995), eps=1e-9)
    num_batches = math.ceil(len(train) / args.batch_size)
    batches = original_batches(args.seed, len(train), args.batch_size, args.report_every, args.num_epoch)
    losses = []
    for epoch in range(args.num_epoch):
        losses.append([])
        for index, batch in enumerate(batches[epoch * num_batches:(epoch + 1) * num_batches]):
            batch = torch.tensor(batch)
            src, tgt = train.batch(batch)
            logits = model(src)
            # Mean over the batch's non-pad target tokens.
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=pad)
            loss.backward()  # adds to the gradients of the earlier batches of the group
            losses[-1].append(loss.item())
            # A group is grad_cummulate batches; the last group of an epoch may be shorter.
            if (index + 1) % args.grad_cummulate == 0 or index + 1 == num_batches:
                if args.clip > 0:
                    clip_by_hand([p.grad for p in model.parameters()], args.clip)
                optimizer.step()
                optimizer.zero_grad()
    return losses, optimizer


def trained_by_main(tmp_path, flags):
    """(data folder, latest_model.pt, metrics.jsonl records) of a finished main.py run."""
    data_dir = write_tiny_parity(tmp_path / "data" / "tiny")
    code, run_dir = run_main(tmp_path, data_dir, *flags)
    assert code == 0
    return data_dir, main.load_checkpoint(run_dir / "latest_model.pt"), read_metrics(run_dir)


def assert_same_adam(checkpoint, optimizer):
    """Same weights, and Adam's state equal entry by entry: the number of steps, the moving averages of the
    gradients and of their squares (which would differ if gradients were summed, clipped or zeroed otherwise)."""
    params = optimizer.param_groups[0]["params"]
    for (name, weight), param in zip(checkpoint["model"].items(), params, strict=True):
        torch.testing.assert_close(weight, param.detach(), rtol=1e-4, atol=1e-6, msg=name)
    ours, theirs = checkpoint["optimizer"]["state"], optimizer.state_dict()["state"]
    assert ours.keys() == theirs.keys()
    for index in ours:
        assert int(ours[index]["step"]) == int(theirs[index]["step"])
        for moment in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ours[index][moment], theirs[index][moment], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("grad_cummulate, clip", [(1, 0.0), (4, 0.0), (3, 0.0), (4, 0.2)])
def test_training_matches_summed_gradients_one_adam_step_per_group(tmp_path, grad_cummulate, clip):
    """6 batches per epoch: groups of 4 step after batches 4 and 6 of each epoch (2 steps), groups of 3 after
    batches 3 and 6; the first epoch's last group must not carry into the second."""
    flags = FLAGS + ["--grad_cummulate", str(grad_cummulate), "--clip", str(clip)]
    _, checkpoint, _ = trained_by_main(tmp_path, flags)
    _, optimizer = reference_training(tmp_path / "data" / "tiny", flags)
    expected_steps = 2 * math.ceil(6 / grad_cummulate)
    assert {int(state["step"]) for state in checkpoint["optimizer"]["state"].values()} == {expected_steps}
    assert_same_adam(checkpoint, optimizer)


def test_clip_scales_the_summed_gradient_to_global_norm_clip(tmp_path):
    """One Adam step on the sum of one epoch's 6 batch gradients: its first moment is (1 - beta1) x the gradient
    it was given, whose norm over all parameters together must be the clip threshold, in the direction of the
    unclipped sum."""
    clip = 0.05
    flags = FLAGS + ["--num_epoch", "1", "--grad_cummulate", "6"]
    _, checkpoint, _ = trained_by_main(tmp_path, flags + ["--clip", str(clip)])
    _, unclipped = reference_training(tmp_path / "data" / "tiny", flags)
    stepped = [state["exp_avg"] / (1 - ADAM_BETA1) for state in checkpoint["optimizer"]["state"].values()]
    summed = [state["exp_avg"] / (1 - ADAM_BETA1) for state in unclipped.state_dict()["state"].values()]
    norm = math.sqrt(sum(float(g.double().square().sum()) for g in summed))
    assert norm > 4 * clip  # else clipping would do nothing here and prove nothing
    assert math.sqrt(sum(float(g.double().square().sum()) for g in stepped)) == pytest.approx(clip, rel=1e-4)
    for got, raw in zip(stepped, summed, strict=True):
        torch.testing.assert_close(got, raw * (clip / norm), rtol=1e-4, atol=1e-9)


def test_train_loss_is_the_mean_batch_loss_of_the_epoch_so_far(tmp_path):
    """At every evaluation, also those inside an epoch, and in the second epoch too (where the count of batches
    in the epoch and the count since the start differ)."""
    data_dir, _, metrics = trained_by_main(tmp_path, FLAGS)
    losses, _ = reference_training(data_dir, FLAGS)
    assert [(m["epoch"], m["batch"]) for m in metrics] == [(1, 0), (1, 4), (1, 5), (2, 0), (2, 4), (2, 5)]
    for record in metrics:
        so_far = losses[record["epoch"] - 1][:record["batch"] + 1]
        assert record["train_loss"] == pytest.approx(sum(so_far) / len(so_far), rel=1e-5), record
