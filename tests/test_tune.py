"""scripts/tune.py: the search space, a real (tiny) search through Ray Tune with its seeds and summary, a relaunch
that reruns nothing, the trial's replay and resume, and results.py's view of the search."""
import io
import json
import logging
import os
import shlex
import signal
import sys
import threading
import time
import types
from contextlib import redirect_stdout
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "scripts"))

import experiment  # noqa: E402
import main  # noqa: E402
import results  # noqa: E402
import sweep  # noqa: E402
import tune  # noqa: E402
import utils  # noqa: E402
from test_sweep import write_tiny_parity  # noqa: E402

TINY_SPACE = ["--learning_rates", "1e-3", "3e-3", "--layers", "1", "--widths", "8x1", "--epoch_cap", "2"]


def test_search_space_of_the_issue():
    for model_type in (1, 8, 2, 7, 12):
        space = tune.search_space(model_type)
        assert len(space) == 18
        assert {h["learning_rate"] for h in space} == {"3e-4", "1e-3", "3e-3"}
        assert {h["num_layer"] for h in space} == {1, 2}
        assert all(h["hidden_size"] // h["n_head"] >= 16 for h in space)
    assert len(tune.search_space(0)) == 12
    assert {h["num_layer"] for h in tune.search_space(10)} == {1} and len(tune.search_space(10)) == 6
    names = [tune.trial_name(h, 1) for h in tune.search_space(2)]
    assert len(set(names)) == len(names) and "lr1e-3-l2-h128-n8-seed1" in names


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance of two CPUs for the module, started as tune.py starts its own (so that no record of
    another cluster on this machine diverts it); tune.main uses it instead of starting one."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.tune")
    sweep.start_ray(ray, None, num_cpus=2)
    yield ray
    ray.shutdown()


def search_argv(root):
    """tune.py's flags for the LSTM cell of TINY_SPACE on the parity data under `root`."""
    return ["--tasks", "parity", "--models", "0", "--work_dir", str(root / "search"), "--data_root",
            str(root / "data"), *TINY_SPACE]


@pytest.fixture(scope="module")
def tiny_search(tmp_path_factory, local_ray):
    """One LSTM cell searched over two learning rates for two epochs, on a local Ray instance."""
    root = tmp_path_factory.mktemp("tune")
    write_tiny_parity(root / "data" / "parity")
    argv = search_argv(root)
    out = io.StringIO()
    with redirect_stdout(out):
        code = tune.main(argv)
    yield root, argv, code, out.getvalue(), local_ray


def test_search_runs_every_trial_then_the_seeds_of_the_best(tiny_search):
    root, _, code, out, _ = tiny_search
    assert code == 0, out
    cell = root / "search" / "parity" / "lstm"
    summary = json.loads((cell / tune.SUMMARY_FILE).read_text())
    assert [t["name"] for t in summary["trials"]] == ["lr1e-3-l1-h8-n1-seed1", "lr3e-3-l1-h8-n1-seed1"]
    assert all(t["status"] == "finished" and t["epochs"] == 2 for t in summary["trials"])
    best = max(summary["trials"], key=lambda t: (t["best_score"], -t["best_step"]))
    assert summary["best"] == best["name"]
    assert [s["seed"] for s in summary["seeds"]] == [2, 3] and all(s["status"] == "finished"
                                                                   for s in summary["seeds"])
    for name in [t["name"] for t in summary["trials"]] + [s["name"] for s in summary["seeds"]]:
        [run_dir] = [d for d in (cell / name).iterdir() if (d / "args.json").is_file()]
        args = json.loads((run_dir / "args.json").read_text())
        assert (args["num_epoch"], args["batch_size"], args["hidden_size"]) == (2, 64, 8)
        assert args["seed"] == int(name.rsplit("seed", 1)[1])
        assert (run_dir / "final.json").is_file()
    assert f"parity LSTM: 2/2 trials done; best {summary['best']}" in out


def test_relaunch_reruns_nothing_that_finished(tiny_search):
    root, argv, _, _, _ = tiny_search
    cell = root / "search" / "parity" / "lstm"
    stamps = {p: p.stat().st_mtime_ns for p in cell.rglob("final.json")}
    logs = {p: p.read_text() for p in cell.rglob(tune.RUN_LOG)}
    with redirect_stdout(io.StringIO()):
        assert tune.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in cell.rglob("final.json")} == stamps and len(stamps) == 4
    assert {p: p.read_text() for p in cell.rglob(tune.RUN_LOG)} == logs  # no main.py was started


