"""Run (task, model, seed) configurations from scripts/hparams.csv on Ray, one main.py run each.

    python scripts/sweep.py --tasks parity reset_dyck                  # all seven models, seed 1
    python scripts/sweep.py --tasks parity --models 7 12 --seeds 1 2 --extra "--num_epoch 3"
    python scripts/sweep.py --address auto ...                         # an existing Ray cluster

Every configuration owns the folder `<work_dir>/<task>/<model-slug>-seed<seed>/`: main.py creates its run
directory inside it, and the run's console output goes to `run.log` there. Re-launching is safe: a
configuration whose run has final.json is skipped, one with latest_model.pt is resumed, the rest start
afresh. With --address, the repository and --work_dir must be at the same paths on every node (a shared
file system), since runs are launched from there and write there.
"""
import argparse
import contextlib
import csv
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from data import TASKS, write_task  # noqa: E402
from model import MODEL_NAMES, MODEL_SLUGS  # noqa: E402

HPARAM_COLUMNS = ("task", "model_type", "num_layer", "hidden_size", "n_head", "ff_factor", "batch_size",
                  "learning_rate", "num_epoch")
# The sweep decides these per configuration; letting --extra change them would break the folder layout.
MANAGED_FLAGS = ("--data_dir", "--work_dir", "--seed", "--resume")
RUN_LOG = "run.log"
# Holds the process id of a run's main.py while it runs, beside RUN_LOG, so that an interrupted sweep or search can
# let it save before Ray ends the workers.
PID_FILE = "main.pid"
TRAIN_SCRIPT = REPO_ROOT / "scripts" / "train.sh"
RAY_MISSING = "sweep.py needs Ray, which is not installed: pip install -r requirements-sweep.txt"
# How long the cluster of --address has to accept a connection. ray.init alone retries an address where nothing
# answers for minutes (20 tries of up to 40 s each) before it raises.
CLUSTER_CONNECT_TIMEOUT_S = 10


class SweepError(Exception):
    """A problem with the sweep's inputs; the message is one user-readable line."""


@dataclass(frozen=True)
class Config:
    task: str
    model_type: int
    seed: int
    hparams: dict  # one hparams.csv row, values as written

    @property
    def label(self):
        return f"{self.task} {MODEL_NAMES[self.model_type]} seed {self.seed}"

    def folder(self, work_dir):
        return Path(work_dir) / self.task / f"{MODEL_SLUGS[self.model_type]}-seed{self.seed}"


def read_hparams(path):
    """hparams.csv as {(task, model_type): row}."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in HPARAM_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise SweepError(f"{path}: missing column(s) {', '.join(missing)}")
            rows = list(reader)
    except OSError as exc:
        raise SweepError(f"cannot read {path}: {exc.strerror}") from None
    table = {}
    for line_no, row in enumerate(rows, start=2):
        if not row["model_type"].strip().isdigit() or int(row["model_type"]) not in MODEL_NAMES:
            raise SweepError(f"{path} line {line_no}: model_type must be one of {sorted(MODEL_NAMES)}, "
                             f"got {row['model_type']!r}")
        key = (row["task"].strip(), int(row["model_type"]))
        if key in table:
            raise SweepError(f"{path} line {line_no}: a second row for task {key[0]} model_type {key[1]}")
        table[key] = {c: row[c].strip() for c in HPARAM_COLUMNS}
    return table


def select_configs(table, tasks, models, seeds):
    """The configurations to run, in csv order; None for tasks/models means all of the csv's."""
    for task in tasks or ():
        if not any(t == task for t, _ in table):
            raise SweepError(f"no row for task {task!r} in the hparams csv")
    for model_type in models or ():
        if model_type not in MODEL_NAMES:
            raise SweepError(f"unknown model type {model_type}; choose from {sorted(MODEL_NAMES)}")
    keys = [(t, m) for t, m in table if (not tasks or t in tasks) and (not models or m in models)]
    if not keys:
        raise SweepError("no hparams row matches the chosen tasks and models")
    return [Config(t, m, seed, table[(t, m)]) for t, m in keys for seed in seeds]


def run_dirs(folder):
    """main.py's run directories inside a configuration folder, oldest first."""
    if not folder.is_dir():
        return []
    found = [d for d in folder.iterdir() if (d / "args.json").is_file()]
    return sorted(found, key=lambda d: (d / "args.json").stat().st_mtime)


def plan(folder):
    """('skip' | 'resume' | 'start', run dir or None, stale run dirs that hold no checkpoint)."""
    dirs = run_dirs(folder)
    finished = [d for d in dirs if (d / "final.json").is_file()]
    if finished:
        return "skip", finished[-1], []
    resumable = [d for d in dirs if (d / "latest_model.pt").is_file()]
    if resumable:
        return "resume", resumable[-1], []
    return "start", None, dirs


