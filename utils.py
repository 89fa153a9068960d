"""What main.py needs besides the models and the data: evaluation, logging, checkpoints and RNG state."""
import logging
import os
import random
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

LOGGER_NAME = "fwp"


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


@dataclass
class EvalResult:
    loss: float  # mean cross-entropy per non-pad target token
    acc: float  # percent of sequences whose every non-pad position is predicted right
    by_length: dict = field(default_factory=dict)  # length -> [num_correct, num_total]


def sequence_loss(logits, tgt, pad, reduction="mean"):
    """Cross-entropy over the non-pad positions of a batch (mean or sum)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=pad,
                           reduction=reduction)


def length_sorted_batches(lengths, batch_size):
    """Index batches of similar lengths: with causal models, trimming a batch to its own longest line changes no
    result on the non-pad positions, and sorted batches keep the trimmed length short."""
    order = torch.argsort(lengths.cpu(), stable=True)
    return order.split(batch_size)


@torch.inference_mode()
def evaluate(model, split, pad, batch_size):
    """Loss, sequence-level accuracy and per-length counts of `model` on a data.Split."""
    skip_loader_seed_draw()
    was_training = model.training
    model.eval()
    total_loss, total_tokens = 0.0, 0
    correct_by_length, total_by_length = {}, {}
    for batch in length_sorted_batches(split.lengths, batch_size):
        batch = batch.to(split.src.device)
        length = int(split.lengths[batch].max())
        src, tgt = split.src[batch, :length], split.tgt[batch, :length]
        logits = model(src)
        not_pad = tgt != pad
        total_loss += sequence_loss(logits, tgt, pad, reduction="sum").item()
        total_tokens += int(not_pad.sum())
        correct = ((logits.argmax(-1) == tgt) | ~not_pad).all(dim=1)
        for line_length, ok in zip(split.lengths[batch].tolist(), correct.tolist()):
            total_by_length[line_length] = total_by_length.get(line_length, 0) + 1
            correct_by_length[line_length] = correct_by_length.get(line_length, 0) + int(ok)
    model.train(was_training)
    num_correct, num_lines = sum(correct_by_length.values()), sum(total_by_length.values())
    return EvalResult(loss=total_loss / max(total_tokens, 1), acc=100.0 * num_correct / max(num_lines, 1),
                      by_length={n: [correct_by_length[n], total_by_length[n]] for n in sorted(total_by_length)})


# ---------------------------------------------------------------------------------------------------------------
# Logging


def setup_logging(log_path):
    """A logger writing bare messages to stdout and appending them to `log_path`; replaces earlier handlers so
    that main() can run several times in one process (tests)."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    close_logging()
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(log_path, mode="a")):
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    return logger


def close_logging():
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(state, path):
    """torch.save through a temporary file and an atomic rename: a kill never leaves a half-written file."""
    tmp_path = f"{path}.tmp"
    torch.save(state, tmp_path)
    os.replace(tmp_path, path)


def load_checkpoint(path, device="cpu"):
    # Our own checkpoints hold RNG states and plain containers besides tensors, hence weights_only=False.
    return torch.load(path, map_location=device, weights_only=False)


def write_text_atomic(path, text):
    tmp_path = f"{path}.tmp"
    with open(tmp_path, "w") as f:
        f.write(text)
    os.replace(tmp_path, path)


# ---------------------------------------------------------------------------------------------------------------
# Seeding and RNG state


def seed_everything(seed):
    """What the original seeds, right after parsing the flags and again just before the first epoch."""
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def skip_loader_seed_draw():
    """Take the int64 that each DataLoader iterator draws from the global torch RNG for its workers' seed. The
    original evaluates every split through a DataLoader, so every evaluation advances the RNG that later decides
    the data order; drawing it here keeps a seed's runs identical to the original's."""
    torch.empty((), dtype=torch.int64).random_()


def epoch_order(num_examples):
    """The next epoch's data order, drawn from the global torch RNG exactly as the original's
    `DataLoader(train, batch_size, shuffle=True)` draws it: a fresh DataLoader iterator takes one int64 for its
    worker seed, then the RandomSampler one int64 to seed its own permutation generator. Drawing the whole
    permutation as one batch consumes the RNG exactly as iterating it batch by batch does."""
    loader = torch.utils.data.DataLoader(range(num_examples), batch_size=num_examples, shuffle=True)
    return next(iter(loader))


def capture_rng_state():
    """Every random state training reads: Python, NumPy, torch CPU and CUDA (data order and dropout)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
