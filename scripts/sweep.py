"""Run (task, model, seed) configurations from scripts/hparams.csv on Ray, one main.py run each.

    python scripts/sweep.py --tasks parity reset_dyck                  # all seven models, seed 1
    python scripts/sweep.py --tasks parity --models 7 12 --seeds 1 2 --extra "--num_epoch 3"
    python scripts/sweep.py --address auto ...                         # an existing Ray cluster
    python scripts/sweep.py --no_ray --parallel 8 ...                  # no Ray: 8 runs at a time, here

Every configuration owns the folder `<work_dir>/<task>/<model-slug>-seed<seed>/`: main.py creates its run
directory inside it, and the run's console output goes to `run.log` there. Re-launching is safe: a
configuration whose run has final.json is skipped, one with latest_model.pt is resumed, the rest start
afresh; a folder whose run was started with other flags than the command now gives is an error, not a skip.
A configuration whose run directory a main.py started elsewhere is working on (another sweep, a person's
--resume) is left to it and reported as in use; the sweep then exits with status 1.
With --address, the repository and --work_dir must be at the same paths on every node (a shared file system),
since runs are launched from there and write there.
"""
import argparse
import concurrent.futures
import contextlib
import os
import shlex
import shutil
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import experiment  # first: it puts the repository root on sys.path
from data import ALL_TASKS, write_task
from experiment import PID_FILE, REPO_ROOT, RUN_LOG, ExperimentError
from main import EXIT_USAGE
from model import MODEL_NAMES, MODEL_SLUGS

# The sweep decides these per configuration; letting --extra change them would break the folder layout.
MANAGED_FLAGS = ("--data_dir", "--work_dir", "--seed", "--resume")
RAY_MISSING = "sweep.py needs Ray, which is not installed: pip install -r requirements-sweep.txt"
# How long the cluster of --address has to accept a connection. ray.init alone retries an address where nothing
# answers for minutes (20 tries of up to 40 s each) before it raises.
CLUSTER_CONNECT_TIMEOUT_S = 10


@dataclass(frozen=True)
class Config:
    task: str
    model_type: int
    seed: int
    hparams: experiment.HParams

    @property
    def label(self):
        return f"{self.task} {MODEL_NAMES[self.model_type]} seed {self.seed}"

    def folder(self, work_dir):
        return Path(work_dir) / self.task / f"{MODEL_SLUGS[self.model_type]}-seed{self.seed}"


def select_configs(table, tasks, models, seeds):
    """The configurations to run, in csv order; None for tasks/models means all of the csv's."""
    for task in tasks or ():
        if not any(t == task for t, _ in table):
            raise ExperimentError(f"no row for task {task!r} in the hparams csv")
    for model_type in models or ():
        if model_type not in MODEL_NAMES:
            raise ExperimentError(f"unknown model type {model_type}; choose from {sorted(MODEL_NAMES)}")
    keys = [(t, m) for t, m in table if (not tasks or t in tasks) and (not models or m in models)]
    if not keys:
        raise ExperimentError("no hparams row matches the chosen tasks and models")
    return [Config(t, m, seed, table[(t, m)]) for t, m in keys for seed in seeds]


def plan(folder):
    """('skip' | 'resume' | 'start', run dir or None, stale run dirs that hold no checkpoint)."""
    dirs = experiment.run_dirs(folder)
    finished = [d for d in dirs if experiment.is_finished(d)]
    if finished:
        return "skip", finished[-1], []
    resumable = [d for d in dirs if experiment.has_checkpoint(d)]
    if resumable:
        return "resume", resumable[-1], []
    return "start", None, dirs


def train_args(config, folder, data_root, extra):
    """main.py's flags for a configuration: its data under data_root, its run directory in `folder`, `extra` last."""
    return experiment.main_args(config.task, config.model_type, config.hparams, config.seed,
                                ["--data_dir", str(Path(data_root) / config.task), "--work_dir", str(folder), *extra])


