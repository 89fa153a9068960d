"""Search the hyper-parameters of each (task, model) cell with Ray Tune, then train seeds 2 and 3 of the best.

    python scripts/tune.py --tasks parity                      # the seven models of the paper on parity
    python scripts/tune.py --tasks parity dyck-1 --models 2 7  # some cells
    python scripts/tune.py --tasks parity --dry_run            # the trials of each cell and what is done
    python scripts/tune.py --address auto ...                  # an existing Ray cluster (shared file system)

The space of a cell (batch 64, ff_factor 4, dropout 0, report_every 50, seed 1, the flags of scripts/train.sh):
learning rate {3e-4, 1e-3, 3e-3} x layers {1, 2} x (hidden, heads) in {(64, 4), (128, 4), (128, 8)}, i.e. heads of
16 or 32 dimensions; the LSTM and e-LSTM have no heads, so hidden {64, 128}, and the e-LSTM (always one layer)
skips the layers. Every trial is an ordinary main.py run; it reports the best mean of valid and valid2 accuracy
so far at each of main.py's evaluations, and ASHA stops the weaker trials of a cell at 5 and 15 epochs (keeping a
third); a trial also stops once another one of its cell has reached 100 % in fewer steps (it can no longer be
chosen); the others train until 100 % (main.py's stop) or the cap of --epoch_cap epochs. Then seeds 2 and 3 of the
best trial's configuration train to the end, without early stopping (the paper reports seed 1; the two others
show how robust the configuration is); they run alongside the next cell's search, and a cell's summary line is
printed (and its search.json written) as soon as its seeds have ended.

Layout: `<work_dir>/<task>/<model-slug>/<trial>/` per trial (trial `lr1e-3-l2-h64-n4-seed1`) with main.py's run
directory and `run.log`; `<work_dir>/<task>/<model-slug>/search.json` sums the cell up (space, every trial's
status and best score, the chosen configuration, the seeds). Relaunching the same command runs nothing that has
ended: finished trials and those the scheduler stopped (marked by `stopped_by_scheduler.json`) replay their
metrics.jsonl to the scheduler; interrupted ones resume from their latest_model.pt. Two commands may run side by
side on overlapping cells: each locks the cells it works on, and skips a cell the other holds.
"""
import argparse
import json
import logging
import math
import os
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import experiment  # noqa: F401 (first: it puts the repository root on sys.path)
from data import ALL_TASKS, TASKS
from experiment import (PID_FILE, REPO_ROOT, RUN_LOG, ExperimentError, HParams, best_evaluation, evaluation_score,
                        has_checkpoint, in_use_message, is_finished, latest_run_dir, main_args, main_py_error,
                        main_running, read_metrics, resume_args, run_dir_in_use, ship_to_workers)
from main import EXIT_USAGE
from model import MODEL_NAMES, MODEL_SLUGS, MODELS, PAPER_MODELS
from utils import LockHeld, hold_lock
from sweep import import_ray, local_cpus, prepare_data, ray_running, stopping_cleanly, thread_env

LEARNING_RATES = ("3e-4", "1e-3", "3e-3")
LAYERS = (1, 2)
ATTENTION_WIDTHS = ((64, 4), (128, 4), (128, 8))  # (hidden size, heads)
RNN_WIDTHS = ((64, 1), (128, 1))
BATCH_SIZE, FF_FACTOR = 64, 4
SEARCH_SEED, ROBUSTNESS_SEEDS = 1, (2, 3)
ASHA_GRACE_EPOCHS, ASHA_REDUCTION = 5, 3
SUMMARY_FILE = "search.json"
# Written into a trial folder when the scheduler has stopped the trial: its decision is final, so a relaunch (or a
# fresh clone, which has no checkpoints) replays the trial instead of training it again.
STOPPED_MARKER = "stopped_by_scheduler.json"
# Held (flock) by the driver working on a cell, from its search to the end of its seeds. Two drivers on one cell
# would start the same trial twice, two main.py runs writing one run directory; the second one skips the cell.
CELL_LOCK = "tune.lock"


def search_space(model_type, learning_rates=LEARNING_RATES, layers=LAYERS, widths=None):
    """The trials of one cell: dicts of learning_rate, num_layer, hidden_size, n_head, batch_size."""
    spec = MODELS[model_type]
    if widths is None:
        widths = RNN_WIDTHS if spec.recurrent else ATTENTION_WIDTHS
    if spec.one_layer:
        layers = (1,)  # more would be the same trial: the model has one layer whatever --num_layer says
    return [{"learning_rate": lr, "num_layer": n, "hidden_size": h, "n_head": heads, "batch_size": BATCH_SIZE}
            for lr in learning_rates for n in layers for h, heads in widths]