def train_command(config, folder, data_root, extra):
    """scripts/train.sh (the paper's fixed flags) with this configuration's values; `extra` comes last."""
    h = config.hparams
    return (["bash", str(TRAIN_SCRIPT), config.task, str(config.model_type), h["num_layer"], h["hidden_size"],
             h["n_head"], h["ff_factor"], h["batch_size"], h["learning_rate"],
             "--num_epoch", h["num_epoch"], "--seed", str(config.seed),
             "--data_dir", str(Path(data_root) / config.task), "--work_dir", str(folder)] + extra)


def resume_command(run_dir):
    # main.py takes every other flag from the run's args.json.
    return ["bash", str(TRAIN_SCRIPT), "--resume", str(run_dir)]


def thread_env(cpus_per_run):
    """Environment variables that keep one run on its share of the CPUs."""
    n = str(cpus_per_run)
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}


def prepare_data(tasks, data_root, bins):
    """Generate each missing task dataset once, before the runs start, so parallel runs never race to write it."""
    for task in tasks:
        task_dir = Path(data_root) / task
        if task not in TASKS:
            continue  # a user's own dataset: nothing to generate, main.py reports it if it is missing
        if (task_dir / "train_50.src").is_file():
            if bins > 1 and not (task_dir / f"bin{bins}_50.src").is_file():
                print(f"note: {task_dir} has no bin{bins}_50 files; the length plot will lack those lengths "
                      f"(delete the folder to regenerate it with --bins {bins})", flush=True)
            continue
        print(f"generating {task_dir} (--bins {bins})", flush=True)
        write_task(task, str(task_dir), bins=bins)


def import_ray():
    try:
        import ray
    except ImportError:
        raise SweepError(RAY_MISSING) from None
    return ray


def check_cluster_answers(address):
    """Raises SweepError unless something accepts a connection where ray.init(address=address) would connect."""
    from ray._private.services import canonicalize_bootstrap_address_or_die

    try:
        # A Ray Client address (ray://HOST:PORT) names its server; Ray resolves the others as ray.init does: "auto"
        # to the cluster of the last `ray start`, localhost to this node's IP, where a cluster of this node listens.
        target = address.split("://", 1)[1] if "://" in address else canonicalize_bootstrap_address_or_die(address)
        host, _, port = target.rpartition(":")
        socket.create_connection((host.strip("[]"), int(port)), timeout=CLUSTER_CONNECT_TIMEOUT_S).close()
    except (OSError, ValueError) as exc:  # OSError: refused, timed out, no such host, or Ray found no cluster
        raise SweepError(f"no Ray cluster answers at {address}: {exc}") from None


def start_ray(ray, address, num_cpus=None):
    """Joins the cluster at `address`; without one, starts a private local instance with `num_cpus` CPUs (all of
    the machine's by default). SweepError when the cluster does not answer."""
    if address is None:
        # "local": a new instance even where RAY_ADDRESS, or the record an earlier `ray start` left in Ray's temp
        # folder (ray_current_cluster, still there when that cluster was killed), names another. ray.init()
        # would join that cluster, or wait for minutes on a dead one.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        return
    check_cluster_answers(address)
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    except ConnectionError as exc:
        raise SweepError(f"cannot join the Ray cluster at {address}: {str(exc).strip().splitlines()[0]}") from None


@contextlib.contextmanager
def ray_running(ray, address, num_cpus=None):
    """Inside: Ray is initialised. An instance the caller already has (the tests' one) is used and left running;
    otherwise start_ray's, shut down on the way out."""
    if ray.is_initialized():
        yield
        return
    start_ray(ray, address, num_cpus)
    try:
        yield
    finally:
        ray.shutdown()


def final_accuracies(run_dir):
    with open(Path(run_dir) / "final.json") as f:
        final = json.load(f)
    return f"{final['valid_acc']:.2f}/{final['valid2_acc']:.2f} acc"


