"""What a job scheduler, a full disk or a file from someone else throws at a run: checkpoints that cannot run code,
signals at every moment of start-up and during a kernel build, a checkpoint write that fails. Real subprocesses and
real signals where the behaviour depends on the process (signal handlers, exit status, what is printed)."""
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import main
from test_main import REPO, TINY, run_main, write_tiny_parity
from utils import RUN_LOCK

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def main_py(*flags, **kwargs):
    return subprocess.run([sys.executable, "main.py", *flags], cwd=REPO, env=kwargs.pop("env", ENV),
                          capture_output=True, text=True, timeout=300, **kwargs)


def snapshot(directory):
    """Every file below `directory` with its bytes: what "nothing changed on disk" compares. main.lock is the lock
    of whichever main.py last held the directory (its pid inside), not part of the run."""
    return {path.relative_to(directory): path.read_bytes() for path in sorted(directory.rglob("*"))
            if path.is_file() and path.name != RUN_LOCK}


def error_lines(text):
    return [line for line in text.splitlines() if line.startswith("error:")]


def assert_one_error_line(result, *words):
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    [line] = error_lines(result.stderr)
    assert all(word in line for word in words), line


@pytest.fixture
def tiny_data(tmp_path):
    return write_tiny_parity(tmp_path / "data" / "tiny")


@pytest.fixture
def finished_run(tmp_path, tiny_data):
    """A real run directory of one epoch, finished: resumable again with --num_epoch 2 (from latest_model.pt),
    or, with its final.json removed, one whose training is over and whose end reads best_model.pt."""
    code, run_dir = run_main(tmp_path, tiny_data, *TINY, "--num_epoch", "1", "--stop_acc", "101")
    assert code == 0
    return run_dir


# -- checkpoints ------------------------------------------------------------------------------------------------