# --around_best: one factor at a time away from the best trial of the grid (the anchor), each factor a ladder of
# steps. The first step of every factor runs; a further step runs once the step before it has ended with a better
# best score than the anchor's or the previous step's (the factor helped). Steps that leave the anchor unchanged
# are skipped. The width step takes one layer whatever the anchor's depth: at hidden 256 a second layer doubles a
# trial's cost (about 175 s per counter-3 epoch for the SRWM at 2 layers, batch 32, on one core), and one layer is
# what the heads-of-32 comparison needs.
AROUND_BEST_LADDERS = (
    ("learning rate", ({"learning_rate": "1e-4"}, {"learning_rate": "3e-5"})),
    ("batch size", ({"batch_size": 32}, {"batch_size": 16})),
    ("width", ({"hidden_size": 256, "n_head": 8, "num_layer": 1},)),
)


def around_best(anchor, ended_score):
    """The trials one factor away from `anchor` (hparams), as far up each ladder as `ended_score(hparams)` allows:
    it gives the best score of a trial that has ended, None for one that has not (or has not run)."""
    trials = []
    for _, ladder in AROUND_BEST_LADDERS:
        to_beat = ended_score(anchor)
        for step in ladder:
            hparams = {**anchor, **step}
            if hparams == anchor:
                continue
            trials.append(hparams)
            score = ended_score(hparams)
            if score is None or to_beat is None or score <= to_beat:
                break
            to_beat = score
    return trials


def unique(values):
    """The distinct values in order of first appearance."""
    distinct = []
    for value in values:
        if value not in distinct:
            distinct.append(value)
    return distinct


def trial_name(hparams, seed):
    # The batch size is named only where it is not the grid's, so that the grid's trial folders keep their names.
    batch = "" if hparams["batch_size"] == BATCH_SIZE else f"-b{hparams['batch_size']}"
    return (f"lr{hparams['learning_rate']}-l{hparams['num_layer']}-h{hparams['hidden_size']}-n{hparams['n_head']}"
            f"{batch}-seed{seed}")


def cell_folder(work_dir, task, model_type):
    return Path(work_dir) / task / MODEL_SLUGS[model_type]


def trial_configuration(hparams, ff_factor, epoch_cap):
    """The HParams a trial of `hparams` (a search-space point) trains with."""
    return HParams(**hparams, ff_factor=ff_factor, num_epoch=epoch_cap)


def trial_args(task, model_type, hparams, seed, epoch_cap, data_root, folder):
    """main.py's flags for a trial: its data under data_root, its run directory in the trial folder."""
    return main_args(task, model_type, trial_configuration(hparams, FF_FACTOR, epoch_cap), seed,
                     ["--data_dir", str(Path(data_root) / task), "--work_dir", str(folder)])


# ---------------------------------------------------------------------------------------------------------------
# One trial, as Ray Tune runs it. Ray ships this function, and the functions of the experiment layer it calls, by
# value (ship_to_workers): the workers cannot import them. It calls them by the names imported above, never as
# attributes of the experiment module: a module object would travel whole, with the model registry (and an import
# of model.py, which a worker cannot find) in it.


