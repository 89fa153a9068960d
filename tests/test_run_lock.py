"""One process per run directory: main.py's lock on it (utils.RUN_LOCK), as a second main.py, a process killed with
SIGKILL, a file system without flock, and scripts/sweep.py and scripts/tune.py meet it."""
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import main
import utils
from test_main import TINY, read_metrics, run_main, tiny_data  # noqa: F401 (tiny_data: the fixture)

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import experiment  # noqa: E402
import sweep  # noqa: E402
import tune  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# Long enough that the run is still training when the test acts on it; the test ends it.
LONG = ["--num_epoch", "400", "--stop_acc", "101"]


def start_training(tmp_path, argv, evaluations):
    """A real main.py with `argv`, its output in a file; (process, run directory) once its metrics.jsonl holds
    `evaluations` lines."""
    with open(tmp_path / "holder.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "main.py", *argv], cwd=REPO, env=ENV, stdout=log,
                                stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        metrics = list((tmp_path / "runs").glob("*/metrics.jsonl"))
        if metrics and metrics[0].read_text().count("\n") >= evaluations:
            return proc, metrics[0].parent
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"main.py did not get to {evaluations} evaluations: {(tmp_path / 'holder.log').read_text()}")


def files(run_dir):
    return {path.name: path.read_bytes() for path in sorted(run_dir.iterdir())}


@pytest.mark.parametrize("holder", ["new run", "resume"])
def test_a_second_main_py_on_a_run_directory_in_use_is_refused_and_writes_nothing(tmp_path, tiny_data, holder):
    if holder == "new run":
        argv, evaluations = ["--data_dir", str(tiny_data), "--work_dir", str(tmp_path / "runs"), *TINY, *LONG], 2
    else:  # the case: two `main.py --resume RUN` on one run directory
        code, run_dir = run_main(tmp_path, tiny_data, *TINY)
        assert code == 0
        argv, evaluations = ["--resume", str(run_dir), *LONG], len(read_metrics(run_dir)) + 2
    first, run_dir = start_training(tmp_path, argv, evaluations)
    try:
        first.send_signal(signal.SIGSTOP)  # holding the lock, and writing nothing while the second one tries
        before = files(run_dir)
        second = subprocess.run([sys.executable, "main.py", "--resume", str(run_dir), "--num_epoch", "2"], cwd=REPO,
                                env=ENV, capture_output=True, text=True, timeout=300)
        assert second.returncode == main.EXIT_USAGE
        assert second.stdout == ""
        assert second.stderr == (f"error: {run_dir} is in use by another main.py (process {first.pid}): one process "
                                 f"per run directory; run the command again once it has ended\n")
        assert files(run_dir) == before  # byte for byte: no log line, no args.json, no truncated metrics.jsonl
    finally:
        first.send_signal(signal.SIGCONT)
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=300)
    assert first.returncode == 128 + signal.SIGTERM
    # The first run's files are its own alone: one record per evaluation it made, logged once each.
    progress = main.load_checkpoint(run_dir / "latest_model.pt")["progress"]
    log = (run_dir / "log.txt").read_text()
    assert len(read_metrics(run_dir)) == progress["evaluations"] == log.count("valid2 acc: ")
    assert log.count("Start training") == (1 if holder == "new run" else 2)


def test_a_lock_left_by_a_main_py_killed_with_sigkill_does_not_block_a_resume(tmp_path, tiny_data, capsys):
    killed, run_dir = start_training(
        tmp_path, ["--data_dir", str(tiny_data), "--work_dir", str(tmp_path / "runs"), *TINY, *LONG], 2)
    killed.kill()
    killed.wait(timeout=60)
    lock = run_dir / utils.RUN_LOCK
    assert lock.read_text() == f"{killed.pid}\n" and utils.lock_holder(lock) is None  # its id stays, not its lock
    assert main.main(["--resume", str(run_dir), "--num_epoch", "3"]) == 0
    assert (run_dir / "final.json").is_file() and "error" not in capsys.readouterr().err
    assert lock.read_text() == f"{os.getpid()}\n"


def test_a_file_system_without_flock_warns_once_and_trains(tmp_path, tiny_data, monkeypatch, capsys):
    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(utils.fcntl, "flock", no_flock)
    code, run_dir = run_main(tmp_path, tiny_data, *TINY, "--num_epoch", "1")
    assert code == 0 and (run_dir / "final.json").is_file()
    err = capsys.readouterr().err
    assert err == f"warning: {run_dir}: cannot lock {utils.RUN_LOCK} on this file system; keep other main.py " \
                  f"processes off this run directory\n"


def held_run_dir(folder):
    """A run directory in `folder` as a main.py still before its first checkpoint leaves it, held by this process
    (the other main.py); (run directory, the lock's descriptor)."""
    run_dir = folder / "lstm-parity-20261208-000000-0000aa"
    run_dir.mkdir(parents=True)
    (run_dir / "args.json").write_text("{}")
    return run_dir, utils.hold_lock(run_dir / utils.RUN_LOCK, "no flock")


def test_sweep_leaves_a_run_directory_in_use_to_its_process(tmp_path, capsys):
    from test_sweep import TINY_CSV, sweep_args, write_tiny_parity
    (tmp_path / "hparams.csv").write_text(TINY_CSV)
    write_tiny_parity(tmp_path / "data" / "parity")
    folder = tmp_path / "runs" / "parity" / "lstm-seed1"
    run_dir, lock = held_run_dir(folder)
    try:
        code = sweep.main(sweep_args(tmp_path, "--models", "0", "--no_ray"))
    finally:
        os.close(lock)
    assert code == 1
    message = experiment.in_use_message(run_dir, os.getpid())
    assert capsys.readouterr().out.splitlines() == [
        f"[1/1] parity LSTM seed 1: {message}",
        "0 of 1 configurations finished; 0 failed; 1 in use elsewhere: parity LSTM seed 1"]
    assert message.startswith(f"{run_dir} is in use by process {os.getpid()}")
    assert experiment.run_dirs(folder) == [run_dir]  # not deleted as a run that died before its first checkpoint


def test_sweep_reports_main_py_refusing_a_run_directory_another_process_took(tmp_path):
    folder = tmp_path / "parity" / "lstm-seed1"
    run_dir, lock = held_run_dir(folder)
    try:
        assert sweep.outcome(folder, main.EXIT_USAGE) == (experiment.in_use_message(run_dir, os.getpid()),
                                                          sweep.IN_USE)
    finally:
        os.close(lock)
    assert sweep.outcome(folder, main.EXIT_USAGE)[1] == sweep.FAILED  # once it has ended: a failure like any other


def test_a_trial_whose_run_directory_is_in_use_fails_with_the_reason_and_keeps_it(tmp_path):
    pytest.importorskip("ray")
    folder = tmp_path / "parity" / "lstm" / "lr1e-3-l1-h8-n1-seed1"
    run_dir, lock = held_run_dir(folder)
    trial = {"folder": str(folder), "main_args": [], "env": {}, "batches_per_epoch": 1}
    try:
        with pytest.raises(RuntimeError) as raised:
            tune.run_trial({"trial": trial, "report": False})
    finally:
        os.close(lock)
    assert str(raised.value) == experiment.in_use_message(run_dir, os.getpid())
    assert experiment.run_dirs(folder) == [run_dir] and not (folder / experiment.RUN_LOG).exists()
