"""How scripts/sweep.py and scripts/tune.py reach Ray, run as commands (each starts a Ray instance of its own): an
--address where no cluster answers ends them at once with one error line; without --address they start a private
local instance, which no record of another cluster diverts, and their runs' main.py use the script's interpreter."""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "scripts"))

from test_sweep import TINY_CSV, TINY_EXTRA, write_tiny_parity  # noqa: E402

pytest.importorskip("ray.tune")

SCRIPTS = ("sweep", "tune")


def free_port():
    """A port of this machine where nothing listens (once the probe socket is closed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tiny_command(script, root):
    """The script on one tiny LSTM configuration (sweep.py) or one one-trial LSTM cell (tune.py) under `root`."""
    (root / "hparams.csv").write_text(TINY_CSV)
    write_tiny_parity(root / "data" / "parity")
    if script == "sweep":
        flags = ["--csv", str(root / "hparams.csv"), "--models", "0", "--extra", TINY_EXTRA]
    else:
        flags = ["--tasks", "parity", "--models", "0", "--learning_rates", "1e-3", "--layers", "1", "--widths", "8x1",
                 "--epoch_cap", "1"]
    return [sys.executable, str(REPO_ROOT / "scripts" / f"{script}.py"), "--work_dir", str(root / "work"),
            "--data_root", str(root / "data"), *flags]


@pytest.mark.parametrize("script", SCRIPTS)
def test_an_address_where_no_cluster_answers_ends_the_run_with_one_error_line(script, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    # ray.init alone would retry for minutes, then end in a traceback
    result = subprocess.run(tiny_command(script, tmp_path) + ["--address", address], capture_output=True, text=True,
                            timeout=90)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith(f"error: no Ray cluster answers at {address}: ") and \
        result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "work").exists(), list((tmp_path / "work").rglob("*"))  # nothing before the cluster answers


@pytest.fixture
def records_of_a_dead_cluster():
    """The environment of a machine where a killed `ray start --head` has left its record (ray_current_cluster in
    Ray's temp folder) and RAY_ADDRESS names that cluster too. The temp folder is a fresh RAY_TMPDIR, so the
    machine's /tmp/ray is left as it is; short, as Ray's socket paths under it must fit in 107 bytes."""
    ray_tmpdir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    dead = f"127.0.0.1:{free_port()}"
    (ray_tmpdir / "ray").mkdir()
    (ray_tmpdir / "ray" / "ray_current_cluster").write_text(dead)
    yield dict(os.environ, RAY_TMPDIR=str(ray_tmpdir), RAY_ADDRESS=dead)
    shutil.rmtree(ray_tmpdir, ignore_errors=True)


def with_fake_python_first_on_path(env, folder):
    """`env` with a `python` first on PATH that has no torch, as where the venv is not activated: it leaves a
    file `called` beside it and exits 1. Returns the environment and that file."""
    folder.mkdir()
    fake = folder / "python"
    fake.write_text(f'#!/bin/sh\ntouch "{folder / "called"}"\necho "No module named \'torch\'" >&2\nexit 1\n')
    fake.chmod(0o755)
    return dict(env, PATH=f"{folder}{os.pathsep}{env['PATH']}"), folder / "called"


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_run_without_address_ignores_records_of_other_clusters_and_trains_with_its_own_interpreter(
        script, tmp_path, records_of_a_dead_cluster):
    """Both in one run of each script, as a Ray instance takes 10-20 s to start. Started from another folder than the
    repository: Ray's workers then have only that folder and scripts/ on their sys.path, not the repository root, so
    whatever the trial or run needs from the repository must reach them by value (experiment.ship_to_workers)."""
    env, fake_python_called = with_fake_python_first_on_path(records_of_a_dead_cluster, tmp_path / "bin")
    result = subprocess.run(tiny_command(script, tmp_path), env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    if script == "sweep":
        assert "[1/1] parity LSTM seed 1: finished" in result.stdout, out
    else:
        assert "parity LSTM: 1/1 trials done; best lr1e-3-l1-h8-n1-seed1" in result.stdout, out
        assert "seed 2 finished" in result.stdout and "seed 3 finished" in result.stdout, out
    assert not fake_python_called.exists()