class CreatesFile:
    """Unpickling this calls open(path, "w"): a stand-in for any code a hostile checkpoint could run."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def hostile_checkpoint(path, marker):
    torch.save({"format": 2, "model": CreatesFile(marker), "optimizer": {}, "grads": [], "progress": {},
                "rng": {}, "best": {}}, path)


def test_the_hostile_object_of_these_tests_does_run_code_when_unpickled():
    """Without this, the tests below would prove nothing: the pickled object really creates its marker when a full
    unpickler (what torch.load uses unless weights_only) loads it."""
    with tempfile.TemporaryDirectory() as folder:
        marker = Path(folder) / "created"
        pickle.loads(pickle.dumps(CreatesFile(marker)))
        assert marker.exists()


@pytest.mark.parametrize("file, resume_flags", [("latest_model.pt", ["--num_epoch", "2"]), ("best_model.pt", [])])
def test_a_hostile_checkpoint_in_a_copied_run_directory_is_refused_without_running_it(tmp_path, finished_run, file,
                                                                                    resume_flags):
    copy = tmp_path / "from a colleague"
    shutil.copytree(finished_run, copy)
    (copy / "final.json").unlink()
    marker = tmp_path / "created by the checkpoint"
    hostile_checkpoint(copy / file, marker)
    before = snapshot(copy)
    result = main_py("--resume", str(copy), *resume_flags)
    assert result.returncode == 2
    assert_one_error_line(result, file, "io.open", "could run code")
    assert not marker.exists()
    assert snapshot(copy) == before


@pytest.mark.parametrize("file, resume_flags", [("latest_model.pt", ["--num_epoch", "2"]), ("best_model.pt", [])])
def test_a_truncated_checkpoint_is_one_error_line(tmp_path, finished_run, file, resume_flags):
    (finished_run / "final.json").unlink()
    path = finished_run / file
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    before = snapshot(finished_run)
    result = main_py("--resume", str(finished_run), *resume_flags)
    assert result.returncode == 2
    assert_one_error_line(result, file, "truncated")
    assert snapshot(finished_run) == before


def old_format(state):
    """The checkpoint as main.py wrote it before checkpoints became weights-only: NumPy's RNG state as NumPy
    objects, no format key."""
    state = dict(state)
    del state["format"]
    state["rng"] = dict(state["rng"], numpy=np.random.get_state())
    return state


def missing_grads(state):
    return {key: value for key, value in state.items() if key != "grads"}


def other_model(state):
    return dict(state, model={"weight": torch.zeros(3)})


def wider_model(state):
    """The weights of the same kind of model at twice the hidden size: torch's own error would name only the
    class ("Error(s) in loading state_dict for RecurrentModel:")."""
    return dict(state, model={key: torch.zeros([2 * n for n in value.shape]) for key, value in state["model"].items()})


def bare_state_dict(state):
    """What `torch.save(model.state_dict(), "latest_model.pt")` writes."""
    return state["model"]


@pytest.mark.parametrize("change, words", [
    (old_format, ["earlier main.py", "start the run again"]),
    (missing_grads, ["no grads"]),
    (other_model, ["another model", "RecurrentModel", "missing (first: ", "1 unexpected (first: weight)"]),
    (wider_model, ["another model", "other shapes (first: ", "in the file", "here)"]),
    (bare_state_dict, ["bare state_dict", "not a checkpoint of main.py"]),
    (lambda state: {"epoch": 3, "weights": [1]}, ["not a checkpoint of main.py", "epoch, weights"]),
    (lambda state: torch.zeros(3), ["holds a Tensor"]),
])
def test_a_checkpoint_that_is_not_this_runs_is_one_error_line(tmp_path, finished_run, capsys, change, words):
    path = finished_run / "latest_model.pt"
    torch.save(change(torch.load(path, weights_only=True)), path)
    before = snapshot(finished_run)
    capsys.readouterr()
    assert main.main(["--resume", str(finished_run), "--num_epoch", "2"]) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert str(path) in line and all(word in line for word in words), line
    assert snapshot(finished_run) == before


@pytest.mark.parametrize("text", ["not a checkpoint\n", "0 1 0\n", ""])  # "0 ..." made torch say "pop from empty list"
def test_a_text_file_as_checkpoint_is_one_error_line(tmp_path, finished_run, capsys, text):
    (finished_run / "latest_model.pt").write_text(text)
    capsys.readouterr()
    assert main.main(["--resume", str(finished_run), "--num_epoch", "2"]) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert "not a PyTorch checkpoint" in line and "pop from empty list" not in line, line


def test_a_run_killed_while_writing_its_first_checkpoint_is_not_resumable_and_says_how_to_start_again(
        tmp_path, finished_run, capsys):
    for name in ("latest_model.pt", "best_model.pt", "final.json"):
        (finished_run / name).unlink()
    (finished_run / "latest_model.pt.tmp").write_bytes(b"PK\x03\x04 half of a zip")
    capsys.readouterr()
    assert main.main(["--resume", str(finished_run)]) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert "nothing to resume" in line and "killed while writing its first checkpoint" in line, line
    assert "start the run again with: python main.py --data_dir " in line, line  # the flags of its args.json


def test_no_loader_unpickles_in_full():
    """Every checkpoint load goes through utils.load_checkpoint, which asks for the weights-only unpickler."""
    full_unpickling = "weights_only=" + "False"  # in two parts, so that this file does not match itself
    offenders = [f"{path}:{number}" for path in REPO.rglob("*.py") if ".git" not in path.parts
                 for number, line in enumerate(path.read_text().splitlines(), start=1) if full_unpickling in line]
    assert offenders == []


# -- a checkpoint write that fails ------------------------------------------------------------------------------

def limit_file_size(limit):
    """In the child: files may not grow past `limit` bytes, and a write past it fails with EFBIG instead of the
    default SIGXFSZ kill: to main.py, a write that fails as on a full disk or an exhausted quota."""
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    return apply


def test_a_checkpoint_write_that_fails_keeps_the_previous_one_and_is_one_error_line(tmp_path, finished_run):
    latest = finished_run / "latest_model.pt"
    previous = latest.read_bytes()
    # Room for the small files (log.txt, metrics.jsonl) and best_model.pt, not for a new latest_model.pt.
    limit = len(previous) - 1
    assert (finished_run / "log.txt").stat().st_size < limit // 2
    result = subprocess.run([sys.executable, "main.py", "--resume", str(finished_run), "--num_epoch", "2"], cwd=REPO,
                            env=ENV, capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size(limit))
    assert result.returncode == 2
    assert_one_error_line(result, "latest_model.pt", "cannot write it", "the previous one is kept")
    assert latest.read_bytes() == previous
    assert not list(finished_run.glob("*.tmp"))
    assert not (finished_run / "final.json").exists()
    # Once there is room again, the run carries on from the checkpoint that was kept.
    assert main_py("--resume", str(finished_run), "--num_epoch", "2").returncode == 0


# -- signals ----------------------------------------------------------------------------------------------------

LONG_TINY = [*TINY, "--num_epoch", "300", "--stop_acc", "101"]  # a few seconds of training


def start(tmp_path, *flags, env=ENV):
    return subprocess.Popen([sys.executable, "main.py", "--work_dir", str(tmp_path / "runs"), *flags], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until_main_py_catches_signals(proc, timeout=120):
    """Until main.py's first lines have installed its handlers (SIGTERM caught, in /proc's SigCgt mask). Before,
    the interpreter is still starting up, which no script can guard: a SIGINT there is Python's own
    KeyboardInterrupt in its site module, a SIGTERM the default kill."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with open(f"/proc/{proc.pid}/status") as status:
            caught = next(int(line.split()[1], 16) for line in status if line.startswith("SigCgt:"))
        if caught >> (signal.SIGTERM - 1) & 1:
            return time.monotonic()
        time.sleep(0.002)
    raise AssertionError("main.py never installed its signal handlers")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_at_any_moment_of_start_up_stops_the_run_with_its_status_and_no_traceback(tmp_path, tiny_data,
                                                                                           signum):
    """From the imports to the first batches: each delay lands in another phase (imports, data, model, training)."""
    delays = (0.0, 0.3, 1.0, 2.5)
    name = signal.Signals(signum).name
    for delay in delays:
        proc = start(tmp_path / str(delay), "--data_dir", str(tiny_data), *LONG_TINY)
        caught_from = wait_until_main_py_catches_signals(proc)
        time.sleep(max(0.0, caught_from + delay - time.monotonic()))
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 128 + signum, (delay, out, err)
        assert "Traceback" not in out + err, (delay, err)
        assert f"Stopped by {name}" in out + err, (delay, out, err)


