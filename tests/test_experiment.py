"""scripts/experiment.py: main.py's flags against what scripts/train.sh runs (and what the scripts ran through it
before), the hparams csv reader and writer, the launcher (run.log header, main.pid, environment, stop on leaving)
and the run-directory reader with its score."""
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "scripts"))

import experiment  # noqa: E402
import main  # noqa: E402
import sweep  # noqa: E402
import tune  # noqa: E402
from experiment import HParams  # noqa: E402
from utils import selection_score  # noqa: E402

TRAIN_SH = REPO_ROOT / "scripts" / "train.sh"
ROW = HParams(num_layer=1, hidden_size=32, n_head=4, ff_factor=2, batch_size=16, learning_rate="3e-4", num_epoch=30)


def stub_python(tmp_path):
    """An interpreter for train.sh's PYTHON that prints its working directory, the two variables train.sh sets, and
    its arguments, one per line after a `--` line."""
    script = tmp_path / "stub_python"
    script.write_text('#!/bin/sh\necho "$PWD"\necho "${CUDA_VISIBLE_DEVICES-unset}"\necho "$TORCH_EXTENSIONS_DIR"\n'
                      'echo --\nfor arg in "$@"; do echo "$arg"; done\n')
    script.chmod(0o755)
    return script


def train_sh(tmp_path, positional, extra=(), env=None):
    """(working directory, CUDA_VISIBLE_DEVICES, TORCH_EXTENSIONS_DIR, argv) of the main.py that train.sh starts."""
    env = dict(os.environ if env is None else env, PYTHON=str(stub_python(tmp_path)))
    result = subprocess.run(["bash", str(TRAIN_SH), *positional, *extra], cwd=tmp_path, env=env,
                            capture_output=True, text=True, check=True)
    lines = result.stdout.splitlines()
    separator = lines.index("--")
    return (*lines[:separator], lines[separator + 1:])


def positional(task, model_type, hparams):
    """train.sh's eight positional arguments for a configuration."""
    return [task, str(model_type), str(hparams.num_layer), str(hparams.hidden_size), str(hparams.n_head),
            str(hparams.ff_factor), str(hparams.batch_size), hparams.learning_rate]


def parsed(argv):
    return vars(main.build_parser().parse_args(argv))


# -- main.py's flags -----------------------------------------------------------------------------------------------

def test_main_args_are_what_train_sh_passes_to_main_py(tmp_path):
    """train.sh fixes seed 1 and 300 epochs; with those, main_args is its argv to the letter, extra flags last."""
    extra = ["--work_dir", "/runs/x", "--num_epoch", "3"]
    hparams = HParams(**{**ROW.__dict__, "num_epoch": 300})
    argv = train_sh(tmp_path, positional("parity", 7, hparams), extra)[-1]
    assert argv == ["main.py", *experiment.main_args("parity", 7, hparams, seed=1, extra=extra)]


def test_every_row_of_hparams_csv_trains_as_the_old_sweep_trained_it(tmp_path):
    """The sweep ran `train.sh <row> --num_epoch N --seed S --data_dir D --work_dir W <extra>`; main.py gets the same
    flags from it now."""
    table = experiment.read_hparams(REPO_ROOT / "scripts" / "hparams.csv")
    assert len(table) == 56
    for (task, model_type), hparams in table.items():
        config = sweep.Config(task, model_type, 2, hparams)
        extra = ["--report_every", "0"]
        old = train_sh(tmp_path, positional(task, model_type, hparams),
                       ["--num_epoch", str(hparams.num_epoch), "--seed", "2", "--data_dir", f"/data/{task}",
                        "--work_dir", "/w", *extra])[-1]
        new = sweep.train_args(config, "/w", "/data", extra)
        assert parsed(new) == parsed(old[1:]), (task, model_type)


