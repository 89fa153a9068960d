"""What main.py needs besides the models and the data: evaluation, logging, checkpoints and RNG state."""
import contextlib
import fcntl
import logging
import os
import pickle
import platform
import random
import re
import shutil
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


def selection_score(valid_acc, valid2_acc):
    """What "best" means throughout: main.py's best checkpoint, tune.py's best trial and results.py's best run are
    those with the highest mean of the valid (Bin0) and valid2 (Bin1) accuracy. No global names inside: tune.py's
    trials run it in Ray workers that get it by value (see scripts/experiment.py)."""
    return (valid_acc + valid2_acc) / 2


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
        batch = batch.to(split.lengths.device)
        src, tgt = split.batch(batch)
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
    # A log line that cannot be written (a full disk) must not print a traceback per line: main.py reports the
    # failed checkpoint write in one line and stops.
    logging.raiseExceptions = False
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


# 2: loadable by torch's weights-only unpickler (RNG states as tensors). Checkpoints without this key were written
# by main.py before that and hold NumPy objects, which that unpickler refuses.
CHECKPOINT_FORMAT = 2


class CheckpointError(Exception):
    """A checkpoint that cannot be written or safely read; the message is one line that names the file."""


def first_line(exc):
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def save_checkpoint(state, path):
    """torch.save through a temporary file and an atomic rename: a kill or a full disk never leaves a half-written
    file in place of the previous checkpoint."""
    tmp_path = f"{path}.tmp"
    try:
        torch.save(dict(state, format=CHECKPOINT_FORMAT), tmp_path)
        os.replace(tmp_path, path)
    except (OSError, RuntimeError) as exc:  # torch reports a failed write (ENOSPC, EFBIG, EIO) as RuntimeError
        with contextlib.suppress(OSError):
            os.remove(tmp_path)
        kept = "the previous one is kept" if os.path.exists(path) else "there was none before"
        raise CheckpointError(f"{path}: cannot write it ({first_line(exc)}; free space: "
                              f"{free_bytes(path)}); {kept}") from None


def free_bytes(path):
    try:
        return f"{shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free} bytes"
    except OSError:
        return "unknown"


def load_checkpoint(path, required=(), device="cpu"):
    """A checkpoint of main.py, read by torch's weights-only unpickler only: tensors and plain containers, never an
    object whose unpickling could run code, so a run directory from anyone is safe to open. CheckpointError when
    the file is missing, unreadable, truncated, needs more than that unpickler allows, or lacks a `required` key."""
    not_torch = not_a_torch_file(path)
    if not_torch:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({not_torch})")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read it ({exc.strerror or first_line(exc)})") from None
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if found is None:  # not a pickle at all
            detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(exc))
            raise CheckpointError(f"{path}: not a readable checkpoint, truncated or another kind of file "
                                  f"({detail.group(1) if detail else first_line(exc)})") from None
        if found.group(1).startswith("numpy"):
            raise CheckpointError(f"{path}: written by an earlier main.py, whose checkpoints cannot be opened "
                                  f"safely (they hold NumPy objects); start the run again") from None
        raise CheckpointError(f"{path}: not opened: loading it would need {found.group(1)}, which a checkpoint of "
                              f"main.py never holds and which could run code") from None
    except Exception as exc:  # truncated or not a torch file: torch raises RuntimeError, KeyError, EOFError, ...
        raise CheckpointError(f"{path}: not a readable checkpoint, truncated or another kind of file "
                              f"({type(exc).__name__}: {first_line(exc)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a checkpoint of main.py (it holds a {type(state).__name__})")
    if state and all(isinstance(value, torch.Tensor) for value in state.values()):
        raise CheckpointError(f"{path}: not a checkpoint of main.py: it holds a bare state_dict ({len(state)} "
                              f"tensors, as torch.save(model.state_dict()) writes), without the training state")
    if "format" not in state and "model" not in state:
        raise CheckpointError(f"{path}: not a checkpoint of main.py (a dict with the keys "
                              f"{', '.join(map(str, list(state)[:5]))}{', ...' if len(state) > 5 else ''})")
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: written by an earlier main.py (checkpoint format {state.get('format', 1)}, "
                              f"this one reads {CHECKPOINT_FORMAT}); start the run again")
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(f"{path}: not a checkpoint of main.py (no {', '.join(missing)})")
    return state