def test_results_show_the_searched_cell(tiny_search, tmp_path):
    root, _, _, _, _ = tiny_search
    (tmp_path / "runs").mkdir()
    with redirect_stdout(io.StringIO()):
        assert results.main(["--runs", str(tmp_path / "runs"), "--search", str(root / "search"),
                             "--paper_budget", str(tmp_path / "no_paper_budget"),
                             "--out_dir", str(tmp_path), "--searched_csv", str(tmp_path / "searched.csv")]) == 0
    summary = json.loads((root / "search" / "parity" / "lstm" / tune.SUMMARY_FILE).read_text())
    runs = [results.latest_run(root / "search" / "parity" / "lstm" / name)
            for name in [summary["best"]] + [s["name"] for s in summary["seeds"]]]
    solved = sum(run.bin1 >= 99 for run in runs)
    lstm_row = next(line for line in (tmp_path / "table.md").read_text().splitlines() if line.startswith("| LSTM"))
    assert lstm_row.split(" | ")[1] == (f"{results.one_decimal(runs[0].bin0)} / {results.one_decimal(runs[0].bin1)}"
                                        f" ({solved}/3)")
    search_md = (tmp_path / "search.md").read_text()
    assert "## parity / LSTM" in search_md and f"{summary['best']} **chosen**" in search_md
    assert all(t["name"] in search_md for t in summary["trials"])


def test_the_chosen_configuration_of_a_search_trains_again_through_the_sweep(tiny_search, tmp_path, capsys):
    """results.py's hparams_searched.csv: the best trial's hparams with the search's epoch cap, which sweep.py
    trains as the search trained it."""
    root, _, _, _, _ = tiny_search
    (tmp_path / "runs").mkdir()
    csv_path = tmp_path / "searched.csv"
    assert results.main(["--runs", str(tmp_path / "runs"), "--search", str(root / "search"),
                         "--paper_budget", str(tmp_path / "no_paper_budget"),
                         "--out_dir", str(tmp_path), "--searched_csv", str(csv_path)]) == 0
    summary = json.loads((root / "search" / "parity" / "lstm" / tune.SUMMARY_FILE).read_text())
    best = next(t for t in summary["trials"] if t["name"] == summary["best"])
    [(key, hparams)] = experiment.read_hparams(csv_path).items()
    assert key == ("parity", 0)
    assert hparams == experiment.HParams(**best["hparams"], ff_factor=4, num_epoch=2)
    capsys.readouterr()
    assert sweep.main(["--csv", str(csv_path), "--work_dir", str(tmp_path / "rerun"), "--data_root",
                       str(root / "data"), "--dry_run"]) == 0
    [line] = capsys.readouterr().out.splitlines()
    [run_dir] = experiment.run_dirs(root / "search" / "parity" / "lstm" / summary["best"])
    searched = json.loads((run_dir / "args.json").read_text())
    rerun = vars(main.build_parser().parse_args(shlex.split(line.split(" main.py ", 1)[1])))
    assert {k: v for k, v in rerun.items() if k != "work_dir"} == {k: v for k, v in searched.items()
                                                                  if k != "work_dir"}


# -- the trial function alone ------------------------------------------------------------------------------------

def fake_trial(folder, main_args=("--model_type", "3")):
    return {"trial": {"folder": str(folder), "batches_per_epoch": 6, "env": {}, "main_args": list(main_args)}}


@pytest.fixture
def main_py_is_the_command(monkeypatch):
    """A trial's main_args become the whole command: main.py stands for a program of the test's choosing."""
    monkeypatch.setattr(experiment, "main_command", lambda args: list(args))


def write_run_dir(folder, records, finished, checkpoint=True):
    run_dir = folder / "lstm-parity-20260101-000000-abcdef01"
    run_dir.mkdir(parents=True)
    (run_dir / "args.json").write_text("{}")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if finished:
        (run_dir / "final.json").write_text("{}")
    if checkpoint:
        (run_dir / "latest_model.pt").write_text("")
    return run_dir


RECORDS = [{"epoch": 1, "step": 1, "end_of_epoch": False, "valid_acc": 50.0, "valid2_acc": 0.0},
           {"epoch": 1, "step": 6, "end_of_epoch": True, "valid_acc": 100.0, "valid2_acc": 20.0},
           {"epoch": 2, "step": 7, "end_of_epoch": False, "valid_acc": 90.0, "valid2_acc": 10.0}]


@pytest.fixture
def reports(monkeypatch):
    ray_tune = pytest.importorskip("ray.tune")
    reported = []
    monkeypatch.setattr(ray_tune, "report", lambda metrics: reported.append(metrics))
    return reported


def test_a_finished_trial_replays_its_metrics_and_starts_nothing(tmp_path, reports):
    write_run_dir(tmp_path, RECORDS, finished=True)
    tune.run_trial(fake_trial(tmp_path))
    assert [r["best_score"] for r in reports] == [25.0, 60.0, 60.0]
    assert [r["epochs"] for r in reports] == [1 / 6, 1.0, 7 / 6]
    assert not (tmp_path / "run.log").exists()


def test_an_interrupted_trial_replays_then_resumes(tmp_path, reports):
    run_dir = write_run_dir(tmp_path, RECORDS[:2], finished=False)
    with pytest.raises(RuntimeError, match="main.py exited with status"):  # the fake checkpoint cannot load
        tune.run_trial(fake_trial(tmp_path))
    assert len(reports) == 2
    assert f"--resume {run_dir}" in (tmp_path / "run.log").read_text()