def run_trial(tune_config):
    """Report what main.py has already logged in the trial folder, then start or resume it and report each new
    evaluation as it appears in metrics.jsonl. A finished trial only replays its metrics."""
    import shutil

    from ray import tune

    config = tune_config["trial"]
    # Seed runs go through Ray as plain tasks (see Seeds), outside a Tune session: nothing to report to.
    report = tune.report if tune_config.get("report", True) else (lambda metrics: None)
    folder = Path(config["folder"])
    folder.mkdir(parents=True, exist_ok=True)
    state = {"reported": 0, "best": 0.0}

    def report_new_evaluations(run_dir):
        for record in (read_metrics(run_dir) if run_dir else [])[state["reported"]:]:
            state["reported"] += 1
            score = evaluation_score(record)
            state["best"] = max(state["best"], score)
            report({"best_score": state["best"], "score": score, "valid_acc": record["valid_acc"],
                    "valid2_acc": record["valid2_acc"], "step": record["step"],
                    "epochs": record["step"] / config["batches_per_epoch"]})

    run_dir = latest_run_dir(folder)
    if (folder / STOPPED_MARKER).is_file() or is_finished(run_dir):
        report_new_evaluations(run_dir)  # ended earlier: replay only
        return
    in_use = run_dir_in_use(folder)
    if in_use:  # a main.py outside this search: neither deleted as stale nor started a second time
        raise RuntimeError(in_use_message(*in_use))
    if run_dir is not None and not has_checkpoint(run_dir):
        shutil.rmtree(run_dir)  # died before its first checkpoint: nothing to resume
        run_dir = None
    report_new_evaluations(run_dir)
    args = config["main_args"] if run_dir is None else resume_args(run_dir)
    # Leaving early (the scheduler stopped the trial) sends main.py SIGTERM: it checkpoints the batch it is on.
    with main_running(args, folder, config["env"]) as proc:
        while proc.poll() is None:
            time.sleep(1.0)
            report_new_evaluations(latest_run_dir(folder))
        report_new_evaluations(latest_run_dir(folder))
    if proc.returncode != 0 and not is_finished(latest_run_dir(folder)):
        in_use = run_dir_in_use(folder)
        if proc.returncode == EXIT_USAGE and in_use:  # main.py refused: another process took the run directory first
            raise RuntimeError(in_use_message(*in_use))
        # An error, not a scheduler's stop: Tune records it, and a relaunch resumes the trial.
        raise RuntimeError(f"main.py exited with status {proc.returncode}; see {folder / RUN_LOG}")


# ---------------------------------------------------------------------------------------------------------------
# A cell: the search, the choice, the seeds, the summary


def trial_status(folder):
    """(status, best score, best step, epochs trained) of a trial folder, from main.py's files."""
    run_dir = latest_run_dir(folder)
    if run_dir is None:
        return "not started", None, None, 0.0
    records = read_metrics(run_dir)
    if not records:
        return "started", None, None, 0.0
    best = best_evaluation(records)
    epochs = records[-1]["epoch"] - (0 if records[-1]["end_of_epoch"] else 1)
    if is_finished(run_dir):
        status = "finished"
    else:
        status = "stopped early" if (folder / STOPPED_MARKER).is_file() else "unfinished"
    return status, evaluation_score(best), best["step"], epochs


def choose_best(trials):
    """The trial with the highest best score; among equals the one that got there on fewest training examples
    (steps times batch size: fewest steps where the batch sizes agree)."""
    scored = [t for t in trials if t["best_score"] is not None]
    return (max(scored, key=lambda t: (t["best_score"], -t["best_step"] * t["hparams"]["batch_size"]))
            if scored else None)


class StopWhenOutrun:
    """Ends a trial once another trial of the cell has reached 100 % in fewer epochs (fewer steps where the batch
    sizes agree). Ties on the best mean are broken that way too (choose_best), so such a trial can no longer be
    chosen. ASHA alone would let it run to the cap: trials that stop at 100 % early never report at its rungs, so a
    plateaued trial may meet no rival there."""

    def __init__(self):
        self.solved_at = None  # fewest epochs in which a trial of this cell reached 100 %

    def __call__(self, trial_id, result):
        if result.get("best_score", 0.0) >= 100.0:
            epochs = result["epochs"]
            self.solved_at = epochs if self.solved_at is None else min(self.solved_at, epochs)
            return False
        return self.solved_at is not None and result.get("epochs", 0) >= self.solved_at


def mark_if_stopped(folder, result):
    """Records in the trial folder that the scheduler (or StopWhenOutrun) has ended a trial main.py has not finished.
    Tune sets `done` on the result that carries that decision; a trial that finishes on its own ends with a result
    Tune does not pass on, and an interrupted one ends in an error."""
    if result.get("done") and trial_status(folder)[0] == "unfinished":
        (folder / STOPPED_MARKER).write_text(json.dumps({"epochs": result.get("epochs"),
                                                         "best_score": result.get("best_score")}) + "\n")