def last_line(path):
    try:
        lines = [line.strip() for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def outcome(folder, returncode):
    """(status text, failed?) for a run that has ended with `returncode`."""
    finished = [d for d in run_dirs(folder) if (d / "final.json").is_file()]
    if returncode == 0 and finished:
        return f"finished ({final_accuracies(finished[-1])})", False
    reason = f"exit {returncode}" if returncode else "no final.json"
    log = folder / RUN_LOG
    return f"FAILED, {reason}: {last_line(log)} (log: {log})", True


def raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


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


@contextlib.contextmanager
def stopping_cleanly(own_pid_files):
    """Inside: SIGINT and SIGTERM stop the driver's own runs first (stop_runs on what `own_pid_files()` returns
    then), then the driver, by KeyboardInterrupt; a second signal stops the driver at once. Only its own: another
    driver may be running other runs under the same work_dir. Install after ray.init, which sets handlers of its
    own."""
    def handler(signum, frame):
        signal.signal(signal.SIGINT, raise_keyboard_interrupt)
        signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
        print("Stopping: the running main.py processes save their latest checkpoint...", file=sys.stderr, flush=True)
        stop_runs(own_pid_files())
        raise KeyboardInterrupt
    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def launch(ray, jobs, cpus_per_run, total, done):
    """Run `jobs` [(config, folder, command)] as Ray tasks (Ray initialised); print one progress line as each ends.

    Returns the labels of the configurations that failed. Ctrl-C or SIGTERM lets the running main.py save first.
    """
    # Defined here so that Ray ships it by value: workers need not be able to import this script.
    @ray.remote(num_cpus=cpus_per_run)
    def run_logged(command, log_path, pid_path, env_overrides, cwd):
        env = dict(os.environ, **env_overrides, PYTHON=sys.executable)  # the worker's interpreter runs main.py
        with open(log_path, "a") as log:
            log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n")
            log.flush()
            proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        with open(pid_path, "w") as pid_file:
            pid_file.write(f"{proc.pid}\n")
        try:
            return proc.wait()
        finally:
            os.remove(pid_path)

    env = thread_env(cpus_per_run)
    pending = {}
    for config, folder, command in jobs:
        ref = run_logged.remote(command, str(folder / RUN_LOG), str(folder / PID_FILE), env, str(REPO_ROOT))
        pending[ref] = (config, folder)
    failed = []
    with stopping_cleanly(lambda: [folder / PID_FILE for _, folder, _ in jobs]):
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            config, folder = pending.pop(ref)
            try:
                status, is_failure = outcome(folder, ray.get(ref))
            except ray.exceptions.RayError as exc:
                status, is_failure = f"FAILED in Ray: {str(exc).strip().splitlines()[0]}", True
            done += 1
            print(f"[{done}/{total}] {config.label}: {status}", flush=True)
            if is_failure:
                failed.append(config.label)
    return failed


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", help="tasks to run (default: every task in the csv)")
    parser.add_argument("--models", nargs="+", type=int, help="model type IDs to run (default: all in the csv)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1], help="training seeds (default: 1)")
    parser.add_argument("--csv", default=str(REPO_ROOT / "scripts" / "hparams.csv"), help="hyper-parameter table")
    parser.add_argument("--work_dir", default=str(REPO_ROOT / "results" / "runs"),
                        help="root of the configuration folders")
    parser.add_argument("--data_root", default=str(REPO_ROOT / "data"),
                        help="datasets are read from (and generated in) DATA_ROOT/<task>")
    parser.add_argument("--bins", type=int, default=3, help="length bins of generated datasets (data.py --bins)")
    parser.add_argument("--extra", default="",
                        help='flags appended to every main.py command, e.g. --extra="--num_epoch 3"')
    parser.add_argument("--address", help="address of an existing Ray cluster (default: start a private local "
                                          "instance, whatever RAY_ADDRESS or an earlier `ray start` say)")
    parser.add_argument("--cpus_per_run", type=int, default=1, help="CPUs (and torch threads) per run")
    parser.add_argument("--dry_run", action="store_true", help="print what would run, run nothing")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        extra = shlex.split(args.extra)
        clashing = [f for f in extra if f.split("=")[0] in MANAGED_FLAGS]
        if clashing:
            raise SweepError(f"--extra may not set {', '.join(clashing)}: the sweep sets it per configuration")
        if args.cpus_per_run < 1:
            raise SweepError("--cpus_per_run must be at least 1")
        configs = select_configs(read_hparams(args.csv), args.tasks, args.models, args.seeds)
        ray = None if args.dry_run else import_ray()
    except SweepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    work_dir, data_root = Path(args.work_dir).resolve(), Path(args.data_root).resolve()

    total, done, jobs = len(configs), 0, []
    for config in configs:
        folder = config.folder(work_dir)
        action, run_dir, stale = plan(folder)
        if action == "skip":
            done += 1
            print(f"[{done}/{total}] {config.label}: skipped, finished earlier ({final_accuracies(run_dir)})",
                  flush=True)
            continue
        command = (resume_command(run_dir) if action == "resume"
                   else train_command(config, folder, data_root, extra))
        if args.dry_run:
            env = " ".join(f"{k}={v}" for k, v in thread_env(args.cpus_per_run).items())
            print(f"{config.label}: {env} {shlex.join(command)}")
            continue
        # A run that died before its first checkpoint cannot be resumed; its console output stays in run.log.
        for d in stale:
            shutil.rmtree(d)
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((config, folder, command))
    if args.dry_run or not jobs:
        return 0

    try:
        with ray_running(ray, args.address):  # first: a cluster that does not answer ends the sweep at once
            prepare_data(sorted({config.task for config, _, _ in jobs}), data_root, args.bins)
            failed = launch(ray, jobs, args.cpus_per_run, total, done)
    except SweepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("Interrupted: the running configurations saved their latest checkpoint; run the same command again "
              "to continue.", file=sys.stderr, flush=True)
        return 130
    print(f"{total - len(failed)} of {total} configurations finished; {len(failed)} failed"
          + (": " + "; ".join(failed) if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
