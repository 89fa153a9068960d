"""The scripts' one way to describe, start and read a run of main.py.

- What a run is given: `HParams` (a row of hparams.csv), `read_hparams` / `write_hparams` (that file format) and
  `main_args`, main.py's flags for a task, model, hyper-parameters, seed and extra flags: those of
  scripts/train.sh, the original's script, which stays for people to type.
- How it starts: `main_running` / `run_to_end` start main.py as scripts/train.sh does, its output in `run.log` below
  a header line and its process id in `main.pid` while it runs; `stop_runs` lets running ones save and exit.
- What it leaves: `run_dirs`, `latest_run_dir`, `read_metrics`, `read_final`, `best_evaluation`, with the score of
  utils.selection_score (main.py's own choice of the best checkpoint); `run_dir_in_use`, a run directory that a
  main.py still works on (its utils.RUN_LOCK), which a script leaves alone.

Ray workers get the functions of this module by value (`ship_to_workers`): a worker cannot import it by name.
"""
import contextlib
import csv
import ctypes
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

# `python scripts/x.py` puts scripts/ on sys.path, not the repository root with data.py, model.py, utils.py and
# main.py, which every script needs. This is the one place that adds it, so every script imports this module first.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import utils  # noqa: E402
from model import MODELS  # noqa: E402
from utils import RUN_LOCK, lock_holder, selection_score  # noqa: E402

RUN_LOG = "run.log"
# Holds the process id of a run's main.py while it runs, beside RUN_LOG, so that an interrupted sweep or search can
# let it save before Ray ends the workers.
PID_FILE = "main.pid"


class ExperimentError(Exception):
    """A problem with a script's inputs; the message is one user-readable line."""


# ---------------------------------------------------------------------------------------------------------------
# What a run is given


@dataclass(frozen=True)
class HParams:
    """What main.py is given for a (task, model) cell besides the task, the model and the seed."""
    num_layer: int
    hidden_size: int
    n_head: int
    ff_factor: int
    batch_size: int
    learning_rate: str  # as written ("1e-3"): so it stands in command lines and trial names
    num_epoch: int


HPARAM_COLUMNS = ("task", "model_type") + tuple(f.name for f in fields(HParams))


def main_args(task, model_type, hparams, seed, extra=()):
    """main.py's flags for one run: scripts/train.sh's, in its order, with these values, then `extra`, which override
    them (argparse keeps a flag's last value). Relative paths are relative to the repository root, where runs start."""
    return ["--data_dir", f"data/{task}", "--level", "50", "--model_type", str(model_type),
            "--num_layer", str(hparams.num_layer), "--hidden_size", str(hparams.hidden_size),
            "--n_head", str(hparams.n_head), "--ff_factor", str(hparams.ff_factor), "--dropout", "0.0",
            "--batch_size", str(hparams.batch_size), "--learning_rate", hparams.learning_rate, "--seed", str(seed),
            "--grad_cummulate", "1", "--num_epoch", str(hparams.num_epoch), "--report_every", "50",
            "--project_name", "2023--formal-lang", "--remove_pos_enc", *extra]


def resume_args(run_dir):
    # main.py takes every other flag from the run's args.json.
    return ["--resume", str(run_dir)]


def parse_hparams(row, where):
    """The HParams of one csv row ({column: text}); `where` names the row in the error message."""
    values = {}
    for field in fields(HParams):
        text = row[field.name].strip()
        if field.type is int and not text.isdigit():
            raise ExperimentError(f"{where}: {field.name} must be a whole number, got {text!r}")
        values[field.name] = int(text) if field.type is int else text
    return HParams(**values)