def test_a_trial_whose_main_py_fails_is_an_error_not_a_scheduler_stop(tmp_path, reports, main_py_is_the_command):
    with pytest.raises(RuntimeError, match="status 1"):
        tune.run_trial(fake_trial(tmp_path, ["false"]))
    assert not (tmp_path / tune.STOPPED_MARKER).exists()


def test_a_run_that_died_before_its_first_checkpoint_starts_again(tmp_path, reports, main_py_is_the_command):
    run_dir = write_run_dir(tmp_path, [], finished=False, checkpoint=False)
    tune.run_trial(fake_trial(tmp_path, ["echo", "started afresh"]))
    assert not run_dir.exists()
    assert "started afresh" in (tmp_path / "run.log").read_text()


def test_a_trial_the_scheduler_stopped_replays_even_without_its_checkpoint(tmp_path, reports):
    """A fresh clone has the run files but no checkpoints: the scheduler's decision stands, nothing trains."""
    run_dir = write_run_dir(tmp_path, RECORDS[:2], finished=False, checkpoint=False)
    (tmp_path / tune.STOPPED_MARKER).write_text("{}")
    tune.run_trial(fake_trial(tmp_path))
    assert len(reports) == 2 and run_dir.exists()
    assert not (tmp_path / "run.log").exists()
    assert tune.trial_status(tmp_path)[0] == "stopped early"


def test_a_trial_stops_once_another_solved_the_cell_in_fewer_epochs():
    stop = tune.StopWhenOutrun()
    assert not stop("a", {"best_score": 90.0, "epochs": 5.0})
    assert not stop("b", {"best_score": 100.0, "epochs": 8.0})  # solved: ends by itself
    assert not stop("a", {"best_score": 95.0, "epochs": 7.0})  # may still solve it in fewer epochs
    assert stop("a", {"best_score": 95.0, "epochs": 8.0})
    assert not stop("c", {"best_score": 100.0, "epochs": 6.0})
    assert stop("a", {"best_score": 99.0, "epochs": 6.5})  # c was faster


def test_ties_go_to_the_trial_that_saw_fewest_examples_whatever_its_batch_size():
    def trial(name, step, batch):
        return {"name": name, "best_score": 100.0, "best_step": step, "hparams": {"batch_size": batch}}
    # 300 steps of 32 examples are fewer examples than 200 steps of 64, though more steps.
    assert tune.choose_best([trial("b64", 200, 64), trial("b32", 300, 32)])["name"] == "b32"
    assert tune.choose_best([trial("b64", 100, 64), trial("b32", 300, 32)])["name"] == "b64"


ANCHOR = {"learning_rate": "3e-4", "num_layer": 2, "hidden_size": 64, "n_head": 4, "batch_size": 64}


def test_around_best_tries_the_first_step_of_each_factor_alone():
    trials = tune.around_best(ANCHOR, lambda h: 63.0 if h == ANCHOR else None)
    assert trials == [dict(ANCHOR, learning_rate="1e-4"), dict(ANCHOR, batch_size=32),
                      dict(ANCHOR, hidden_size=256, n_head=8, num_layer=1)]
    assert [tune.trial_name(h, 1) for h in trials] == ["lr1e-4-l2-h64-n4-seed1", "lr3e-4-l2-h64-n4-b32-seed1",
                                                       "lr3e-4-l1-h256-n8-seed1"]


@pytest.mark.parametrize("lr_score, batch_score, more", [
    (70.0, 50.0, [dict(ANCHOR, learning_rate="3e-5")]),  # 1e-4 helped: one step further; batch 32 did not
    (63.0, 64.0, [dict(ANCHOR, batch_size=16)]),  # a tie is no help
    (None, None, []),  # still running: no second step yet
])
def test_around_best_goes_one_step_further_only_where_the_step_helped(lr_score, batch_score, more):
    scores = {tune.trial_name(ANCHOR, 1): 63.0, "lr1e-4-l2-h64-n4-seed1": lr_score,
              "lr3e-4-l2-h64-n4-b32-seed1": batch_score, "lr3e-4-l1-h256-n8-seed1": 99.0}
    trials = tune.around_best(ANCHOR, lambda h: scores.get(tune.trial_name(h, 1)))
    first = tune.around_best(ANCHOR, lambda h: 63.0 if h == ANCHOR else None)
    assert sorted(map(str, trials)) == sorted(map(str, first + more))


def test_around_best_skips_steps_that_leave_the_anchor_as_it_is():
    anchor = dict(ANCHOR, hidden_size=256, n_head=8, num_layer=1, learning_rate="1e-4")
    trials = tune.around_best(anchor, lambda h: None)
    assert trials == [dict(anchor, learning_rate="3e-5"), dict(anchor, batch_size=32)]