def stop_marker_callback(tune):
    """Marks each stopped trial as the decision arrives, so that an interrupt later in the cell does not lose it."""
    class MarkStopped(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            mark_if_stopped(Path(trial.config["trial"]["folder"]), result)

    return MarkStopped()


def short_trial_name(trial):
    return Path(trial.config["trial"]["folder"]).name


def run_tuner(tune, trials, resources, name, storage, scheduler, stopper=None, callbacks=()):
    """Run `trials` (dicts for run_trial) as one Ray Tune experiment; prints the trials that failed and returns
    their names. A trial the scheduler or the stopper ended has not failed."""
    tuner = tune.Tuner(tune.with_resources(run_trial, resources),
                       param_space={"trial": tune.grid_search(trials)},
                       tune_config=tune.TuneConfig(scheduler=scheduler, reuse_actors=False,
                                                   trial_name_creator=short_trial_name,
                                                   trial_dirname_creator=short_trial_name),
                       run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=0, stop=stopper,
                                                 callbacks=[stop_marker_callback(tune), *callbacks]))
    failed = []
    with ray_trial_errors_silenced():
        results = tuner.fit()
    for result in results:
        if result.error:
            failed.append(report_failure(Path(result.config["trial"]["folder"]), result.error))
    return failed


def report_failure(folder, error):
    """Prints one line on the failed trial in `folder` (main.py's `error:` line, else Ray's error) and returns the
    trial's folder."""
    cause = main_py_error(folder)
    if cause is None:  # killed or interrupted, or Ray lost the worker: Ray's last line says which
        lines = [line for line in ANSI_ESCAPE.sub("", str(error)).splitlines() if line.strip()]
        cause = f"{lines[-1].strip() if lines else type(error).__name__} (see {folder / RUN_LOG})"
    print(f"warning: trial {folder.name} failed: {cause}", flush=True)
    return folder


ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@contextmanager
def ray_trial_errors_silenced():
    """Ray Tune logs each failed trial with the worker's traceback (and terminal colours); report_failure says it
    in one line instead."""
    logger = logging.getLogger("ray.tune")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def failure_advice(folders):
    """What to do about failed trials: a main.py `error:` needs its cause fixed; only an interrupted or killed run
    is helped by running the command again."""
    errors = sum(main_py_error(folder) is not None for folder in folders)
    if errors == len(folders):
        return "main.py reported an error: fix its cause, then run the same command again"
    if errors == 0:
        return "interrupted or killed: run the same command again to resume them"
    return (f"{errors} with a main.py error, whose cause needs fixing, the rest interrupted or killed; then run the "
            f"same command again")


