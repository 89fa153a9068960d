"""Train one model on one formal-language task: `python main.py --data_dir data/parity --model_type 7 ...`.

Takes the original flags verbatim (plus --device and --resume). Each run gets its own directory
`<work_dir>/<model>-<task>-<time>-<hash>/` with log.txt, args.json, metrics.jsonl, best_model.pt,
latest_model.pt, main.lock (held by the one main.py working on it) and, once finished, final.json. A run with
latest_model.pt but no final.json continues exactly where its last evaluation left off with
`python main.py --resume RUN_DIR`.
"""
import os
import signal
import sys

# A scheduler's SIGTERM or a Ctrl-C may come while the imports below run (a second or more, most of it torch): from
# here on it is noted, neither lost nor a traceback, and main() stops before training as for any early signal. Only
# when run as a script: importing this module (tests, notebooks) must not take over the importer's signals.
EARLY_SIGNALS = []


def note_early_signal(signum, frame):
    EARLY_SIGNALS.append(signum)
    if len(EARLY_SIGNALS) > 1:  # a second signal stops at once, with the status of the first
        print("Stopped before training started: nothing to resume.", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # Not an exception: raised inside an import, one leaves a half-initialised module behind (numpy's C part then
        # refuses to load again and the stop ends as an ImportError traceback), and an importer's `except` may catch
        # it. Before main() nothing has been written, so there is nothing to clean up.
        os._exit(128 + EARLY_SIGNALS[0])


if __name__ == "__main__":
    for early_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(early_signal, note_early_signal)

import argparse  # noqa: E402 (the handlers above come first)
import contextlib  # noqa: E402
import gc  # noqa: E402
import glob  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from datetime import datetime  # noqa: E402

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402
from tqdm.contrib.logging import logging_redirect_tqdm  # noqa: E402

import data  # noqa: E402
import kernel_loader  # noqa: E402
from model import MODEL_NAMES, MODEL_SLUGS, build_model, config_error, count_trainable_params  # noqa: E402
from utils import (LOGGER_NAME, RUN_LOCK, CheckpointError, LockHeld, capture_rng_state, close_logging,  # noqa: E402
                   cpu_description, epoch_order, evaluate, first_line, hold_lock, load_checkpoint, load_weights,
                   restore_rng_state, save_checkpoint, seed_everything, selection_score, sequence_loss, setup_logging,
                   write_text_atomic)

# The results do not depend on the evaluation batch size. Batches of 64 lines of similar length evaluated the
# parity splits 20-35 % faster than 256 on one CPU thread (less padding, data in cache).
EVAL_BATCH_SIZE = 64
# What latest_model.pt holds (save_latest); a file without one of them is not a checkpoint this run can resume from.
LATEST_KEYS = ("model", "optimizer", "grads", "progress", "rng")
BEST_KEYS = ("model", "best")
# Flags that --resume accepts besides the run directory; every other flag comes from the run's args.json.
RESUME_OVERRIDABLE = ("num_epoch", "stop_acc", "patience", "device")
EXIT_USAGE, EXIT_DIVERGED, EXIT_OUT_OF_MEMORY = 2, 1, 3


class UsageError(Exception):
    """Bad flags or data: reported as one line before any training starts."""


class NonFiniteLoss(Exception):
    pass


class OutOfMemory(Exception):
    """An allocation failed; the message is one line: which memory ran out, where, and what to try."""


# Where memory can run out (out_of_memory_in's `where`) and what to try then.
MEMORY_HINTS = {
    "while loading data": "the loader needs memory in proportion to the data's tokens (docs/data.md#loading); free "
                          "memory or use smaller files",
    "while setting up the model": "try a smaller model (--hidden_size, --num_layer) or free memory",
    "in a training step": "try a smaller --batch_size (a batch is as long as its longest line) or a smaller model, "
                          "or free memory",
    "during evaluation": f"evaluation runs {EVAL_BATCH_SIZE} lines of similar length at a time, so the longest "
                         f"valid/test lines set its size; try a smaller model or free memory",
    "during training": "try a smaller --batch_size or a smaller model, or free memory",
}


def memory_that_ran_out(exc):
    """'GPU' or 'CPU' when `exc` reports a failed allocation, else None."""
    if isinstance(exc, torch.OutOfMemoryError):  # CUDA's; torch's CPU allocator raises a plain RuntimeError
        return "GPU"
    if isinstance(exc, MemoryError) or "DefaultCPUAllocator: can't allocate memory" in str(exc):
        return "CPU"
    return None


@contextlib.contextmanager
def out_of_memory_in(where):
    """Turn a failed allocation inside into OutOfMemory, saying `where` (a key of MEMORY_HINTS)."""
    try:
        yield
    except (MemoryError, RuntimeError) as exc:
        memory = memory_that_ran_out(exc)
        if memory is None:
            raise
        size = re.search(r"[Tt]ried to allocate ([\d.]+ ?\w+)", str(exc))
        detail = f" (allocating {size[1]})" if size else ""
        raise OutOfMemory(f"out of {memory} memory {where}{detail}: {MEMORY_HINTS[where]}") from None


class StopSignal(BaseException):
    """SIGINT or SIGTERM arrived. Raised at the end of the current batch, once latest_model.pt holds that point, or
    `at_once` (a second signal, or one during a kernel build) wherever the run is. A BaseException, like
    KeyboardInterrupt, so that no `except Exception` on the way (torch's build code, a library) swallows it."""

    def __init__(self, signum, at_once=False):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.at_once = signum, at_once


class SignalCatcher:
    """Inside `with`: the first SIGINT or SIGTERM is only noted, so that training stops cleanly at the end of the
    current batch; a second one stops at once, and so does the first while a kernel builds (a build takes up to a
    minute, longer than a scheduler's grace before SIGKILL; the next run builds again). The exit status is that of
    the first signal. A signal noted before `with` (EARLY_SIGNALS) counts as received."""

    def __init__(self):
        self.received = EARLY_SIGNALS[0] if EARLY_SIGNALS else None
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # the only thread that may set handlers
            self.previous = {sig: signal.signal(sig, self.note) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def note(self, signum, frame):
        if self.received is not None:
            raise StopSignal(self.received, at_once=True)
        self.received = signum
        if kernel_loader.building():
            raise StopSignal(signum, at_once=True)

    def stop_if_received(self):
        if self.received is not None:
            raise StopSignal(self.received)

    def __exit__(self, *exc_info):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class OneLineArgumentParser(argparse.ArgumentParser):
    # argparse takes only `-1` and `-1.5` for negative numbers and reads `-1e-3` or `-inf` as an unknown flag
    # ("expected one argument"): every float literal is a value, so that the range checks report the real problem.
    NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = self.NEGATIVE_NUMBER

    def error(self, message):
        raise UsageError(message)


def build_parser():
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--data_dir", type=str, default="data/parity",
        help="directory with {train,valid,test}_<level>.{src,tgt}; generated when missing and named after a task")
    add("--level", type=int, default=50, help="the number in the data file names (always 50 in the paper)")
    add("--work_dir", type=str, default="runs", help="parent directory of the per-run directories")
    add("--model_type", type=int, default=0, choices=sorted(MODEL_NAMES),
        help="; ".join(f"{i}: {name}" for i, name in MODEL_NAMES.items()))
    add("--seed", type=int, default=1, help="seed of the initialisation, dropout and data order")
    add("--no_embedding", action="store_true", help="LSTM/e-LSTM: feed one-hot inputs instead of an embedding")
    add("--num_layer", type=int, default=2, help="number of layers (the e-LSTM always has one)")
    add("--hidden_size", type=int, default=512, help="hidden size (= n_head x head dimension for attention models)")
    add("--emb_size", type=int, default=128, help="LSTM/e-LSTM: embedding size")
    add("--n_head", type=int, default=8, help="attention/fast-weight models: number of heads")
    add("--ff_factor", type=int, default=4, help="attention/fast-weight models: feed-forward width / hidden size")
    add("--remove_pos_enc", action="store_true",
        help="fast-weight models: no sinusoidal positional encoding (required for the SRWM)")
    add("--dropout", type=float, default=0.0, help="dropout rate")
    add("--stop_acc", type=float, default=100.0,
        help="stop once the mean of valid and valid2 accuracy (percent) reaches this")
    add("--batch_size", type=int, default=64, help="training batch size")
    add("--learning_rate", type=float, default=1e-4, help="Adam learning rate (constant)")
    add("--grad_cummulate", type=int, default=1, help="batches whose gradients are summed per optimiser step")
    add("--num_epoch", type=int, default=200, help="maximum number of training epochs")
    add("--patience", type=int, default=0,
        help="also stop once this many epochs have passed without a new best score (0: never, as the original)")
    add("--report_every", type=int, default=50,
        help="evaluate every this many training batches (<= 0: only at epoch ends)")
    add("--clip", type=float, default=0.0, help="global gradient-norm clipping threshold (0: off)")
    add("--project_name", type=str, default=None, help="wandb project (default: fwp-formal-lang)")
    add("--job_name", type=str, default=None, help="wandb run name (default: the run directory's name)")
    add("--use_wandb", action="store_true", help="also log the metrics to wandb")
    add("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when available, else CPU")
    add("--resume", type=str, default=None, metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its latest_model.pt (flags from its args.json; only "
             + ", ".join(f"--{name}" for name in RESUME_OVERRIDABLE) + " may be changed)")
    return parser


# ---------------------------------------------------------------------------------------------------------------
# Flags, device and data: everything that can fail before training


def explicit_flags(argv):
    """{flag: value} for the flags actually written in argv (defaults left out)."""
    unset = object()  # not a string: argparse would run a string default through the flag's type
    parser = build_parser()
    parser.set_defaults(**{action.dest: unset for action in parser._actions})
    return {name: value for name, value in vars(parser.parse_args(argv)).items() if value is not unset}


def parse_flags(argv):
    """The run's flags; for --resume those of args.json with the allowed overrides applied."""
    args = build_parser().parse_args(argv)
    if args.resume is None:
        return args
    explicit = explicit_flags(argv)
    refused = sorted(set(explicit) - set(RESUME_OVERRIDABLE) - {"resume"})
    if refused:
        raise UsageError(f"--resume takes the run's flags from its args.json; --{refused[0]} cannot be changed "
                         f"(allowed: {', '.join('--' + name for name in RESUME_OVERRIDABLE)})")
    args_path = os.path.join(args.resume, "args.json")
    if not os.path.isfile(args_path):
        raise UsageError(f"{args_path} not found: --resume needs a run directory written by main.py")
    with open(args_path) as f:
        saved = json.load(f)
    # A flag added since the run started (e.g. --patience) is missing from its args.json: it takes its default,
    # which keeps the run as it was.
    defaults = vars(build_parser().parse_args([]))
    return argparse.Namespace(**{**defaults, **saved, **explicit})


# The range of every numeric flag; `--report_every` takes any integer (<= 0: only at epoch ends).
FLAG_RANGES = {
    "level": (lambda v: v >= 1, "at least 1"),
    "num_layer": (lambda v: v >= 1, "at least 1"),
    "hidden_size": (lambda v: v >= 1, "at least 1"),
    "emb_size": (lambda v: v >= 1, "at least 1"),
    "n_head": (lambda v: v >= 1, "at least 1"),
    "ff_factor": (lambda v: v >= 1, "at least 1"),
    "dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "stop_acc": (math.isfinite, "a finite number"),
    "batch_size": (lambda v: v >= 1, "at least 1"),
    "learning_rate": (lambda v: math.isfinite(v) and v > 0, "a positive finite number"),
    "grad_cummulate": (lambda v: v >= 1, "at least 1"),
    "num_epoch": (lambda v: v >= 1, "at least 1"),
    "patience": (lambda v: v >= 0, "at least 0"),
    "clip": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0 (0: off)"),
    "seed": (lambda v: -2 ** 63 <= v < 2 ** 64, "a 64-bit integer"),
}


def check_flags(args):
    for name, (valid, requirement) in FLAG_RANGES.items():
        if not valid(getattr(args, name)):
            raise UsageError(f"--{name} must be {requirement}, got {getattr(args, name)}")
    error = config_error(args)
    if error:
        raise UsageError(error)


def resolve_device(name):
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available (use --device cpu or auto)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def task_name(data_dir):
    return os.path.basename(os.path.normpath(data_dir))


def load_dataset(args, device):
    """The loaded data; a missing directory named after a task is generated first."""
    task = task_name(args.data_dir)
    try:
        if data.needs_generation(args.data_dir) and task in data.TASK_REGISTRY:
            print(f"{args.data_dir} does not exist: generating the '{task}' dataset there.", flush=True)
            data.write_task(task, args.data_dir)
        return data.load_data(args.data_dir, level=args.level, device=device)
    except data.DataError as exc:
        raise UsageError(str(exc)) from None


# ---------------------------------------------------------------------------------------------------------------
# Run directory


def new_run_dir(args):
    """`<work_dir>/<model>-<task>-<time>-<hash of the flags>`; a clash (same flags, same second) gets a new hash."""
    flags = json.dumps(vars(args), sort_keys=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        digest = hashlib.sha1(f"{flags}{attempt or ''}".encode()).hexdigest()[:8]
        name = f"{MODEL_SLUGS[args.model_type]}-{task_name(args.data_dir)}-{stamp}-{digest}"
        path = os.path.join(args.work_dir, name)
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            continue
        except OSError as exc:
            raise UsageError(f"--work_dir {args.work_dir}: cannot create a run directory there "
                             f"({exc.strerror})") from None
    raise UsageError(f"could not create a new run directory under {args.work_dir}")


class RunDirLock:
    """Inside `with`: the run directory `take` was given is this process's alone. Two main.py processes on one
    directory (two resumes, a sweep's and a person's) would append to one metrics.jsonl and log.txt and overwrite
    each other's checkpoints; the second one is refused before it writes anything there."""

    def __init__(self):
        self.lock = None

    def take(self, run_dir):
        try:
            self.lock = hold_lock(os.path.join(run_dir, RUN_LOCK),
                                  f"{run_dir}: cannot lock {RUN_LOCK} on this file system; keep other main.py "
                                  f"processes off this run directory")
        except LockHeld as held:
            raise UsageError(f"{run_dir} is in use by another main.py (process {held.pid or 'unknown'}): one process "
                             f"per run directory; run the command again once it has ended") from None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None


def write_args(run_dir, args):
    write_text_atomic(os.path.join(run_dir, "args.json"), json.dumps(vars(args), indent=2) + "\n")


def truncate_metrics(path, num_evaluations):
    """Keep the first `num_evaluations` records: those logged after the checkpoint a resumed run restarts from
    will be redone."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip()][:num_evaluations]
    write_text_atomic(path, "".join(kept))


# ---------------------------------------------------------------------------------------------------------------
# Training state


@dataclass
class Best:
    score: float = 0.0  # mean of valid and valid2 accuracy; as in the original, only a score above 0 is kept
    valid_acc: float = 0.0
    valid2_acc: float = 0.0
    epoch: int = 0
    step: int = 0


@dataclass
class Progress:
    """Where training stands; with the model, optimiser and RNG states it is everything a resume needs."""
    epoch: int = 0  # completed epochs
    batch: int = 0  # batches done in the current epoch
    step: int = 0  # batches done in total
    order: torch.Tensor = None  # the current epoch's data order (None between epochs)
    loss_sum: float = 0.0  # training loss summed over the current epoch's batches
    evaluations: int = 0  # evaluations logged so far (lines of metrics.jsonl)
    last_score: float = None  # mean of valid and valid2 accuracy at the latest evaluation
    elapsed_s: float = 0.0
    best: Best = field(default_factory=Best)
    wandb_id: str = None


def stop_acc_reached(progress, args):
    return progress.last_score is not None and progress.last_score >= args.stop_acc


def patience_run_out(progress, args):
    """Whether --patience epochs have ended since the epoch of the best evaluation (the run's start if none)."""
    return args.patience > 0 and progress.epoch - progress.best.epoch >= args.patience


def stop_reason(progress, args):
    """Why training ends here, between epochs: stop_acc, patience or num_epoch; None while it goes on. An epoch left
    early at stop_acc still ends with its end-of-epoch evaluation, as in the original (also when a resume lands
    between the two)."""
    if progress.order is not None:
        return None
    if stop_acc_reached(progress, args):
        return "stop_acc"
    if patience_run_out(progress, args):
        return "patience"
    return "num_epoch" if progress.epoch >= args.num_epoch else None


def make_optimizer(model, args):
    """The original's optimiser: Adam at the constant --learning_rate, betas (0.9, 0.995), eps 1e-9."""
    return torch.optim.Adam(model.parameters(), lr=args.learning_rate, betas=(0.9, 0.995), eps=1e-9)


def batch_loss(model, split, indices, pad):
    """The mean training loss of the lines `indices` of a data.Split, padded to the batch's longest line: the
    models are causal, so the padding after it changes nothing."""
    src, tgt = split.batch(indices)
    return sequence_loss(model(src), tgt, pad)


def update_weights(model, optimizer, clip):
    """One optimiser step on the gradients summed so far (clipped to the global norm `clip` when > 0), then
    clear them."""
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class Run:
    """One training run: owns the model, optimiser, data, logs and checkpoints of a run directory."""

    def __init__(self, args, run_dir, dataset, device, resuming):
        self.args, self.run_dir, self.data, self.device = args, run_dir, dataset, device
        self.log = setup_logging(self.path("log.txt")).info
        self.wandb = None
        self.signals = SignalCatcher()  # main() replaces it with the one it has installed
        self.paths_logged = False
        self.code = code_version()  # now: HEAD may move while the run trains
        kernel_loader.forget_operator_paths()
        seed_everything(args.seed)
        self.model = build_model(args, len(dataset.src_vocab) + 1, len(dataset.tgt_vocab) + 1).to(device)
        self.optimizer = make_optimizer(self.model, args)
        self.progress = Progress()
        if resuming:
            self.restore_latest()
        else:
            # The original re-seeds here, so that the data order and dropout depend on the seed only.
            seed_everything(args.seed)
        # Training and evaluation time; the one-time kernel builds are not counted.
        self.start_time = time.time() - self.progress.elapsed_s + kernel_loader.build_seconds()

    def path(self, name):
        return os.path.join(self.run_dir, name)

    def elapsed(self):
        return time.time() - self.start_time - kernel_loader.build_seconds()

    # -- set-up -----------------------------------------------------------------------------------------------

    def log_header(self, argv, resuming):
        log, args = self.log, self.args
        log(f"[{now()}] {'Resuming' if resuming else 'Starting'} run {self.run_dir}")
        log(f"torch version: {torch.__version__}, device: {self.device}")
        # The same flags and seed give the same run only on the same kind of CPU: say which one this is.
        log(f"CPU: {cpu_description()}; ATen: {torch.backends.cpu.get_cpu_capability()}; "
            f"threads: {torch.get_num_threads()}")
        log(f"Code: {self.code}")
        log(f"Command executed: {[sys.argv[0]] + list(argv)}")
        log(f"Args: {json.dumps(vars(args), indent=2)}")
        log(f"Input vocab size: {len(self.data.src_vocab) + 1}")
        log(f"Output vocab size: {len(self.data.tgt_vocab) + 1}")
        log(f"Pad ID for src: {self.data.src_pad}")
        log(f"Pad ID for tgt: {self.data.tgt_pad}")
        log(f"Model: {MODEL_NAMES[args.model_type]}")
        log(f"Number of trainable params: {count_trainable_params(self.model)}")
        log(f"{self.model}")
        log(f"Batch size: {args.batch_size}")
        log(f"Gradient accumulation for {args.grad_cummulate} steps.")
        log(f"Seed: {args.seed}")
        log(f"Learning rate: {args.learning_rate}")
        log(f"clip at: {args.clip}")
        if resuming:
            log(f"Resumed after epoch {self.progress.epoch}, batch {self.progress.batch} of the next "
                f"(step {self.progress.step}).")

    def start_wandb(self):
        import wandb
        if self.progress.wandb_id is None:
            self.progress.wandb_id = uuid.uuid4().hex[:12]
        try:
            self.wandb = wandb.init(project=self.args.project_name or "fwp-formal-lang",
                                    name=self.args.job_name or os.path.basename(self.run_dir), dir=self.run_dir,
                                    config=vars(self.args), id=self.progress.wandb_id, resume="allow")
        except Exception as exc:  # no login, no network, bad project name, ...: wandb's own exception types vary
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UsageError(f"--use_wandb: wandb could not start ({reason}); log in with `wandb login` or set "
                             f"WANDB_MODE=offline") from None
        if getattr(self.wandb, "offline", False):
            # wandb cannot append to an offline run: each start (the first, each --resume) writes a folder of its
            # own, all under the run's id; `wandb sync` of all of them uploads one run.
            folders = sorted(glob.glob(os.path.join(self.run_dir, "wandb", f"offline-run-*-{self.progress.wandb_id}")))
            self.log(f"wandb offline run {self.progress.wandb_id}: its records are in {len(folders)} folder(s), one "
                     f"per start; upload them together with: wandb sync {shlex.join(folders)}")

    def finish_wandb(self, exit_code):
        if self.wandb is not None:
            self.wandb.finish(exit_code=exit_code)
            self.wandb = None

    # -- checkpoints ------------------------------------------------------------------------------------------

    def save_latest(self):
        self.progress.elapsed_s = self.elapsed()
        save_checkpoint({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                         # Gradients summed so far towards the next optimiser step (--grad_cummulate > 1).
                         "grads": [p.grad for p in self.model.parameters()],
                         "progress": asdict(self.progress), "rng": capture_rng_state()},
                        self.path("latest_model.pt"))

    def restore_latest(self):
        path = self.path("latest_model.pt")
        state = load_checkpoint(path, LATEST_KEYS, self.device)
        load_weights(self.model, state["model"], path)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            if len(state["grads"]) != len(list(self.model.parameters())):
                raise ValueError(f"{len(state['grads'])} gradients for {len(list(self.model.parameters()))} "
                                 f"parameters")
            for param, grad in zip(self.model.parameters(), state["grads"]):
                param.grad = grad
            progress = dict(state["progress"])
            progress["best"] = Best(**progress["best"])
            self.progress = Progress(**progress)
            restore_rng_state(state["rng"])
        except (RuntimeError, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            raise CheckpointError(f"{path}: does not fit this run's model and training state "
                                  f"({type(exc).__name__}: {first_line(exc)})") from None
        # The run's end reads best_model.pt: a file that cannot be opened safely is refused now, before the resumed
        # run has written anything.
        if os.path.exists(self.path("best_model.pt")):
            load_checkpoint(self.path("best_model.pt"), BEST_KEYS, self.device)

    def save_best(self):
        save_checkpoint({"model": self.model.state_dict(), "best": asdict(self.progress.best)},
                        self.path("best_model.pt"))

    # -- training ---------------------------------------------------------------------------------------------

    def train(self):
        """Train until stop_acc, patience or num_epoch and return which one ended it; raises NonFiniteLoss when
        the loss diverges."""
        args, progress, train = self.args, self.progress, self.data.splits["train"]
        if self.signals.received is not None:  # arrived while setting up, before anything was trained
            raise StopSignal(self.signals.received)
        self.model.train()
        with logging_redirect_tqdm(loggers=[logging.getLogger(LOGGER_NAME)]):  # log lines above the bar
            while stop_reason(progress, args) is None:
                self.train_epoch(train)
        return stop_reason(progress, args)

    def train_epoch(self, train):
        """The rest of the current epoch (all of it unless resumed mid-epoch), then its end-of-epoch evaluation.

        As in the original: evaluate after every batch whose 0-based index in the epoch is a multiple of
        report_every (so after the first one too), leave the epoch early when an evaluation reaches stop_acc,
        and evaluate once more at the end of the epoch."""
        args, progress = self.args, self.progress
        if progress.order is None:
            progress.order = epoch_order(len(train))
        batches = progress.order.split(args.batch_size)
        remaining = () if stop_acc_reached(progress, args) else range(progress.batch, len(batches))
        with tqdm(total=len(batches), initial=progress.batch, desc=f"epoch {progress.epoch + 1}",
                  disable=not sys.stdout.isatty(), leave=False) as bar:
            for index in remaining:
                last_of_epoch = index == len(batches) - 1
                step_now = last_of_epoch or (index + 1) % args.grad_cummulate == 0
                progress.loss_sum += self.train_batch(train, batches[index], step_now)
                progress.batch, progress.step = index + 1, progress.step + 1
                bar.update()
                self.log_operator_paths()
                if args.report_every > 0 and index % args.report_every == 0:
                    self.evaluate_and_checkpoint(end_of_epoch=False)
                    if stop_acc_reached(progress, args):
                        break
                self.stop_if_signalled()
        self.evaluate_and_checkpoint(end_of_epoch=True)
        self.stop_if_signalled()

    def stop_if_signalled(self):
        if self.signals.received is not None:
            self.save_latest()
            raise StopSignal(self.signals.received)

    def log_operator_paths(self):
        """Once, after the first batch: which code computed each fast-weight operator (kernel or reference)."""
        if not self.paths_logged:
            self.paths_logged = True
            for name, path in sorted(kernel_loader.operator_paths().items()):
                self.log(f"Operator {name}: {path}")

    def train_batch(self, split, indices, optimizer_step):
        with out_of_memory_in("in a training step"):
            loss = batch_loss(self.model, split, indices.to(self.device), self.data.tgt_pad)
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"the training loss is {loss.item()} at epoch {self.progress.epoch + 1}, "
                                    f"step {self.progress.step + 1}")
            loss.backward()
            if optimizer_step:
                update_weights(self.model, self.optimizer, self.args.clip)
            return loss.item()

    def evaluate_and_checkpoint(self, end_of_epoch):
        """Evaluate valid and valid2, log them, keep the best model and write latest_model.pt."""
        progress, log = self.progress, self.log
        epoch, batch_index = progress.epoch + 1, progress.batch - 1
        train_loss = progress.loss_sum / progress.batch  # mean over the epoch's batches so far
        if end_of_epoch:
            progress.epoch, progress.batch, progress.order, progress.loss_sum = epoch, 0, None, 0.0
        with out_of_memory_in("during evaluation"):
            valid = evaluate(self.model, self.data.splits["valid"], self.data.tgt_pad, EVAL_BATCH_SIZE)
            valid2 = evaluate(self.model, self.data.splits["test"], self.data.tgt_pad, EVAL_BATCH_SIZE)
        progress.elapsed_s = self.elapsed()
        where = f"End epoch {epoch}" if end_of_epoch else f"epoch {epoch} / step {batch_index}"
        log(f"[{now()}] {where} =============")
        log(f"train loss: {train_loss}")
        log(f"valid loss: {valid.loss}")
        log(f"valid acc: {valid.acc:.2f} %")
        log(f"valid2 loss: {valid2.loss}")
        log(f"valid2 acc: {valid2.acc:.2f} %")
        record = {"epoch": epoch, "step": progress.step, "batch": batch_index, "end_of_epoch": end_of_epoch,
                  "train_loss": train_loss, "valid_loss": valid.loss,
                  "valid_acc": valid.acc, "valid2_loss": valid2.loss, "valid2_acc": valid2.acc,
                  "elapsed_s": round(progress.elapsed_s, 3)}
        with open(self.path("metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        progress.evaluations += 1
        if self.wandb is not None:
            self.wandb.log(record, step=progress.step)
        score = progress.last_score = selection_score(valid.acc, valid2.acc)
        if score > progress.best.score:
            progress.best = Best(score, valid.acc, valid2.acc, epoch, progress.step)
            log(f"The best model so far. {score:.2f} % [{valid.acc:.2f} %, {valid2.acc:.2f} %]")
            self.save_best()
            log("Saved.")
        self.save_latest()

    # -- the end ----------------------------------------------------------------------------------------------

    def finish(self, stopped):
        """Report the best checkpoint (its test accuracy and per-length counts on every evaluation split) and write
        final.json; `stopped` says why training ended: stop_acc, patience, num_epoch or non_finite_loss."""
        progress, best, log = self.progress, self.progress.best, self.log
        epochs_begun = progress.epoch + (progress.batch > 0)
        log(f"Ran {epochs_begun} epochs ({progress.step} steps) in {progress.elapsed_s / 60:.2f} min.")
        final = {"best_step": best.step, "best_epoch": best.epoch, "stopped": stopped,
                 "operators": kernel_loader.operator_paths(), "code": self.code}
        if not os.path.exists(self.path("best_model.pt")):
            # Any evaluation above 0 % would have saved one: every string of every evaluation was wrong.
            log("No evaluation scored above 0 %, so there is no best model; reporting 0 %.")
            final.update(valid_acc=0.0, valid2_acc=0.0, test_acc=0.0, by_length={})
        else:
            log(f"Best validation acc: {best.score:.2f} % [{best.valid_acc:.2f} %, {best.valid2_acc:.2f} %] "
                f"at epoch: {best.epoch} (step {best.step})")
            best_path = self.path("best_model.pt")
            load_weights(self.model, load_checkpoint(best_path, BEST_KEYS, self.device)["model"], best_path)
            with out_of_memory_in("during evaluation"):
                results = {name: evaluate(self.model, split, self.data.tgt_pad, EVAL_BATCH_SIZE)
                           for name, split in self.data.splits.items() if name != "train"}
            final.update(valid_acc=results["valid"].acc, valid2_acc=results["test"].acc,
                         test_acc=results["test"].acc,
                         by_length={name: {str(length): counts for length, counts in result.by_length.items()}
                                    for name, result in results.items()})
        log(f"Final model test acc: {final['test_acc']:.2f} %")
        if self.wandb is not None:
            self.wandb.summary.update({"test_acc": final["test_acc"], "best_epoch": best.epoch,
                                       "best_step": best.step})
        write_text_atomic(self.path("final.json"), json.dumps(final, indent=2) + "\n")


def now():
    return datetime.now().strftime("%Y/%m/%d %H:%M:%S")


def code_version(repo=os.path.dirname(os.path.abspath(__file__))):
    """The git commit this code is at, so that a run can be traced to the code that made it (kernels change
    results at the level of float rounding)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        # results/ holds runs (this one's, perhaps): their files change without the code changing.
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                  ":(exclude)results"], cwd=repo, capture_output=True, text=True, timeout=10,
                                 check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return f"git {commit}" + (" with uncommitted changes" if changed else "")


# ---------------------------------------------------------------------------------------------------------------


def prepare(argv, run_dir_lock):
    """Flags, device, data and run directory, which `run_dir_lock` takes; raises UsageError for anything wrong
    before training."""
    args = parse_flags(argv)
    resuming = args.resume is not None
    if resuming:  # first: everything after may rewrite its files
        run_dir_lock.take(args.resume)
    check_flags(args)
    device = resolve_device(args.device)
    if resuming:
        run_dir = args.resume
        if not os.path.isfile(os.path.join(run_dir, "latest_model.pt")):
            raise UsageError(no_checkpoint_message(run_dir, args))
    with out_of_memory_in("while loading data"):
        dataset = load_dataset(args, device)
    if not resuming:
        run_dir = new_run_dir(args)
        run_dir_lock.take(run_dir)
    return args, run_dir, dataset, device, resuming


def start_run(args, run_dir, dataset, device, resuming):
    """The Run, restored when resuming and connected to wandb when asked; raises UsageError (and removes the run
    directory it has just created) when it cannot start."""
    args.resume = None  # args.json and wandb's config describe the run, not how it was last started
    finished = resuming and os.path.exists(os.path.join(run_dir, "final.json"))
    try:
        with out_of_memory_in("while setting up the model"):
            run = Run(args, run_dir, dataset, device, resuming)
        if finished and stop_reason(run.progress, args) is not None:
            raise UsageError(f"{run_dir} has already finished (final.json); raise --num_epoch (or --stop_acc, "
                             f"--patience) to train it further")
        if args.use_wandb:
            run.start_wandb()
    except UsageError:
        close_logging()
        if not resuming:
            shutil.rmtree(run_dir)
        raise
    if finished:
        os.remove(run.path("final.json"))  # training continues: the run is no longer finished
    if resuming:
        truncate_metrics(run.path("metrics.jsonl"), run.progress.evaluations)
    write_args(run_dir, args)
    return run


def as_stop_signal(exc):
    """A KeyboardInterrupt is a Ctrl-C where main() could not install its handlers (main() called from another
    thread than the main one): an immediate SIGINT."""
    return exc if isinstance(exc, StopSignal) else StopSignal(signal.SIGINT, at_once=True)


def no_checkpoint_message(run_dir, args):
    """Why --resume RUN_DIR has nothing to resume, and the command that starts the run again. A lone
    latest_model.pt.tmp is a first checkpoint whose writing was killed (save_checkpoint renames it when complete)."""
    why = ("it was killed while writing its first checkpoint (only latest_model.pt.tmp, incomplete)"
           if os.path.exists(os.path.join(run_dir, "latest_model.pt.tmp")) else "it has no latest_model.pt")
    flags = []
    for name, value in vars(args).items():
        if name != "resume" and value not in (None, False):
            flags += [f"--{name}"] + ([] if value is True else [str(value)])
    return f"{run_dir}: nothing to resume, {why}; start the run again with: python main.py {shlex.join(flags)}"


def stop_message(run_dir, stop, step, argv):
    """What was kept when signal `stop` ended the run after `step` steps (None: before training), and the command
    that carries on."""
    when = ("before training started" if step is None else "before the first training step" if step == 0
            else f"after step {step}")
    if run_dir is not None and os.path.exists(os.path.join(run_dir, "latest_model.pt")):
        kept = ("latest_model.pt holds this point" if step is not None and not stop.at_once
                else "latest_model.pt is the last checkpoint")
        return f"Stopped by {stop} {when} ({kept}). Continue with: python main.py --resume {run_dir}"
    return (f"Stopped by {stop} {when}, before the first checkpoint: there is nothing to resume. Start again with: "
            f"python main.py {shlex.join(argv)}")


def train_and_report(run, argv, resuming):
    """Train, write final.json and return the exit status; a signal leaves a resumable run directory."""
    run.log_header(argv, resuming)
    exit_code, interrupted, out_of_memory = 0, False, None
    try:
        run.log(f"[{now()}] Start training")
        with out_of_memory_in("during training"):  # where no narrower part of the run has said so
            try:
                stopped = run.train()
            except NonFiniteLoss as exc:
                run.log(f"Stopping: {exc}; reporting the best checkpoint so far.")
                stopped, exit_code = "non_finite_loss", EXIT_DIVERGED
            run.finish(stopped)
        if run.signals.received is not None:  # it came during the final evaluation, which was let finish
            run.log(f"{signal.Signals(run.signals.received).name} arrived during the final evaluation: the run "
                    f"finished first (final.json).")
    except (StopSignal, KeyboardInterrupt) as exc:
        stop = as_stop_signal(exc)
        exit_code, interrupted = 128 + stop.signum, True
        run.log(stop_message(run.run_dir, stop, run.progress.step, argv))
    except CheckpointError as exc:  # a full disk, or a best_model.pt that cannot be opened safely
        print(f"error: {exc}", file=sys.stderr, flush=True)
        exit_code = EXIT_USAGE
    except OutOfMemory as exc:
        out_of_memory, exit_code = str(exc), EXIT_OUT_OF_MEMORY
    finally:
        run.finish_wandb(exit_code)
        close_logging()
    if out_of_memory is not None:
        return report_out_of_memory(out_of_memory, run.run_dir, resuming)
    if interrupted and not resuming and not os.path.exists(run.path("latest_model.pt")):
        shutil.rmtree(run.run_dir)  # stopped before anything was trained: nothing in it is worth keeping
    return exit_code


def report_out_of_memory(message, run_dir, resuming):
    """Print OutOfMemory's one error line and return its exit status. Called once the exception is gone: its
    traceback held the frames of what ran out (the loader's token lists and tensors, a step's activations), and
    collecting them first gives the memory back before anything else is done. A new run directory without a
    checkpoint is removed; one with latest_model.pt (a resumed run's always) keeps it."""
    gc.collect()  # a traceback and its frames can form reference cycles
    close_logging()
    if run_dir is not None and not resuming and not os.path.exists(os.path.join(run_dir, "latest_model.pt")):
        shutil.rmtree(run_dir, ignore_errors=True)
    elif run_dir is not None:
        message += f"; {run_dir} keeps its latest_model.pt (python main.py --resume {run_dir} continues it)"
    print(f"error: {message}", file=sys.stderr, flush=True)
    return EXIT_OUT_OF_MEMORY


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    with SignalCatcher() as signals, RunDirLock() as run_dir_lock:
        try:
            return set_up_and_train(argv, signals, run_dir_lock)
        except StopSignal as stop:  # a further signal while the first one's stop was being handled: at once
            return 128 + stop.signum


def set_up_and_train(argv, signals, run_dir_lock):
    """The run of `argv` and its exit status; a signal before training starts ends it with nothing kept."""
    run_dir = resuming = out_of_memory = None
    try:
        signals.stop_if_received()  # noted while Python imported torch and the rest
        args, run_dir, dataset, device, resuming = prepare(argv, run_dir_lock)
        signals.stop_if_received()
        run = start_run(args, run_dir, dataset, device, resuming)
    except (UsageError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (StopSignal, KeyboardInterrupt) as exc:  # while setting up: nothing was trained
        stop = as_stop_signal(exc)
        close_logging()
        if run_dir is not None and not resuming:
            shutil.rmtree(run_dir, ignore_errors=True)
        print(stop_message(run_dir if resuming else None, stop, None, argv), file=sys.stderr, flush=True)
        return 128 + stop.signum
    except OutOfMemory as exc:
        out_of_memory = str(exc)
    if out_of_memory is not None:  # reported outside the `except`: see report_out_of_memory
        return report_out_of_memory(out_of_memory, run_dir, resuming)
    run.signals = signals
    return train_and_report(run, argv, resuming)


if __name__ == "__main__":
    status = main()
    if status >= 128:
        # Stopped by a signal, with everything written and closed: skip the interpreter's teardown of torch's
        # modules, which takes seconds of CPU on a busy machine while a scheduler's grace period runs out.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