def thread_env(cpus_per_run):
    """Environment variables that keep one run on its share of the CPUs."""
    n = str(cpus_per_run)
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}


def prepare_data(tasks, data_root, bins):
    """Generate each missing task dataset once, before the runs start, so parallel runs never race to write it."""
    for task in tasks:
        task_dir = Path(data_root) / task
        if task not in ALL_TASKS:
            continue  # a user's own dataset: nothing to generate, main.py reports it if it is missing
        if (task_dir / "train_50.src").is_file():
            if bins > 1 and not (task_dir / f"bin{bins}_50.src").is_file():
                print(f"note: {task_dir} has no bin{bins}_50 files; the length plot will lack those lengths "
                      f"(delete the folder to regenerate it with --bins {bins})", flush=True)
            continue
        print(f"generating {task_dir} (--bins {bins})", flush=True)
        write_task(task, str(task_dir), bins=bins)


def local_cpus(parallel, cpus_per_run):
    """The CPUs of the local Ray instance: enough for `parallel` runs; None (all of the machine's) without it."""
    return None if parallel is None else parallel * cpus_per_run


def import_ray():
    try:
        import ray
    except ImportError:
        raise ExperimentError(RAY_MISSING) from None
    return ray


def check_cluster_answers(address):
    """Raises ExperimentError unless something accepts a connection where ray.init(address=address) would connect."""
    from ray._private.services import canonicalize_bootstrap_address_or_die

    try:
        # A Ray Client address (ray://HOST:PORT) names its server; Ray resolves the others as ray.init does: "auto"
        # to the cluster of the last `ray start`, localhost to this node's IP, where a cluster of this node listens.
        target = address.split("://", 1)[1] if "://" in address else canonicalize_bootstrap_address_or_die(address)
        host, _, port = target.rpartition(":")
        socket.create_connection((host.strip("[]"), int(port)), timeout=CLUSTER_CONNECT_TIMEOUT_S).close()
    except (OSError, ValueError) as exc:  # OSError: refused, timed out, no such host, or Ray found no cluster
        raise ExperimentError(f"no Ray cluster answers at {address}: {exc}") from None


def start_ray(ray, address, num_cpus=None):
    """Joins the cluster at `address`; without one, starts a private local instance with `num_cpus` CPUs (all of
    the machine's by default). ExperimentError when the cluster does not answer."""
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
        raise ExperimentError(f"cannot join the Ray cluster at {address}: {str(exc).strip().splitlines()[0]}") from None


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
    final = experiment.read_final(run_dir)
    return f"{final['valid_acc']:.2f}/{final['valid2_acc']:.2f} acc"