def test_a_widened_cell_adds_its_trials_once_the_grid_has_ended_and_runs_them_at_their_batch_size(tmp_path):
    args = tune.parse_args(["--work_dir", str(tmp_path), "--learning_rates", "1e-3", "3e-3", "--layers", "1",
                            "--widths", "8x1", "--around_best"])
    cell = tune.Cell(args, "parity", 0, train_lines=640)
    grid_names = [tune.trial_name(h, 1) for h in cell.grid]
    assert [tune.trial_name(h, 1) for h in cell.space] == grid_names  # the grid has not run
    for name, score in zip(grid_names, (80.0, 90.0)):
        write_run_dir(cell.folder / name, [{"epoch": 1, "step": 10, "end_of_epoch": True, "valid_acc": score,
                                            "valid2_acc": score}], finished=True)
    added = [h for h in cell.space if h not in cell.grid]
    assert [tune.trial_name(h, 1) for h in added] == ["lr1e-4-l1-h8-n1-seed1", "lr3e-3-l1-h8-n1-b32-seed1",
                                                      "lr3e-3-l1-h256-n8-seed1"]
    batch32 = cell.trial(added[1], 1)
    batch_flag = batch32["main_args"].index("--batch_size")
    assert batch32["batches_per_epoch"] == 20 and batch32["main_args"][batch_flag + 1] == "32"
    assert cell.trial(added[0], 1)["batches_per_epoch"] == 10
    summary = cell.summary()
    assert summary["space"]["around_best"]["anchor"] == "lr3e-3-l1-h8-n1-seed1"
    assert [t["status"] for t in summary["trials"]] == ["finished", "finished"] + ["not started"] * 3
    assert not tune.search_ended(summary)
    sentence = results.around_best_sentence(summary["space"])
    assert "`lr3e-3-l1-h8-n1-seed1`" in sentence and "batch_size 32 then batch_size 16" in sentence
    assert results.around_best_sentence(tune.Cell(args, "parity", 1, 640).summary()["space"]) == ""
    args.around_best = False
    assert [tune.trial_name(h, 1) for h in cell.space] == grid_names


def test_the_scheduler_of_a_search_stops_the_trial_with_the_lower_score_at_a_rung(tmp_path, monkeypatch):
    """The ASHA scheduler Cell.search gives Ray Tune, fed what run_trial reports: at the first rung, of two trials
    the one with the lower best mean(valid, valid2) stops, the higher one goes on (mode "max" on best_score)."""
    schedulers_module = pytest.importorskip("ray.tune.schedulers")
    schedulers = []

    def no_trials(ray_tune, trials, resources, name, storage, scheduler, *rest):
        schedulers.append(scheduler)
        return []

    monkeypatch.setattr(tune, "run_tuner", no_trials)
    args = tune.parse_args(["--work_dir", str(tmp_path), *TINY_SPACE, "--epoch_cap", "20"])
    tune.Cell(args, "parity", 0, train_lines=640).search(None)
    (asha,) = schedulers
    higher, lower = types.SimpleNamespace(trial_id="higher"), types.SimpleNamespace(trial_id="lower")
    for trial in (higher, lower):
        asha.on_trial_add(None, trial)
    rung = {"epochs": tune.ASHA_GRACE_EPOCHS}
    assert asha.on_trial_result(None, higher, {**rung, "best_score": 90.0}) == schedulers_module.TrialScheduler.CONTINUE
    assert asha.on_trial_result(None, lower, {**rung, "best_score": 10.0}) == schedulers_module.TrialScheduler.STOP


def test_the_group_tasks_and_deltaproduct_can_be_searched_on_the_issue_s_smaller_space(tmp_path, capsys):
    """The group-task search: lr {3e-4, 1e-3} x layers {1, 2} x hidden 128 with 8 heads."""
    argv = ["--tasks", "s3", "a5", "s5", "--models", "23", "26", "--learning_rates", "3e-4", "1e-3", "--widths",
            "128x8", "--work_dir", str(tmp_path / "search"), "--data_root", str(tmp_path / "data"), "--dry_run"]
    assert tune.main(argv) == 0
    out = capsys.readouterr().out
    for task in ("s3", "a5", "s5"):
        assert f"{task} DeltaProduct n2 [-1,1]" in out and f"{task} DeltaProduct n2 [0,1]" in out
    trials = [line.split(":")[0].strip() for line in out.splitlines() if line.startswith("    ")]
    assert len(trials) == 6 * 4 and set(trials) == {f"lr{lr}-l{n}-h128-n8-seed1" for lr in ("3e-4", "1e-3")
                                                    for n in (1, 2)}
    with pytest.raises(SystemExit):
        tune.parse_args(["--tasks", "s6"])