class Cell:
    def __init__(self, args, task, model_type, train_lines):
        self.args, self.task, self.model_type = args, task, model_type
        self.folder = cell_folder(args.work_dir, task, model_type)
        self.grid = search_space(model_type, args.learning_rates, args.layers, args.widths)
        self.train_lines = train_lines
        self.lock = None

    def ended_score(self, hparams):
        status, best, _, _ = trial_status(self.folder / trial_name(hparams, SEARCH_SEED))
        return best if status in ("finished", "stopped early") else None

    def anchor(self):
        """The best trial of the grid once the grid's search has ended (--around_best widens around it), else None."""
        grid = [self.trial_summary(h) for h in self.grid]
        if not all(t["status"] in ("finished", "stopped early") for t in grid):
            return None
        best = choose_best(grid)
        return best and best["hparams"]

    @property
    def space(self):
        """The grid, and with --around_best the trials around the grid's best that the ended trials call for.
        Read from the trial folders each time: it grows as the steps of a ladder end."""
        anchor = self.anchor() if self.args.around_best else None
        if anchor is None:
            return self.grid
        return self.grid + [h for h in around_best(anchor, self.ended_score) if h not in self.grid]

    def trial_summary(self, hparams):
        status, best, step, epochs = trial_status(self.folder / trial_name(hparams, SEARCH_SEED))
        return {"name": trial_name(hparams, SEARCH_SEED), "hparams": hparams, "status": status,
                "best_score": best, "best_step": step, "epochs": epochs}

    def claim(self):
        """Whether this driver now has the cell to itself. The kernel drops the lock when the process ends,
        however it ends, so a crashed driver leaves nothing to clean up."""
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self.lock = hold_lock(self.folder / CELL_LOCK, f"{self.label}: cannot lock {CELL_LOCK} on this file "
                                                           f"system; keep other tune.py commands off this cell")
        except LockHeld:
            return False
        return True

    def release(self):
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None

    @property
    def label(self):
        return f"{self.task} {MODEL_NAMES[self.model_type]}"

    def trial(self, hparams, seed):
        folder = self.folder / trial_name(hparams, seed)
        return {"folder": str(folder), "batches_per_epoch": math.ceil(self.train_lines / hparams["batch_size"]),
                "env": thread_env(self.args.cpus_per_run),
                "main_args": trial_args(self.task, self.model_type, hparams, seed, self.args.epoch_cap,
                                        self.args.data_root, folder)}

    def summary(self):
        space = self.space
        trials = [self.trial_summary(hparams) for hparams in space]
        best = choose_best(trials)
        seeds = []
        if best is not None:
            for seed in ROBUSTNESS_SEEDS:
                status, score, step, epochs = trial_status(self.folder / trial_name(best["hparams"], seed))
                seeds.append({"seed": seed, "name": trial_name(best["hparams"], seed), "status": status,
                              "best_score": score, "epochs": epochs})
        grid = {"learning_rate": unique(h["learning_rate"] for h in self.grid),
                "num_layer": unique(h["num_layer"] for h in self.grid),
                "hidden_size/n_head": unique([h["hidden_size"], h["n_head"]] for h in self.grid),
                "batch_size": BATCH_SIZE, "ff_factor": FF_FACTOR, "epoch_cap": self.args.epoch_cap,
                "scheduler": f"ASHA on best mean(valid, valid2) per epoch, grace {ASHA_GRACE_EPOCHS} "
                             f"epochs, reduction factor {ASHA_REDUCTION}; a trial also stops once "
                             f"another has reached 100 % in fewer steps"}
        if len(space) > len(self.grid):
            grid["around_best"] = {"anchor": trial_name(self.anchor(), SEARCH_SEED),
                                   "ladders": {factor: list(ladder) for factor, ladder in AROUND_BEST_LADDERS}}
        return {"task": self.task, "model_type": self.model_type, "model": MODEL_NAMES[self.model_type],
                "space": grid, "trials": trials, "best": best and best["name"], "seeds": seeds}

    def write_summary(self):
        summary = self.summary()
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / (SUMMARY_FILE + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        tmp.replace(self.folder / SUMMARY_FILE)
        return summary

    def search(self, tune, callbacks=()):
        """Runs (or replays) the cell's trials; writes its summary, returns it and the trials that failed."""
        from ray.tune.schedulers import ASHAScheduler

        resources = {"cpu": self.args.cpus_per_run}
        storage = Path(self.args.work_dir) / ".ray_tune"
        name = f"{self.task}-{MODEL_SLUGS[self.model_type]}"
        # max_t one above the cap: at the cap main.py ends the trial itself, with its final.json, not the scheduler.
        asha = ASHAScheduler(time_attr="epochs", metric="best_score", mode="max", max_t=self.args.epoch_cap + 1,
                             grace_period=min(ASHA_GRACE_EPOCHS, self.args.epoch_cap), reduction_factor=ASHA_REDUCTION)
        # With --around_best the space grows as ladder steps end: search again until a round adds no trial.
        searched, failed = [], []
        while len(self.space) > len(searched):
            searched = self.space
            # Each round runs every trial of the space (those that ended only replay), so its failures are the
            # cell's: a trial that failed in an earlier round has been retried.
            failed = run_tuner(tune, [self.trial(h, SEARCH_SEED) for h in searched], resources, f"{name}-search",
                               storage, asha, StopWhenOutrun(), callbacks)
        return self.write_summary(), [(f"{self.label} {folder.name}", folder) for folder in failed]

    def seed_trials(self, best):
        """The seed runs of the configuration of trial `best` (a trial name)."""
        hparams = next(h for h in self.space if trial_name(h, SEARCH_SEED) == best)
        return [self.trial(hparams, seed) for seed in ROBUSTNESS_SEEDS]


class Seeds:
    """The seed runs of finished searches, as plain Ray tasks that need no scheduler. They run while the next
    cell's search goes on: a cell's last seed run would otherwise hold up every other CPU until it ends.
    An interrupt needs nothing from here: the driver's handler stops every trial's main.py (stop_runs)
    before Ray ends the workers."""

    def __init__(self, ray, cpus_per_run):
        self.ray = ray
        self.remote_trial = ray.remote(num_cpus=cpus_per_run)(run_trial)
        self.pending = []  # (cell, start time, trials, task references)
        self.failed = []  # the seed runs that failed, as ("<cell> <trial>", trial folder)

    def start(self, cell, best, started):
        trials = cell.seed_trials(best)
        refs = [self.remote_trial.remote({"trial": trial, "report": False}) for trial in trials]
        self.pending.append((cell, started, trials, refs))

    def finish(self, wait):
        """Writes and prints the summary of every cell whose seed runs have ended (of all cells when `wait`)."""
        still_running = []
        for cell, started, trials, refs in self.pending:
            ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=None if wait else 0)
            if len(ready) < len(refs):
                still_running.append((cell, started, trials, refs))
                continue
            for trial, ref in zip(trials, refs):
                try:
                    self.ray.get(ref)
                except Exception as exc:  # main.py failed: say so and go on; a relaunch resumes the run
                    folder = report_failure(Path(trial["folder"]), exc)
                    self.failed.append((f"{cell.label} {folder.name}", folder))
            print_cell(cell.write_summary(), started)
            cell.release()
        self.pending = still_running

    def tune_callback(self, tune):
        """Sums up the cells whose seeds have ended while a later cell's search runs (at each of its results),
        so that a driver stopped mid-search leaves no summary that still calls ended seeds unfinished."""
        seeds = self

        class SumUpEndedSeeds(tune.Callback):
            def on_trial_result(self, iteration, trials, trial, result, **info):
                seeds.finish(wait=False)

        return SumUpEndedSeeds()