def read_hparams(path):
    """{(task, model_type): HParams} of an hparams csv (scripts/hparams.csv, scripts/hparams_searched.csv), in file
    order."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in HPARAM_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ExperimentError(f"{path}: missing column(s) {', '.join(missing)}")
            rows = list(reader)
    except OSError as exc:
        raise ExperimentError(f"cannot read {path}: {exc.strerror}") from None
    table = {}
    for line_no, row in enumerate(rows, start=2):
        model_type = row["model_type"].strip()
        if not model_type.isdigit() or int(model_type) not in MODELS:
            raise ExperimentError(f"{path} line {line_no}: model_type must be one of {sorted(MODELS)}, "
                                  f"got {row['model_type']!r}")
        key = (row["task"].strip(), int(model_type))
        if key in table:
            raise ExperimentError(f"{path} line {line_no}: a second row for task {key[0]} model_type {key[1]}")
        table[key] = parse_hparams(row, f"{path} line {line_no}")
    return table


def write_hparams(path, table):
    """Writes {(task, model_type): HParams} as an hparams csv that read_hparams reads back, rows in table order."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, HPARAM_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for (task, model_type), hparams in table.items():
            writer.writerow({"task": task, "model_type": model_type, **asdict(hparams)})


# ---------------------------------------------------------------------------------------------------------------
# How a run starts


def main_command(args):
    """The command that runs main.py with `args`. The interpreter is the one running this code: in a Ray worker the
    worker's (on a local instance the driver's, on a cluster the one the node runs Ray with), not the PATH's
    `python`, which may lack torch."""
    return [sys.executable, "main.py", *args]


def main_environment(overrides):
    """The environment main.py runs in: this process's with `overrides`, and scripts/train.sh's defaults."""
    env = dict(os.environ, **overrides)
    env.setdefault("CUDA_VISIBLE_DEVICES", "0")  # the original pinned GPU 0; the caller's (or Ray's) choice stays
    if not env.get("TORCH_EXTENSIONS_DIR"):  # the compiled kernels' cache: they build once, not once per run
        cache = env.get("XDG_CACHE_HOME") or f"{env.get('HOME', '')}/.cache"
        env["TORCH_EXTENSIONS_DIR"] = f"{cache}/torch_extensions/formal_lang"
    return env


def stop_with_parent():
    """Run in main.py's process before it starts: the kernel sends it SIGTERM when the thread that started it (a Ray
    worker's) ends, so that main.py never outlives a worker that dies. (An interrupted driver's stop_runs has let
    main.py save first: Ray ends its workers outright.)"""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


@contextlib.contextmanager
def main_running(args, folder, env_overrides):
    """Inside: main.py with `args`, started from the repository root in main_environment(env_overrides); its output
    is appended to folder/run.log below a line with the time and the command, its process id is in folder/main.pid.
    On the way out, a main.py still running gets SIGTERM (it saves its latest checkpoint and exits) and is waited
    for, and main.pid goes."""
    folder = Path(folder)
    command = main_command(args)
    with open(folder / RUN_LOG, "a") as log:
        log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n")
        log.flush()
        # A session of its own: a Ctrl-C at the terminal, or a SIGTERM to the whole process group (timeout, a
        # batch scheduler), reaches the driver alone, which lets each run save (stop_runs). Reaching main.py too,
        # it would be followed by the driver's SIGTERM, and a second signal stops main.py at once, unsaved.
        proc = subprocess.Popen(command, cwd=REPO_ROOT, env=main_environment(env_overrides), stdout=log,
                                stderr=subprocess.STDOUT, preexec_fn=stop_with_parent, start_new_session=True)
    pid_file = folder / PID_FILE
    pid_file.write_text(f"{proc.pid}\n")
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait()
        pid_file.unlink(missing_ok=True)


def run_to_end(args, folder, env_overrides):
    """main.py's exit status, once the run main_running starts has ended."""
    with main_running(args, folder, env_overrides) as proc:
        return proc.wait()


def running_main_py(pid_file):
    """The pid in pid_file if it is still the main.py of that folder (not a process that reused the number)."""
    try:
        pid = int(pid_file.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, ValueError, IndexError):
        return None
    return pid if "main.py" in cmdline and str(pid_file.parent) in cmdline and state != "Z" else None


def stop_runs(pid_files, timeout=120.0):
    """Sends SIGTERM to the main.py of each pid file that is still running, and waits until they have saved and
    exited. Left to Ray, they would be killed when the driver ends and lose the batches since their last
    evaluation."""
    pid_files = list(pid_files)
    for pid_file in pid_files:
        pid = running_main_py(pid_file)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(running_main_py(p) is not None for p in pid_files):
        time.sleep(0.2)