@pytest.mark.parametrize("flags", [["--parallel", "0"], ["--parallel", "2", "--address", "auto"]])
def test_parallel_must_be_positive_and_only_sizes_a_local_instance(flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tune.parse_args(flags)
    assert exit_info.value.code == 2 and "--parallel" in capsys.readouterr().err


@pytest.mark.parametrize("flags, num_cpus", [([], None), (["--parallel", "3", "--cpus_per_run", "2"], 6)])
def test_parallel_sizes_the_local_ray_instance(flags, num_cpus):
    class RecordingRay:
        def init(self, **kwargs):
            self.kwargs = kwargs

    ray = RecordingRay()
    args = tune.parse_args(flags)
    sweep.start_ray(ray, None, sweep.local_cpus(args.parallel, args.cpus_per_run))
    # "local": a new instance, whatever RAY_ADDRESS or the record of an earlier `ray start` say
    assert ray.kwargs["num_cpus"] == num_cpus and ray.kwargs["address"] == "local"


class FakeRay:
    """Enough of Ray for tune.Seeds: tasks end when the test says so, and may fail."""

    def __init__(self):
        self.started, self.done, self.failed = [], set(), set()

    def remote(self, num_cpus):
        fake = self

        class Task:
            def __init__(self, fn):
                self.num_cpus = num_cpus

            def remote(self, config):
                fake.started.append((self.num_cpus, config))
                return len(fake.started) - 1

        return Task

    def wait(self, refs, num_returns, timeout):
        ready = [r for r in refs if r in self.done]
        return ready, [r for r in refs if r not in self.done]

    def get(self, ref):
        if ref in self.failed:
            raise RuntimeError("Traceback ...\nmain.py exited with status 1")


class FakeCell(tune.Cell):
    def __init__(self, folder):
        self.folder, self.summaries, self.lock = folder, 0, None
        self.task, self.model_type = "parity", 0
        assert self.claim()  # a lock as a real cell holds it: Tune must be able to pickle it with the callback

    def seed_trials(self, best):
        return [{"folder": str(self.folder / f"{best}-seed{seed}")} for seed in tune.ROBUSTNESS_SEEDS]

    def write_summary(self):
        self.summaries += 1
        return {"task": "parity", "model": "LSTM", "trials": [], "best": None, "seeds": []}


def test_seed_runs_go_on_in_the_background_and_their_cell_is_summed_up_when_they_end(tmp_path, capsys):
    ray, cell = FakeRay(), FakeCell(tmp_path)
    seeds = tune.Seeds(ray, cpus_per_run=2)
    seeds.start(cell, "lr1e-3", started=0.0)
    assert [(cpus, config["report"], Path(config["trial"]["folder"]).name) for cpus, config in ray.started] == [
        (2, False, "lr1e-3-seed2"), (2, False, "lr1e-3-seed3")]

    ray.done.add(0)
    seeds.finish(wait=False)  # seed 3 still running: the search goes on, nothing is summed up yet
    assert cell.summaries == 0 and capsys.readouterr().out == ""

    ray.done.add(1)
    ray.failed.add(1)
    seeds.finish(wait=False)
    out = capsys.readouterr().out
    assert "warning: trial lr1e-3-seed3 failed: main.py exited with status 1" in out
    assert [label for label, _ in seeds.failed] == ["parity LSTM lr1e-3-seed3"]  # for the driver's last line and its exit status
    assert "parity LSTM: 0/0 trials done" in out and cell.summaries == 1 and seeds.pending == []
    assert cell.lock is None  # the cell is free for another driver only once its seeds have ended


def test_seeds_that_end_during_the_next_search_are_summed_up_before_it_ends(tiny_search, tmp_path, monkeypatch):
    """A driver stopped mid-way through a cell's search must not leave an earlier cell's search.json calling its
    ended seeds unfinished: the next search's results sum that cell up as they come."""
    ray_tune = pytest.importorskip("ray.tune")
    fake_ray, cell = FakeRay(), FakeCell(tmp_path)
    seeds = tune.Seeds(fake_ray, cpus_per_run=1)
    seeds.start(cell, "lr1e-3", started=0.0)
    fake_ray.done.update({0, 1})

    def reports_twice(tune_config):  # self-contained: Ray ships it to a worker by value
        from ray import tune as tune_in_worker
        for step in (1, 2):
            tune_in_worker.report({"step": step, "epochs": step / 6, "best_score": 10.0 * step})

    monkeypatch.setattr(tune, "run_trial", reports_twice)
    with redirect_stdout(io.StringIO()) as out:
        tune.run_tuner(ray_tune, [{"folder": str(tmp_path / "t")}], {"cpu": 1}, "seeds-callback", tmp_path / "ray",
                       scheduler=None, callbacks=[seeds.tune_callback(ray_tune)])
    assert cell.summaries == 1 and seeds.pending == []
    assert "parity LSTM: 0/0 trials done" in out.getvalue()


def table_of_edited_copy(tiny_search, tmp_path, edit_cell):
    """results.py's table.md for a copy of the tiny search after `edit_cell(summary, cell folder)`; the edited
    summary is written back as the cell's search.json."""
    import shutil
    root, _, _, _, _ = tiny_search
    search = tmp_path / "search"
    shutil.copytree(root / "search", search)
    summary_path = search / "parity" / "lstm" / tune.SUMMARY_FILE
    summary = json.loads(summary_path.read_text())
    edit_cell(summary, summary_path.parent)
    summary_path.write_text(json.dumps(summary))
    (tmp_path / "runs").mkdir()
    with redirect_stdout(io.StringIO()):
        assert results.main(["--runs", str(tmp_path / "runs"), "--search", str(search),
                             "--paper_budget", str(tmp_path / "no_paper_budget"),
                             "--out_dir", str(tmp_path), "--searched_csv", str(tmp_path / "searched.csv")]) == 0
    return (tmp_path / "table.md").read_text()


def lstm_parity_cell(table):
    return next(line for line in table.splitlines() if line.startswith("| LSTM")).split(" | ")[1]


def test_a_cell_whose_search_has_not_ended_says_so(tiny_search, tmp_path):
    def last_trial_unfinished(summary, _):
        summary["trials"][-1]["status"] = "unfinished"

    table = table_of_edited_copy(tiny_search, tmp_path, last_trial_unfinished)
    assert lstm_parity_cell(table).endswith("/3, searching)")
    assert "searched (1 of 2 trials done)" in table


def test_seeds_that_ended_after_the_driver_stopped_count_as_ended(tiny_search, tmp_path):
    """A stopped tune.py leaves search.json saying the seeds still run; their final.json says they ended."""
    def seeds_unfinished(summary, _):
        for seed in summary["seeds"]:
            seed["status"] = "unfinished"

    assert lstm_parity_cell(table_of_edited_copy(tiny_search, tmp_path, seeds_unfinished)).endswith("/3)")


def test_a_cell_whose_last_seed_has_no_run_yet_is_still_searching(tiny_search, tmp_path):
    def last_seed_not_started(summary, cell_folder):
        import shutil
        shutil.rmtree(cell_folder / summary["seeds"][-1]["name"])

    assert lstm_parity_cell(table_of_edited_copy(tiny_search, tmp_path, last_seed_not_started)).endswith(
        "/3, searching)")


def test_a_stop_is_marked_as_it_arrives_not_when_the_cell_ends(tiny_search, tmp_path, monkeypatch):
    """A real Tune run: the stopper ends the trial at its second report. The marker must be there when Tune
    completes the trial, not only after the experiment, so a search interrupted later in the cell keeps it."""
    ray_tune = pytest.importorskip("ray.tune")
    records = "".join(json.dumps(r) + "\n" for r in RECORDS)

    def reports_until_stopped(tune_config):  # self-contained: Ray ships it to a worker by value
        from ray import tune as tune_in_worker
        run_dir = Path(tune_config["trial"]["folder"]) / "lstm-parity-20260101-000000-abcdef01"
        run_dir.mkdir(parents=True)
        (run_dir / "args.json").write_text("{}")
        (run_dir / "metrics.jsonl").write_text(records)
        for step in range(1, 100):
            tune_in_worker.report({"step": step, "epochs": step / 6, "best_score": 10.0 * step})
            time.sleep(0.2)

    marker = tmp_path / "t" / tune.STOPPED_MARKER
    marked_at_completion = []

    class CheckedAtCompletion(type(tune.stop_marker_callback(ray_tune))):
        def on_trial_complete(self, iteration, trials, trial, **info):
            marked_at_completion.append(marker.is_file())

    monkeypatch.setattr(tune, "run_trial", reports_until_stopped)
    monkeypatch.setattr(tune, "stop_marker_callback", lambda ray_tune: CheckedAtCompletion())
    failed = tune.run_tuner(ray_tune, [{"folder": str(tmp_path / "t")}], {"cpu": 1}, "stop-marker",
                            tmp_path / "ray", scheduler=None, stopper=lambda trial_id, result: result["step"] >= 2)
    assert failed == []  # a stop is not a failure
    assert marked_at_completion == [True]
    assert json.loads(marker.read_text()) == {"epochs": 2 / 6, "best_score": 20.0}
    assert tune.trial_status(tmp_path / "t")[0] == "stopped early"


def test_a_trial_main_py_finished_gets_no_marker_whatever_the_last_result_says(tmp_path):
    ray_tune = pytest.importorskip("ray.tune")
    write_run_dir(tmp_path, RECORDS, finished=True)
    trial = type("Trial", (), {"config": {"trial": {"folder": str(tmp_path)}}})()
    tune.stop_marker_callback(ray_tune).on_trial_result(0, [trial], trial, {"done": True, "epochs": 1.0})
    assert not (tmp_path / tune.STOPPED_MARKER).exists()


def test_stopping_one_search_leaves_the_trials_of_another_search_running(tmp_path):
    """Two searches on different cells share the work_dir; Ctrl-C on one must not stop the other's trials."""
    from test_sweep import start_fake_main

    own_folder = tmp_path / "parity" / "lstm" / "lr1e-3-l1-h64-n1-seed1"
    own = start_fake_main(own_folder)
    other = start_fake_main(tmp_path / "parity" / "deltanet" / "lr1e-3-l1-h64-n4-seed1")
    args = tune.parse_args(["--tasks", "parity", "--models", "0", "2", "--work_dir", str(tmp_path)])
    # Both cells are in this driver's command, but the DeltaNet one was skipped as another driver holds it.
    own_cell, skipped_cell = (tune.Cell(args, "parity", model_type, 1) for model_type in (0, 2))
    assert own_cell.claim()
    try:
        with pytest.raises(KeyboardInterrupt):
            with tune.stopping_cleanly(lambda: tune.running_pid_files([own_cell, skipped_cell])):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler runs at the next bytecode; this is not reached
        assert own.wait(timeout=5) == 143 and (own_folder / "saved").is_file()
        assert other.poll() is None
    finally:
        own.kill()
        other.kill()


def test_a_cell_is_held_by_one_driver_at_a_time(tmp_path):
    args = tune.parse_args(["--work_dir", str(tmp_path)])
    first, second = tune.Cell(args, "parity", 2, 1), tune.Cell(args, "parity", 2, 1)
    assert first.claim() and not second.claim()
    first.release()
    assert second.claim()
    second.release()


def test_a_file_system_without_flock_leaves_the_cell_unguarded_not_the_search_stopped(tmp_path, monkeypatch, capsys):
    import errno

    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(utils.fcntl, "flock", no_flock)
    cell = tune.Cell(tune.parse_args(["--work_dir", str(tmp_path)]), "parity", 2, 1)
    assert cell.claim() and cell.lock is not None
    assert "warning: parity DeltaNet: cannot lock tune.lock on this file system" in capsys.readouterr().err
    cell.release()


def test_a_cell_another_driver_holds_is_skipped(tiny_search, tmp_path):
    root = tiny_search[0]
    argv = ["--tasks", "parity", "--models", "0", "--work_dir", str(tmp_path), "--data_root", str(root / "data"),
            *TINY_SPACE]
    other_driver = tune.Cell(tune.parse_args(argv), "parity", 0, 1)
    assert other_driver.claim()
    out = io.StringIO()
    with redirect_stdout(out):
        assert tune.main(argv) == 0
    other_driver.release()
    assert "parity LSTM: skipped, another tune.py is working on it" in out.getvalue()
    assert sorted(p.name for p in (tmp_path / "parity" / "lstm").iterdir()) == [tune.CELL_LOCK]


def test_the_seeds_wait_until_every_trial_has_ended():
    trial = {"name": "a", "status": "finished", "best_score": 50.0, "best_step": 10}
    failed = {"name": "b", "status": "unfinished", "best_score": 10.0, "best_step": 5}
    assert tune.ready_for_seeds({"best": "a", "trials": [trial, dict(trial, name="c", status="stopped early")]})
    assert not tune.ready_for_seeds({"best": "a", "trials": [trial, failed]})
    assert not tune.ready_for_seeds({"best": None, "trials": [dict(failed, best_score=None)]})


FAILED_LINE = "trial(s) failed (main.py reported an error: fix its cause, then run the same command again): "


def test_a_search_whose_trials_fail_exits_1_and_names_them(local_ray, tmp_path, capfd):
    """Each failed trial gets one line with main.py's error (from its run.log), and no Ray traceback is shown."""
    write_tiny_parity(tmp_path / "data" / "parity")
    (tmp_path / "data" / "parity" / "valid_50.src").unlink()  # main.py cannot load the dataset
    ray_errors = RecordsAt(logging.ERROR)
    logging.getLogger("ray.tune").addHandler(ray_errors)  # Ray's own handlers may write where capfd cannot see
    try:
        code = tune.main(search_argv(tmp_path))
    finally:
        logging.getLogger("ray.tune").removeHandler(ray_errors)
    assert ray_errors.records == []  # Ray's log of each trial error, with the worker's traceback
    out, err = capfd.readouterr()
    assert code == 1, out + err
    assert out.splitlines()[-1] == (f"2 {FAILED_LINE}parity LSTM lr1e-3-l1-h8-n1-seed1; "
                                    f"parity LSTM lr3e-3-l1-h8-n1-seed1")
    for trial in ("lr1e-3-l1-h8-n1-seed1", "lr3e-3-l1-h8-n1-seed1"):
        [line] = [line for line in out.splitlines() if line.startswith(f"warning: trial {trial} failed: ")]
        assert "valid_50.src: no such file" in line, line
    assert "Traceback" not in out + err and "\x1b[" not in out + err, out + err


class RecordsAt(logging.Handler):
    def __init__(self, level):
        super().__init__(level)
        self.records = []

    def emit(self, record):
        self.records.append(record.getMessage())


def test_the_advice_on_failed_trials_fits_their_cause(tmp_path):
    failed, killed = tmp_path / "failed", tmp_path / "killed"
    for folder, output in ((failed, "error: --learning_rate must be a positive finite number, got -0.001\n"),
                           (killed, "Starting run ...\n")):
        folder.mkdir()
        (folder / tune.RUN_LOG).write_text(f"==== earlier start\nerror: an old error\n==== 2026 main.py\n{output}")
    assert tune.failure_advice([failed]).startswith("main.py reported an error: fix its cause")
    assert tune.failure_advice([killed]) == "interrupted or killed: run the same command again to resume them"
    assert "1 with a main.py error" in tune.failure_advice([failed, killed])


def kill_once_checkpointed(trial_folder, killed, timeout=120.0):
    """SIGKILLs the trial's main.py once it has written its first latest_model.pt; appends the run dir to `killed`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = experiment.running_main_py(trial_folder / tune.PID_FILE)
        checkpointed = [d for d in experiment.run_dirs(trial_folder) if (d / "latest_model.pt").is_file()]
        if pid is not None and checkpointed:
            os.kill(pid, signal.SIGKILL)
            killed.append(checkpointed[0])
            return
        time.sleep(0.05)


# Slow (about 40 s: two searches with seeds on Ray). Its parts are in the default suite: a failed trial named with
# exit 1, an interrupted trial resumed, main.py's resume after a kill and after a failed checkpoint write.
@pytest.mark.slow
def test_a_trial_killed_while_checkpointing_resumes_on_a_relaunch_that_reruns_nothing_finished(local_ray, tmp_path):
    """kill -9 of one trial's main.py mid-training; it leaves a half-written latest_model.pt.tmp (save_checkpoint
    writes there, then renames). The search ends with the trial failed; the relaunch resumes it from its
    latest_model.pt and leaves the trial that finished as it was."""
    # 200 batches an epoch and labels no model can learn: seconds of training after the first checkpoint, in
    # which the kill lands, and no early stop at 100 %.
    write_tiny_parity(tmp_path / "data" / "parity", train_lines=64 * 200, random_labels=True)
    argv = search_argv(tmp_path)
    cell = tmp_path / "search" / "parity" / "lstm"
    finished, victim = cell / "lr1e-3-l1-h8-n1-seed1", cell / "lr3e-3-l1-h8-n1-seed1"
    killed = []
    killer = threading.Thread(target=kill_once_checkpointed, args=(victim, killed), daemon=True)
    killer.start()
    out = io.StringIO()
    with redirect_stdout(out):
        code = tune.main(argv)
    killer.join()
    assert killed, "the trial ended before it could be killed"
    assert code == 1 and out.getvalue().splitlines()[-1] == f"1 {FAILED_LINE}parity LSTM {victim.name}", out.getvalue()
    [run_dir] = killed
    checkpoint = (run_dir / "latest_model.pt").read_bytes()
    (run_dir / "latest_model.pt.tmp").write_bytes(checkpoint[:len(checkpoint) // 2])
    [finished_run] = experiment.run_dirs(finished)
    stamp, log = (finished_run / "final.json").stat().st_mtime_ns, (finished / tune.RUN_LOG).read_text()

    out = io.StringIO()
    with redirect_stdout(out):
        assert tune.main(argv) == 0, out.getvalue()
    assert (finished_run / "final.json").stat().st_mtime_ns == stamp
    assert (finished / tune.RUN_LOG).read_text() == log  # replayed: no main.py started
    assert experiment.run_dirs(victim) == [run_dir] and (run_dir / "final.json").is_file()
    launches = [line for line in (victim / tune.RUN_LOG).read_text().splitlines() if line.startswith("==== ")]
    assert len(launches) == 2 and launches[1].endswith(f"--resume {run_dir}")
    assert "Resumed after epoch" in (victim / tune.RUN_LOG).read_text()
    assert not (run_dir / "latest_model.pt.tmp").exists()  # the next checkpoint wrote over it and renamed it
    summary = json.loads((cell / tune.SUMMARY_FILE).read_text())
    assert [t["status"] for t in summary["trials"]] == ["finished", "finished"]
    assert [s["status"] for s in summary["seeds"]] == ["finished", "finished"]


def signal_once_checkpointed(trial_folder, signalled, timeout=120.0):
    """SIGTERMs this process (the driver) once the trial's main.py has written its first latest_model.pt."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        checkpointed = [d for d in experiment.run_dirs(trial_folder) if (d / "latest_model.pt").is_file()]
        if experiment.running_main_py(trial_folder / tune.PID_FILE) is not None and checkpointed:
            signalled.append(checkpointed[0])
            os.kill(os.getpid(), signal.SIGTERM)
            return
        time.sleep(0.05)