def print_cell(summary, started):
    print(f"{describe(summary)} [{(time.time() - started) / 60:.1f} min]", flush=True)


def trials_done(summary):
    """How many of a cell summary's trials have ended (finished, or stopped by the scheduler)."""
    return sum(t["status"] in ("finished", "stopped early") for t in summary["trials"])


def search_ended(summary):
    """Whether every trial of the cell has ended, so that the chosen configuration can no longer change. A trial
    that failed resumes on a relaunch and may still beat the one chosen so far."""
    return trials_done(summary) == len(summary["trials"])


def ready_for_seeds(summary):
    return summary["best"] is not None and search_ended(summary)


def describe(summary):
    line = f"{summary['task']} {summary['model']}: {trials_done(summary)}/{len(summary['trials'])} trials done"
    if summary["best"]:
        best = next(t for t in summary["trials"] if t["name"] == summary["best"])
        seeds = ", ".join(f"seed {s['seed']} {s['status']}"
                          + (f" {s['best_score']:.1f}" if s["best_score"] is not None else "")
                          for s in summary["seeds"])
        line += f"; best {best['name']} ({best['best_score']:.1f} %); {seeds}"
    return line


def count_lines(path):
    with open(path) as f:
        return sum(1 for line in f if line.strip())


def width_and_heads(text):
    """(hidden size, heads) of a HIDDENxHEADS pair such as 64x4; ValueError unless HEADS divides HIDDEN."""
    hidden, heads = (int(x) for x in text.lower().split("x"))  # ValueError too for anything but two numbers
    if hidden < 1 or heads < 1 or hidden % heads:
        raise ValueError(text)
    return hidden, heads


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=ALL_TASKS, metavar="TASK",
                        help=f"tasks to search: {', '.join(ALL_TASKS)} (default: the paper's eight)")
    parser.add_argument("--models", nargs="+", type=int, default=list(PAPER_MODELS), choices=sorted(MODEL_NAMES),
                        metavar="ID", help="model type IDs (default: the paper's seven)")
    parser.add_argument("--work_dir", default=str(REPO_ROOT / "results" / "search"), help="root of the cells")
    parser.add_argument("--data_root", default=str(REPO_ROOT / "data"), help="datasets in DATA_ROOT/<task>")
    parser.add_argument("--epoch_cap", type=int, default=40, help="most epochs a trial trains (default 40)")
    parser.add_argument("--learning_rates", nargs="+", default=list(LEARNING_RATES), help="learning rates to try")
    parser.add_argument("--layers", nargs="+", type=int, default=list(LAYERS), help="layer counts to try")
    parser.add_argument("--widths", nargs="+", default=None, metavar="HIDDENxHEADS",
                        help="hidden sizes and heads to try, e.g. 64x4 128x8 (default: see above)")
    parser.add_argument("--around_best", action="store_true",
                        help="once the grid has ended, also try one factor at a time around its best trial: "
                             "learning rate 1e-4 (then 3e-5), batch 32 (then 16), hidden 256 with 8 heads at 1 layer; "
                             "a second step only where the first one beat the grid's best")
    parser.add_argument("--address", help="address of an existing Ray cluster (default: a private local instance, "
                                          "whatever RAY_ADDRESS or an earlier `ray start` say)")
    parser.add_argument("--cpus_per_run", type=int, default=1, help="CPUs (and torch threads) per trial")
    parser.add_argument("--parallel", type=int, default=None,
                        help="trials at a time on the local Ray instance (default: one per --cpus_per_run CPUs)")
    parser.add_argument("--dry_run", action="store_true", help="list the cells and their trials; run nothing")
    args = parser.parse_args(argv)
    if args.widths is not None:
        try:
            args.widths = tuple(width_and_heads(w) for w in args.widths)
        except ValueError:
            parser.error("--widths takes HIDDENxHEADS pairs with HIDDEN divisible by HEADS, e.g. 64x4")
    if args.epoch_cap < 1 or args.cpus_per_run < 1 or (args.parallel is not None and args.parallel < 1):
        parser.error("--epoch_cap, --cpus_per_run and --parallel must be at least 1")
    if args.parallel is not None and args.address:
        parser.error("--parallel sizes the local Ray instance; with --address the cluster decides")
    args.work_dir, args.data_root = Path(args.work_dir).resolve(), Path(args.data_root).resolve()
    return args