def not_a_torch_file(path):
    """Why `path` cannot be a torch.save file (a zip archive, or a pickle for torch < 1.6), or None. Said before
    torch's unpickler gives its own guess at a text file ("pop from empty list", "Unsupported operand 110")."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return None  # torch.load reports it
    if not head:
        return "an empty file"
    if head.startswith(b"PK") or head.startswith(b"\x80"):
        return None
    try:
        return f"a text file beginning {head.decode().splitlines()[0][:30]!r}"
    except (UnicodeDecodeError, IndexError):
        return "neither a zip archive nor a pickle"


def load_weights(model, weights, path):
    """Load a checkpoint's model weights into `model`; CheckpointError saying how they differ when they are another
    model's (torch's own error names only this model's class)."""
    own = model.state_dict()
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path}: its 'model' is a {type(weights).__name__}, not a state_dict")
    missing = [key for key in own if key not in weights]
    unexpected = [key for key in weights if key not in own]
    reshaped = [key for key in own if key in weights and getattr(weights[key], "shape", None) != own[key].shape]
    differences = []
    if missing:
        differences.append(f"{len(missing)} of this model's {len(own)} tensors missing (first: {missing[0]})")
    if unexpected:
        differences.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
    if reshaped:
        key = reshaped[0]
        differences.append(f"{len(reshaped)} of other shapes (first: {key}, "
                           f"{tuple(getattr(weights[key], 'shape', ()))} in the file, {tuple(own[key].shape)} here)")
    if differences:
        raise CheckpointError(f"{path}: holds the weights of another model than this run's "
                              f"{type(model).__name__}: {'; '.join(differences)}")
    model.load_state_dict(weights)


def write_text_atomic(path, text):
    tmp_path = f"{path}.tmp"
    with open(tmp_path, "w") as f:
        f.write(text)
    os.replace(tmp_path, path)


# ---------------------------------------------------------------------------------------------------------------
# Folder locks: main.py's on its run directory, scripts/tune.py's on its cell

# In a run directory, held by the one main.py working on it for as long as it runs (main.RunDirLock).
RUN_LOCK = "main.lock"


class LockHeld(Exception):
    """Another process holds the lock; `pid` is the process id it wrote into the lock file ('' if not yet)."""

    def __init__(self, path, pid):
        super().__init__(f"{path} is held by process {pid or '(unknown)'}")
        self.path, self.pid = path, pid


def hold_lock(path, unsupported_warning):
    """A descriptor holding an exclusive flock on `path` (created if missing), this process's id written in it.
    The kernel drops the lock when the process ends, however it ends (kill -9 too), so a lock is never stale and
    the file can stay. LockHeld when another process holds it; on a file system without flock (NFS without lockd,
    ...) one `warning: <unsupported_warning>` and the unguarded descriptor. A bare descriptor, not a file object:
    Tune pickles tune.py's cells, and their locks with them."""
    lock = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(lock, 32, 0).decode(errors="replace").strip()
        os.close(lock)
        raise LockHeld(path, holder) from None
    except OSError:  # ENOLCK, EOPNOTSUPP
        print(f"warning: {unsupported_warning}", file=sys.stderr, flush=True)
        return lock
    os.ftruncate(lock, 0)
    os.pwrite(lock, f"{os.getpid()}\n".encode(), 0)
    return lock


def lock_holder(path):
    """The id of the process that holds the flock on `path`, else None (also where /proc/locks cannot be read).
    Looked up in /proc/locks (`1: FLOCK ADVISORY WRITE <pid> <major>:<minor>:<inode> 0 EOF`), never tested by
    taking the lock: even an instant's hold could refuse a process that starts just then."""
    try:
        inode = os.stat(path).st_ino
        with open("/proc/locks") as f:
            locks = [line.split() for line in f]
    except OSError:
        return None
    return next((int(fields[4]) for fields in locks
                 if len(fields) > 5 and fields[1] == "FLOCK" and fields[5].endswith(f":{inode}")), None)


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
    """Every random state training reads: Python, NumPy, torch CPU and CUDA (data order and dropout), as tensors and
    plain numbers, so that the checkpoint loads with the weights-only unpickler."""
    version, python_internal, gauss_next = random.getstate()
    _, numpy_keys, numpy_pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {"python": {"version": version, "internal": torch.tensor(python_internal, dtype=torch.int64),
                       "gauss_next": gauss_next},
            "numpy": {"keys": torch.from_numpy(numpy_keys.astype(np.int64)), "pos": int(numpy_pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng_state(state):
    python, numpy = state["python"], state["numpy"]
    random.setstate((python["version"], tuple(python["internal"].tolist()), python["gauss_next"]))
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def cpu_description():
    """'<model name> (<vector ISAs>)' from /proc/cpuinfo, or the platform's processor string elsewhere."""
    model, flags = None, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                if model and flags:
                    break
    except OSError:
        pass
    # Only without /proc/cpuinfo's name: platform.processor() may run `uname -p`, and every main.py start logs this.
    model = model or platform.processor() or platform.machine()
    isas = [name for name in ("avx512f", "avx2", "fma") if name in flags]
    return f"{model} ({', '.join(isas) or 'no AVX'})"