def wait_for_evaluations(work, count, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        metrics = list(work.glob("*/metrics.jsonl"))
        if metrics and len(metrics[0].read_text().splitlines()) >= count:
            return
        time.sleep(0.02)
    raise AssertionError("the run did not reach its evaluations in time")


@pytest.mark.parametrize("first, second", [(signal.SIGTERM, signal.SIGINT), (signal.SIGINT, signal.SIGTERM)])
def test_a_second_signal_during_start_up_stops_at_once_with_the_first_ones_status(tmp_path, tiny_data, first,
                                                                                  second):
    proc = start(tmp_path, "--data_dir", str(tiny_data), *LONG_TINY)
    wait_until_main_py_catches_signals(proc)
    proc.send_signal(first)
    time.sleep(0.2)  # pending together, the lower-numbered signal would be handled first
    proc.send_signal(second)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + first, err
    assert "Traceback" not in out + err and "nothing to resume" in err


def test_a_second_signal_during_the_imports_ends_the_process_even_where_the_interrupted_code_catches_everything():
    """The two signals above land wherever the imports are; inside numpy's C part, an exception raised by the
    handler once left a half-loaded module behind and the stop ended as an ImportError traceback. Here the second
    signal interrupts code that catches every exception and carries on: the process must end there all the same."""
    interrupted_import = textwrap.dedent("""
        import signal, main
        try:
            main.note_early_signal(signal.SIGTERM, None)
            main.note_early_signal(signal.SIGINT, None)
        except BaseException as exc:
            print("caught", type(exc).__name__)
        print("went on")
    """)
    proc = subprocess.run([sys.executable, "-c", interrupted_import], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert proc.stdout == "" and proc.stderr == "Stopped before training started: nothing to resume.\n"


@pytest.mark.parametrize("first, second", [(signal.SIGTERM, signal.SIGINT), (signal.SIGINT, signal.SIGTERM),
                                           (signal.SIGTERM, signal.SIGTERM)])
def test_a_second_signal_during_training_stops_at_once_with_the_first_ones_status(tmp_path, tiny_data, monkeypatch,
                                                                                  capsys, first, second):
    real_train_batch = main.Run.train_batch

    def signalled_twice_in_batch_eight(self, *args):
        if self.progress.step == 7:
            os.kill(os.getpid(), first)  # noted: the run would stop after this batch
            os.kill(os.getpid(), second)  # stops at once
        return real_train_batch(self, *args)

    monkeypatch.setattr(main.Run, "train_batch", signalled_twice_in_batch_eight)
    code, run_dir = run_main(tmp_path, tiny_data, *TINY)
    assert code == 128 + first
    out = capsys.readouterr().out
    assert f"Stopped by {signal.Signals(first).name} after step 7 (latest_model.pt is the last checkpoint)" in out
    assert main.load_checkpoint(run_dir / "latest_model.pt")["progress"]["step"] == 7


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_a_kernel_build_ends_the_run_within_seconds(tmp_path, tiny_data, signum):
    """A first build takes about a minute, longer than a scheduler's grace before SIGKILL (30 s in SLURM): the run
    abandons it. The next run builds again; torch's build lock is not left behind to block it."""
    cache = tmp_path / "kernels"
    env = {**ENV, "TORCH_EXTENSIONS_DIR": str(cache)}
    proc = start(tmp_path, "--data_dir", str(tiny_data), "--model_type", "8", "--num_layer", "1", "--hidden_size",
                 "8", "--n_head", "2", "--batch_size", "8", "--num_epoch", "1", env=env)
    err = ""
    while "Building the CPU kernel" not in err:
        line = proc.stderr.readline()
        assert line, f"no build started: {err}"
        err += line
    time.sleep(1.0)  # well into the compiler's work
    signalled = time.monotonic()
    proc.send_signal(signum)
    out, rest = proc.communicate(timeout=60)
    stopped_after = time.monotonic() - signalled
    err += rest
    assert proc.returncode == 128 + signum, err
    assert stopped_after < 5, stopped_after  # ninja and the compilers are stopped first; 0.2 s when idle
    assert processes_working_in(cache) == []  # ninja and its compilers went with it
    assert "Traceback" not in out + err
    assert "nothing to resume" in out and not list((tmp_path / "runs").iterdir())
    [build_dir] = cache.glob("fast_weight_sum_cpu_*")
    assert not (build_dir / "lock").exists()


def processes_working_in(folder):
    """The processes whose working directory is in `folder` (ninja and the compilers of a build there)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and Path(os.readlink(proc / "cwd")).is_relative_to(folder):
                found.append((proc.name, (proc / "cmdline").read_bytes()[:80]))
        except OSError:  # gone meanwhile, or another user's
            pass
    return found


def test_the_grazzi_table_refuses_a_hostile_best_model_without_running_it(tmp_path):
    """scripts/grazzi_table.py reads best_model.pt of run directories it is pointed at: the same loader."""
    committed = sorted((REPO / "results" / "grazzi" / "runs").iterdir())[0]
    runs = tmp_path / "runs"
    shutil.copytree(committed, runs / committed.name)
    marker = tmp_path / "created by the checkpoint"
    hostile_checkpoint(runs / committed.name / "best_model.pt", marker)
    result = subprocess.run([sys.executable, "scripts/grazzi_table.py", "--runs", str(runs), "--out",
                             str(tmp_path / "table.md")], cwd=REPO, env=ENV, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2
    assert_one_error_line(result, "best_model.pt", "could run code")
    assert not marker.exists() and not (tmp_path / "table.md").exists()