def last_line(path):
    try:
        lines = [line.strip() for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


FINISHED, FAILED, IN_USE = "finished", "failed", "in use"


def outcome(folder, returncode):
    """(status text, FINISHED | FAILED | IN_USE) for a run that has ended with `returncode`."""
    finished = [d for d in experiment.run_dirs(folder) if experiment.is_finished(d)]
    if returncode == 0 and finished:
        return f"finished ({final_accuracies(finished[-1])})", FINISHED
    in_use = experiment.run_dir_in_use(folder)
    if returncode == EXIT_USAGE and in_use:  # main.py refused: another process took the run directory first
        return experiment.in_use_message(*in_use), IN_USE
    reason = f"exit {returncode}" if returncode else "no final.json"
    log = folder / RUN_LOG
    return f"FAILED, {reason}: {last_line(log)} (log: {log})", FAILED


def raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def stopping_cleanly(own_pid_files, before_stopping=None):
    """Inside: SIGINT and SIGTERM stop the driver's own runs first (stop_runs on what `own_pid_files()` returns
    then), then the driver, by KeyboardInterrupt; a second signal stops the driver at once. Only its own: another
    driver may be running other runs under the same work_dir. `before_stopping()`, if given, is called first (so
    that no new run starts meanwhile). Install after ray.init, which sets handlers of its own."""
    def handler(signum, frame):
        signal.signal(signal.SIGINT, raise_keyboard_interrupt)
        signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
        if before_stopping is not None:
            before_stopping()
        print("Stopping: the running main.py processes save their latest checkpoint...", file=sys.stderr, flush=True)
        experiment.stop_runs(own_pid_files())
        raise KeyboardInterrupt
    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


class Progress:
    """One line per configuration as it ends, `[done/total] label: status`, the labels of those that failed and of
    those left to another process, and the summary line."""

    def __init__(self, total):
        self.total, self.done = total, 0
        self.labels = {FINISHED: [], FAILED: [], IN_USE: []}

    def ended(self, config, status, result):
        self.done += 1
        print(f"[{self.done}/{self.total}] {config.label}: {status}", flush=True)
        self.labels[result].append(config.label)

    def summary(self):
        """The last line and the sweep's exit status: 1 unless every configuration has finished."""
        failed, in_use = self.labels[FAILED], self.labels[IN_USE]
        print(f"{self.total - len(failed) - len(in_use)} of {self.total} configurations finished; {len(failed)} "
              f"failed" + (": " + "; ".join(failed) if failed else "")
              + (f"; {len(in_use)} in use elsewhere: " + "; ".join(in_use) if in_use else ""), flush=True)
        return 1 if failed or in_use else 0


def pid_files(jobs):
    return [folder / PID_FILE for _, folder, _ in jobs]


def launch(ray, jobs, cpus_per_run, progress):
    """Run `jobs` [(config, folder, main.py's flags)] as Ray tasks (Ray initialised), reporting to `progress`.
    Ctrl-C or SIGTERM lets the running main.py save first."""
    experiment.ship_to_workers()
    run_to_end = ray.remote(num_cpus=cpus_per_run)(experiment.run_to_end)
    env = thread_env(cpus_per_run)
    pending = {}
    for config, folder, args in jobs:
        pending[run_to_end.remote(args, folder, env)] = (config, folder)
    with stopping_cleanly(lambda: pid_files(jobs)):
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            config, folder = pending.pop(ref)
            try:
                progress.ended(config, *outcome(folder, ray.get(ref)))
            except ray.exceptions.RayError as exc:
                progress.ended(config, f"FAILED in Ray: {str(exc).strip().splitlines()[0]}", FAILED)


def launch_without_ray(jobs, cpus_per_run, parallel, progress):
    """As launch, with `parallel` runs at a time as child processes of this one (--no_ray: a machine without
    Ray)."""
    env = thread_env(cpus_per_run)
    stopping = threading.Event()

    def run_unless_stopping(args, folder):  # a queued run must not start once a signal has come
        return None if stopping.is_set() else experiment.run_to_end(args, folder, env)

    with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
        pending = {pool.submit(run_unless_stopping, args, folder): (config, folder) for config, folder, args in jobs}
        try:
            with stopping_cleanly(lambda: pid_files(jobs), before_stopping=stopping.set):
                for future in concurrent.futures.as_completed(pending):
                    config, folder = pending[future]
                    progress.ended(config, *outcome(folder, future.result()))
        except KeyboardInterrupt:
            stopping.set()
            pool.shutdown(wait=False, cancel_futures=True)
            experiment.stop_runs(pid_files(jobs))  # a run that started while the first signal was handled
            raise


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
    parser.add_argument("--parallel", type=int, default=None,
                        help="runs at a time on this machine (default: one per --cpus_per_run CPUs)")
    parser.add_argument("--no_ray", action="store_true",
                        help="run the configurations as child processes of this one, without Ray (--parallel at a "
                             "time)")
    parser.add_argument("--dry_run", action="store_true", help="print what would run, run nothing")
    return parser.parse_args(argv)


def make_folders(jobs, stale_dirs):
    """The jobs' configuration folders, without the run directories in `stale_dirs`: those of runs that died before
    their first checkpoint, which cannot be resumed (their console output stays in run.log)."""
    for run_dir in stale_dirs:
        shutil.rmtree(run_dir)
    for _, folder, _ in jobs:
        folder.mkdir(parents=True, exist_ok=True)


def main(argv=None):
    args = parse_args(argv)
    try:
        extra = shlex.split(args.extra)
        clashing = [f for f in extra if f.split("=")[0] in MANAGED_FLAGS]
        if clashing:
            raise ExperimentError(f"--extra may not set {', '.join(clashing)}: the sweep sets it per configuration")
        if args.cpus_per_run < 1 or (args.parallel is not None and args.parallel < 1):
            raise ExperimentError("--cpus_per_run and --parallel must be at least 1")
        if args.address and (args.no_ray or args.parallel is not None):
            raise ExperimentError("--address joins a Ray cluster, which decides how many runs go at a time: "
                                  "leave out --parallel and --no_ray")
        configs = select_configs(experiment.read_hparams(args.csv), args.tasks, args.models, args.seeds)
        ray = None if args.dry_run or args.no_ray else import_ray()
    except ExperimentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    work_dir, data_root = Path(args.work_dir).resolve(), Path(args.data_root).resolve()

    progress, jobs, stale_dirs = Progress(len(configs)), [], []
    for config in configs:
        folder = config.folder(work_dir)
        action, run_dir, stale = plan(folder)
        in_use = action != "skip" and experiment.run_dir_in_use(folder)
        if in_use:  # neither resumed nor deleted as stale (it may not have reached its first checkpoint yet)
            progress.ended(config, experiment.in_use_message(*in_use), IN_USE)
            continue
        differing = run_dir and experiment.differing_flags(run_dir, train_args(config, folder, data_root, extra))
        if differing:  # skipping or resuming it would report, or continue, another configuration than asked
            flags = ", ".join(f"--{flag} {theirs} (now {ours})" for flag, theirs, ours in differing)
            print(f"error: {run_dir} was started with other flags: {flags}; give another --work_dir, or move it "
                  f"away", file=sys.stderr)
            return 2
        if action == "skip":
            progress.ended(config, f"skipped, finished earlier ({final_accuracies(run_dir)})", FINISHED)
            continue
        main_args = (experiment.resume_args(run_dir) if action == "resume"
                     else train_args(config, folder, data_root, extra))
        if args.dry_run:
            env = " ".join(f"{k}={v}" for k, v in thread_env(args.cpus_per_run).items())
            print(f"{config.label}: {env} {shlex.join(experiment.main_command(main_args))}")
            continue
        jobs.append((config, folder, main_args))
        stale_dirs += stale
    if args.dry_run:
        return 0
    if not jobs:
        return progress.summary() if progress.labels[IN_USE] else 0

    parallel = args.parallel or max(1, (os.cpu_count() or 1) // args.cpus_per_run)
    try:
        if args.no_ray:
            make_folders(jobs, stale_dirs)
            prepare_data(sorted({config.task for config, _, _ in jobs}), data_root, args.bins)
            launch_without_ray(jobs, args.cpus_per_run, parallel, progress)
        else:
            # first: a cluster that does not answer ends the sweep at once, with nothing created
            with ray_running(ray, args.address, local_cpus(args.parallel, args.cpus_per_run)):
                make_folders(jobs, stale_dirs)
                prepare_data(sorted({config.task for config, _, _ in jobs}), data_root, args.bins)
                launch(ray, jobs, args.cpus_per_run, progress)
    except ExperimentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("Interrupted: the running configurations saved their latest checkpoint; run the same command again "
              "to continue.", file=sys.stderr, flush=True)
        return 130
    return progress.summary()


if __name__ == "__main__":
    sys.exit(main())