def running_pid_files(cells):
    """The pid files of this driver's trials: those of the cells it holds, not of another search beside it."""
    return [pid_file for cell in cells if cell.lock is not None for pid_file in cell.folder.glob(f"*/{PID_FILE}")]


@contextmanager
def summing_up_when_stopped(cells):
    """A driver stopped mid-cell (Ctrl-C, SIGTERM, an error) writes the search.json of every cell it still holds,
    from the trial folders as the stop left them (stopping_cleanly has let the running trials save by then), so
    that no summary disagrees with its folders until the next relaunch."""
    try:
        yield
    except BaseException:
        for cell in cells:
            if cell.lock is not None:
                cell.write_summary()
                cell.release()
        raise


def search_cells(args, ray, tune):
    """Searches each cell of the command that no other driver holds, each cell's seeds going on in the background
    while the next cell is searched. Returns the trials (search trials and seed runs) that failed."""
    seeds = Seeds(ray, args.cpus_per_run)
    cells, failed = [], []
    with stopping_cleanly(lambda: running_pid_files(cells)), summing_up_when_stopped(cells):
        for task in args.tasks:
            train_lines = count_lines(args.data_root / task / "train_50.src")
            for model_type in args.models:
                started = time.time()
                cell = Cell(args, task, model_type, train_lines)
                if not cell.claim():
                    print(f"{cell.label}: skipped, another tune.py is working on it", flush=True)
                    continue
                cells.append(cell)
                summary, search_failed = cell.search(tune, [seeds.tune_callback(tune)])
                failed += search_failed
                if ready_for_seeds(summary):
                    seeds.start(cell, summary["best"], started)
                else:
                    print_cell(summary, started)
                    cell.release()
                seeds.finish(wait=False)
        seeds.finish(wait=True)
    return failed + seeds.failed


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        for task in args.tasks:
            for model_type in args.models:
                cell = Cell(args, task, model_type, train_lines=1)
                print(describe(cell.summary()))
                for hparams in cell.space:
                    print(f"    {trial_name(hparams, SEARCH_SEED)}: "
                          f"{trial_status(cell.folder / trial_name(hparams, SEARCH_SEED))[0]}")
        return 0
    try:
        ray = import_ray()
        from ray import tune
    except (ExperimentError, ImportError) as exc:
        print(f"error: {exc} (pip install -r requirements-sweep.txt)", file=sys.stderr)
        return 2
    # Ray Tune would turn Ctrl-C into a normal end of the current cell and go on with the next one; we want it to
    # stop everything (trials checkpoint through main.py's SIGTERM handling) and leave no scheduler verdicts behind.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    try:
        # first: a cluster that does not answer ends it at once
        with ray_running(ray, args.address, local_cpus(args.parallel, args.cpus_per_run)):
            prepare_data(args.tasks, args.data_root, bins=3)
            ship_to_workers(sys.modules[run_trial.__module__])
            failed = search_cells(args, ray, tune)
    except ExperimentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("Interrupted: the running trials saved their latest checkpoint; run the same command again to continue.",
              file=sys.stderr, flush=True)
        return 130
    if failed:
        print(f"{len(failed)} trial(s) failed ({failure_advice([folder for _, folder in failed])}): "
              f"{'; '.join(label for label, _ in failed)}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