def test_a_trial_trains_as_the_old_tune_trained_it(tmp_path):
    """tune.py ran `train.sh <trial> --num_epoch CAP --seed S --data_dir D --work_dir W`."""
    trial = {"learning_rate": "1e-3", "num_layer": 2, "hidden_size": 128, "n_head": 8, "batch_size": 32}
    hparams = tune.trial_configuration(trial, tune.FF_FACTOR, 40)
    old = train_sh(tmp_path, positional("dyck-1", 12, hparams),
                   ["--num_epoch", "40", "--seed", "3", "--data_dir", "/data/dyck-1", "--work_dir", "/w/t"])[-1]
    new = tune.trial_args("dyck-1", 12, trial, 3, 40, "/data", "/w/t")
    assert parsed(new) == parsed(old[1:])
    assert parsed(new)["batch_size"] == 32 and parsed(new)["num_epoch"] == 40 and parsed(new)["remove_pos_enc"]


@pytest.mark.parametrize("variables", [
    {"HOME": "/home/a"},
    {"HOME": "/home/a", "XDG_CACHE_HOME": "/cache"},
    {"HOME": "/home/a", "XDG_CACHE_HOME": "", "TORCH_EXTENSIONS_DIR": ""},
    {"HOME": "/home/a", "TORCH_EXTENSIONS_DIR": "/ext", "CUDA_VISIBLE_DEVICES": ""},
    {"HOME": "/home/a", "CUDA_VISIBLE_DEVICES": "1,2"},
])
def test_main_py_starts_where_and_with_the_environment_train_sh_gives_it(tmp_path, monkeypatch, variables):
    base = {"PATH": os.environ["PATH"], **variables}
    cwd, cuda, extensions, _ = train_sh(tmp_path, positional("parity", 0, ROW), env=base)
    monkeypatch.setattr(os, "environ", dict(base))
    env = experiment.main_environment({"OMP_NUM_THREADS": "1"})
    assert (cwd, cuda, extensions) == (str(experiment.REPO_ROOT), env["CUDA_VISIBLE_DEVICES"],
                                       env["TORCH_EXTENSIONS_DIR"])
    assert env["OMP_NUM_THREADS"] == "1"


# -- the hparams csv -----------------------------------------------------------------------------------------------

HEADER = ",".join(experiment.HPARAM_COLUMNS) + "\n"


def test_hparams_csv_rows_become_typed_configurations():
    table = experiment.read_hparams(REPO_ROOT / "scripts" / "hparams.csv")
    assert list(table)[:2] == [("parity", 0), ("parity", 10)]  # file order
    assert table[("parity", 7)] == HParams(num_layer=1, hidden_size=64, n_head=4, ff_factor=4, batch_size=64,
                                           learning_rate="1e-3", num_epoch=30)


def test_what_write_hparams_writes_read_hparams_reads_back(tmp_path):
    table = {("dyck-1", 12): ROW, ("parity", 0): HParams(1, 64, 1, 4, 64, "1e-3", 40)}
    experiment.write_hparams(tmp_path / "h.csv", table)
    assert experiment.read_hparams(tmp_path / "h.csv") == table
    assert (tmp_path / "h.csv").read_text().splitlines()[:2] == [HEADER.strip(), "dyck-1,12,1,32,4,2,16,3e-4,30"]


@pytest.mark.parametrize("body, message", [
    ("parity,5,1,8,1,1,16,1e-3,1\n", "line 2: model_type must be one of"),
    ("parity,0,1,8,1,1,16,1e-3,1\nparity,0,1,8,1,1,16,1e-3,2\n", "line 3: a second row for task parity"),
    ("parity,0,1,8.5,1,1,16,1e-3,1\n", "line 2: hidden_size must be a whole number, got '8.5'"),
])
def test_bad_csv_rows_are_one_line_errors(tmp_path, body, message):
    (tmp_path / "h.csv").write_text(HEADER + body)
    with pytest.raises(experiment.ExperimentError, match=message):
        experiment.read_hparams(tmp_path / "h.csv")


def test_a_csv_without_a_column_or_a_file_is_one_line_error(tmp_path):
    (tmp_path / "h.csv").write_text("task,model_type\nparity,0\n")
    with pytest.raises(experiment.ExperimentError, match="missing column"):
        experiment.read_hparams(tmp_path / "h.csv")
    with pytest.raises(experiment.ExperimentError, match="cannot read"):
        experiment.read_hparams(tmp_path / "none.csv")


# -- launching -----------------------------------------------------------------------------------------------------