def ship_to_workers(*modules):
    """Has Ray send the functions of `modules`, of this module and of utils (selection_score) to its workers by value.
    A worker imports by name only from its driver's script folder and working directory (what Ray puts on its
    sys.path), which need not hold scripts/ or the repository root. Only functions: code that Ray ships must name
    them, not reach them through a module object, which would travel whole (with model.py's registry, which a
    worker cannot import)."""
    from ray import cloudpickle
    for module in (*modules, sys.modules[__name__], utils):
        cloudpickle.register_pickle_by_value(module)


# ---------------------------------------------------------------------------------------------------------------
# What a run leaves: its run directory


def run_dirs(folder):
    """main.py's run directories inside `folder` (a --work_dir), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [d for d in folder.iterdir() if (d / "args.json").is_file()]
    return sorted(found, key=lambda d: (d / "args.json").stat().st_mtime)


def run_dir_in_use(folder):
    """(run directory, process id) of a run directory in `folder` that a running main.py holds, else None. main.py
    refuses a second process on it (exit status 2) before writing anything there; a script does not delete it as
    stale or start it again, and says who has it."""
    for run_dir in run_dirs(folder):
        pid = lock_holder(run_dir / RUN_LOCK)
        if pid is not None:
            return run_dir, pid
    return None


def in_use_message(run_dir, pid):
    return (f"{run_dir} is in use by process {pid} (a main.py started elsewhere); left to it: run the same command "
            f"again once it has ended")


def main_py_error(folder):
    """The `error:` line main.py wrote (without the prefix) in the last session of folder/run.log, or None: it
    never wrote one (it was killed, interrupted, or never started)."""
    try:
        text = (Path(folder) / RUN_LOG).read_text(errors="replace")
    except OSError:
        return None
    last_session = re.split(r"^==== ", text, flags=re.MULTILINE)[-1]  # main_running's line before each start
    errors = [line for line in last_session.splitlines() if line.startswith("error: ")]
    return errors[-1][len("error: "):] if errors else None


def latest_run_dir(folder):
    """The newest run directory in `folder`, or None."""
    dirs = run_dirs(folder)
    return dirs[-1] if dirs else None


def is_finished(run_dir):
    return run_dir is not None and (Path(run_dir) / "final.json").is_file()


def has_checkpoint(run_dir):
    """Whether main.py can resume the run (latest_model.pt)."""
    return run_dir is not None and (Path(run_dir) / "latest_model.pt").is_file()


def read_metrics(run_dir):
    """The evaluations in run_dir/metrics.jsonl, oldest first ([] without the file). A last line that does not parse
    and has no newline yet is one main.py is still writing: left out. Any other line that does not parse is corrupt:
    reported (file and line number) and skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    records = []
    if not path.is_file():
        return records
    text = path.read_text()
    lines = text.splitlines()
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as exc:
            if line_no < len(lines) or text.endswith("\n"):
                print(f"warning: {path} line {line_no}: not a JSON record, skipped ({exc})", file=sys.stderr,
                      flush=True)
    return records


# Where a run's data and run directory are does not make it another run (a folder can move); --resume is how it
# was last started, not what it is.
FLAGS_NOT_COMPARED = ("data_dir", "work_dir", "resume")


def differing_flags(run_dir, args):
    """[(flag, the run's value, args' value)] for each flag that main.py `args` set otherwise than run_dir's
    args.json holds; a flag the args.json predates is not compared (main.py gives it its default on a resume)."""
    import main  # here, not at the top: Ray workers get this module by value and cannot import main.py
    ours = vars(main.build_parser().parse_args(args))
    theirs = json.loads((Path(run_dir) / "args.json").read_text())
    return [(flag, theirs[flag], value) for flag, value in ours.items()
            if flag not in FLAGS_NOT_COMPARED and flag in theirs and theirs[flag] != value]


def read_final(run_dir):
    """final.json of a finished run (best checkpoint's accuracies, per-length counts, ...), None before the end."""
    path = Path(run_dir) / "final.json"
    return json.loads(path.read_text()) if path.is_file() else None


def evaluation_score(record):
    return selection_score(record["valid_acc"], record["valid2_acc"])


def best_evaluation(records):
    """The evaluation with the highest score, the earliest of equals (main.py's best checkpoint); None for none."""
    return max(records, key=evaluation_score, default=None)