def test_a_search_stopped_mid_trial_leaves_a_summary_that_matches_its_folders(local_ray, tmp_path):
    """SIGTERM to the driver while the cell's first trial trains: the trial saves, the driver exits 130, and the
    cell's search.json (the first one it has) says what the trial folders say: that trial unfinished with the
    best score of its metrics, no seed run started."""
    write_tiny_parity(tmp_path / "data" / "parity", train_lines=64 * 200, random_labels=True)
    argv = search_argv(tmp_path)
    cell = tmp_path / "search" / "parity" / "lstm"
    victim = cell / "lr1e-3-l1-h8-n1-seed1"
    signalled = []
    signaller = threading.Thread(target=signal_once_checkpointed, args=(victim, signalled), daemon=True)
    signaller.start()
    with redirect_stdout(io.StringIO()):
        code = tune.main(argv + ["--parallel", "1"])
    signaller.join()
    assert signalled, "the trial ended before the driver could be stopped"
    assert code == 130
    summary = json.loads((cell / tune.SUMMARY_FILE).read_text())
    assert summary == tune.Cell(tune.parse_args(argv), "parity", 0, 1).summary()
    trials = {t["name"]: t for t in summary["trials"]}
    assert trials[victim.name]["status"] == "unfinished" and trials[victim.name]["best_score"] is not None
    assert trials["lr3e-3-l1-h8-n1-seed1"]["status"] in ("not started", "started", "unfinished")  # Ray's timing
    assert all(s["status"] == "not started" for s in summary["seeds"])