def test_a_run_logs_its_command_and_its_pid_while_it_runs(tmp_path, monkeypatch):
    """main_command stands in for a program that reports where it runs and then waits to be stopped."""
    program = "import os, time; print(os.getcwd(), os.environ['OMP_NUM_THREADS'], flush=True); time.sleep(60)"
    monkeypatch.setattr(experiment, "main_command", lambda args: [sys.executable, "-c", program, *args])
    pid_file = tmp_path / experiment.PID_FILE
    with experiment.main_running(["--seed", "2"], tmp_path, {"OMP_NUM_THREADS": "3"}) as proc:
        assert int(pid_file.read_text()) == proc.pid
        deadline = time.monotonic() + 30
        while len((tmp_path / experiment.RUN_LOG).read_text().splitlines()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert proc.returncode == -15  # SIGTERM on leaving while it ran
    assert not pid_file.exists()
    header, output = (tmp_path / experiment.RUN_LOG).read_text().splitlines()
    assert header.startswith("==== ") and header.endswith(shlex.join([sys.executable, "-c", program, "--seed", "2"]))
    assert output == f"{experiment.REPO_ROOT} 3"


def test_a_run_to_its_end_gives_main_py_s_exit_status(tmp_path):
    assert experiment.run_to_end(["--model_type", "3"], tmp_path, {}) == 2  # main.py's usage error
    header, *rest = (tmp_path / experiment.RUN_LOG).read_text().splitlines()
    assert header.endswith(f"{sys.executable} main.py --model_type 3")
    assert rest[-1].startswith("error: ") and not (tmp_path / experiment.PID_FILE).exists()


# -- run directories -----------------------------------------------------------------------------------------------

def make_run_dir(folder, name, mtime, records=(), final=None, text=None):
    run_dir = folder / name
    run_dir.mkdir(parents=True)
    (run_dir / "args.json").write_text("{}")
    os.utime(run_dir / "args.json", (mtime, mtime))
    (run_dir / "metrics.jsonl").write_text(text if text is not None else "".join(json.dumps(r) + "\n"
                                                                                  for r in records))
    if final is not None:
        (run_dir / "final.json").write_text(json.dumps(final))
    return run_dir


def record(step, valid, valid2):
    return {"step": step, "valid_acc": valid, "valid2_acc": valid2}


def test_run_dirs_are_ordered_by_when_main_py_wrote_their_flags(tmp_path):
    newer = make_run_dir(tmp_path, "a-newer", 2000)
    older = make_run_dir(tmp_path, "b-older", 1000)
    (tmp_path / "not-a-run").mkdir()
    assert experiment.run_dirs(tmp_path) == [older, newer]
    assert experiment.latest_run_dir(tmp_path) == newer
    assert experiment.latest_run_dir(tmp_path / "none") is None and experiment.run_dirs(tmp_path / "none") == []


def test_metrics_end_before_a_line_being_written_and_the_best_is_the_earliest_of_equals(tmp_path):
    lines = [json.dumps(record(1, 50.0, 10.0)), "", json.dumps(record(2, 40.0, 20.0)),
             json.dumps(record(3, 60.0, 0.0)), '{"step": 4, "valid_a']
    run_dir = make_run_dir(tmp_path, "r", 1000, text="\n".join(lines))
    records = experiment.read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert experiment.best_evaluation(records)["step"] == 1  # 30 % three times: the first one
    assert experiment.best_evaluation([]) is None
    assert experiment.read_metrics(tmp_path / "none") == []


def test_final_json_says_whether_a_run_has_finished(tmp_path):
    running = make_run_dir(tmp_path, "running", 1000)
    finished = make_run_dir(tmp_path, "finished", 1000, final={"valid_acc": 100.0})
    assert experiment.read_final(running) is None and not experiment.is_finished(running)
    assert experiment.read_final(finished) == {"valid_acc": 100.0} and experiment.is_finished(finished)
    assert not experiment.is_finished(None) and not experiment.has_checkpoint(running)


def test_the_score_is_the_mean_of_valid_and_valid2_everywhere():
    assert selection_score(100.0, 50.0) == 75.0
    assert experiment.evaluation_score(record(1, 90.0, 10.0)) == 50.0
    assert main.selection_score is selection_score and tune.experiment.selection_score is selection_score
