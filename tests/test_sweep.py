"""scripts/sweep.py and scripts/train.sh: planning, a real sweep through a local Ray instance, skipping of
finished runs, failure reporting, and the message when Ray is missing."""
import io
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from contextlib import redirect_stdout
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "scripts"))

import experiment  # noqa: E402
import main  # noqa: E402
import sweep  # noqa: E402

HEADER = "task,model_type,num_layer,hidden_size,n_head,ff_factor,batch_size,learning_rate,num_epoch\n"
# Two tiny recurrent models (no compiled kernels to build) and an SRWM whose head dimension (8 / 4 = 2) main.py
# rejects before training: the failing run.
TINY_CSV = HEADER + ("parity,0,1,8,1,1,16,1e-3,1\n"
                     "parity,10,1,8,1,1,16,1e-3,1\n"
                     "parity,12,1,8,4,1,16,1e-3,1\n")
TINY_EXTRA = "--emb_size 8 --report_every 0"


def write_tiny_parity(task_dir, train_lines=48, random_labels=False):
    """A few dozen short parity strings per split, so that one epoch takes a fraction of a second. With
    `random_labels` no model can reach main.py's stop at 100 %: training lasts its epochs."""
    rng = random.Random(0)
    task_dir.mkdir(parents=True)
    for split, count, (low, high) in (("train", train_lines, (2, 8)), ("valid", 16, (2, 8)), ("test", 16, (9, 12))):
        src, tgt = [], []
        for _ in range(count):
            bits = [rng.choice("01") for _ in range(rng.randint(low, high))]
            src.append(" ".join(bits))
            tgt.append(" ".join(rng.choice(("acc", "rej")) if random_labels
                                else "acc" if bits[:i + 1].count("1") % 2 == 0 else "rej" for i in range(len(bits))))
        (task_dir / f"{split}_50.src").write_text("\n".join(src) + "\n")
        (task_dir / f"{split}_50.tgt").write_text("\n".join(tgt) + "\n")


@pytest.fixture(scope="module")
def sweep_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    (root / "hparams.csv").write_text(TINY_CSV)
    write_tiny_parity(root / "data" / "parity")
    return root


def sweep_args(env, *more):
    return ["--csv", str(env / "hparams.csv"), "--work_dir", str(env / "runs"),
            "--data_root", str(env / "data"), "--extra", TINY_EXTRA, *more]


@pytest.fixture(scope="module")
def ray_instance():
    """One local Ray instance for the module (starting one costs 10-20 s); sweep.py uses it instead of its own.
    Started as sweep.py starts its own, so that no record of another cluster on this machine diverts it."""
    ray = pytest.importorskip("ray")
    sweep.start_ray(ray, None, num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def first_sweep(sweep_env, ray_instance):
    """All three configurations once: (exit code, console output)."""
    out = io.StringIO()
    with redirect_stdout(out):
        code = sweep.main(sweep_args(sweep_env))
    return code, out.getvalue()


def config_folder(env, slug):
    return env / "runs" / "parity" / f"{slug}-seed1"


def test_good_runs_finish_and_the_failing_one_is_reported(sweep_env, first_sweep):
    code, out = first_sweep
    assert code == 1, out
    lines = out.splitlines()
    progress = sorted(line.split("]")[0] + "]" for line in lines if line.startswith("["))
    assert progress == ["[1/3]", "[2/3]", "[3/3]"], out
    for slug, name in (("lstm", "LSTM"), ("e-lstm", "e-LSTM")):
        [run_dir] = experiment.run_dirs(config_folder(sweep_env, slug))
        final = json.loads((run_dir / "final.json").read_text())
        assert any(line.endswith(f"parity {name} seed 1: finished ({final['valid_acc']:.2f}/"
                                 f"{final['valid2_acc']:.2f} acc)") for line in lines), out
        assert json.loads((run_dir / "args.json").read_text())["data_dir"] == str(sweep_env / "data" / "parity")
        assert "Final model test acc" in (config_folder(sweep_env, slug) / sweep.RUN_LOG).read_text()
    [failure] = [line for line in lines if "SRWM" in line and line.startswith("[")]
    assert "FAILED" in failure and "head dimension" in failure, failure
    assert lines[-1] == "2 of 3 configurations finished; 1 failed: parity SRWM seed 1"


def test_relaunch_skips_finished_runs(sweep_env, first_sweep, ray_instance, capsys):
    folders = [config_folder(sweep_env, slug) for slug in ("lstm", "e-lstm")]
    before = {d: (d / "final.json").stat().st_mtime_ns for folder in folders for d in experiment.run_dirs(folder)}
    assert sweep.main(sweep_args(sweep_env, "--models", "0", "10")) == 0
    out = capsys.readouterr().out
    assert out.count("skipped, finished earlier") == 2, out
    after = {d: (d / "final.json").stat().st_mtime_ns for folder in folders for d in experiment.run_dirs(folder)}
    assert after == before  # same single run dir per configuration, not rewritten


def test_address_joins_an_existing_cluster_and_replaces_a_dead_run(sweep_env, ray_instance, tmp_path):
    folder = tmp_path / "runs" / "parity" / "lstm-seed1"
    dead_run = folder / "lstm-parity-20240101-000000-dead00"  # died before its first checkpoint
    dead_run.mkdir(parents=True)
    (dead_run / "args.json").write_text("{}")
    address = ray_instance.get_runtime_context().gcs_address
    argv = sweep_args(sweep_env, "--models", "0", "--address", address)
    argv[argv.index("--work_dir") + 1] = str(tmp_path / "runs")
    result = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "sweep.py"), *argv],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[1/1] parity LSTM seed 1: finished" in result.stdout
    [run_dir] = experiment.run_dirs(folder)
    assert run_dir != dead_run and (run_dir / "final.json").is_file()


def test_dry_run_plans_start_resume_and_skip(tmp_path, capsys):
    (tmp_path / "hparams.csv").write_text(TINY_CSV)
    runs = tmp_path / "runs" / "parity"
    finished = runs / "lstm-seed1" / "lstm-parity-20240101-000000-aaaaaa"
    resumable = runs / "e-lstm-seed1" / "e-lstm-parity-20240101-000000-bbbbbb"
    stale = runs / "srwm-seed1" / "srwm-parity-20240101-000000-cccccc"  # died before its first checkpoint
    for run_dir in (finished, resumable, stale):
        run_dir.mkdir(parents=True)
        (run_dir / "args.json").write_text("{}")
    (finished / "final.json").write_text(json.dumps({"valid_acc": 100.0, "valid2_acc": 87.5}))
    (resumable / "latest_model.pt").write_bytes(b"")

    code = sweep.main(["--csv", str(tmp_path / "hparams.csv"), "--work_dir", str(tmp_path / "runs"),
                       "--data_root", str(tmp_path / "data"), "--dry_run", "--cpus_per_run", "2",
                       "--extra", "--num_epoch 3"])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    main_py = f"{sys.executable} main.py"
    assert lines == [
        "[1/3] parity LSTM seed 1: skipped, finished earlier (100.00/87.50 acc)",
        f"parity e-LSTM seed 1: OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 {main_py} --resume {resumable}",
        f"parity SRWM seed 1: OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 {main_py} --data_dir data/parity --level 50 "
        f"--model_type 12 --num_layer 1 --hidden_size 8 --n_head 4 --ff_factor 1 --dropout 0.0 --batch_size 16 "
        f"--learning_rate 1e-3 --seed 1 --grad_cummulate 1 --num_epoch 1 --report_every 50 --project_name "
        f"2023--formal-lang --remove_pos_enc --data_dir {tmp_path / 'data' / 'parity'} "
        f"--work_dir {runs / 'srwm-seed1'} --num_epoch 3",
    ]
    assert stale.is_dir() and not (tmp_path / "data").exists()  # a dry run changes nothing


@pytest.mark.parametrize("state", ["finished", "resumable"])
def test_a_run_started_with_other_flags_is_neither_skipped_nor_resumed(tmp_path, capsys, state):
    """The csv row (or --extra) changed since the folder's run started: one error line, nothing run."""
    (tmp_path / "hparams.csv").write_text(TINY_CSV)
    argv = ["--csv", str(tmp_path / "hparams.csv"), "--work_dir", str(tmp_path / "runs"), "--data_root",
            str(tmp_path / "data"), "--models", "0", "--dry_run"]
    assert sweep.main(argv) == 0
    planned = shlex.split(capsys.readouterr().out.split(" main.py ", 1)[1])
    run_dir = tmp_path / "runs" / "parity" / "lstm-seed1" / "lstm-parity-20240101-000000-aaaaaa"
    run_dir.mkdir(parents=True)
    args = vars(main.build_parser().parse_args(planned))
    del args["patience"]  # an args.json from before a flag existed is compared on the flags it has
    (run_dir / "args.json").write_text(json.dumps({**args, "data_dir": "/elsewhere/parity"}))
    if state == "finished":
        (run_dir / "final.json").write_text(json.dumps({"valid_acc": 100.0, "valid2_acc": 90.0}))
    else:
        (run_dir / "latest_model.pt").write_bytes(b"")
    assert sweep.main(argv) == 0  # the same flags, the data moved: the same run
    capsys.readouterr()
    assert sweep.main(argv + ["--extra", "--num_epoch 3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--num_epoch 1 (now 3)" in err and str(run_dir) in err, err


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "dyck-1"], "no row for task 'dyck-1'"),
    (["--models", "3"], "unknown model type 3"),
    (["--extra", "--seed 2"], "--extra may not set --seed"),
    (["--no_ray", "--address", "auto"], "--address joins a Ray cluster"),
    (["--parallel", "0"], "--parallel must be at least 1"),
])
def test_bad_arguments_give_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "hparams.csv").write_text(TINY_CSV)
    assert sweep.main(["--csv", str(tmp_path / "hparams.csv"), "--dry_run", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_missing_ray_gives_install_hint(sweep_env):
    # sys.modules["ray"] = None makes `import ray` raise ImportError, as when Ray is not installed.
    code = ("import sys; sys.modules['ray'] = None; sys.path.insert(0, 'scripts'); import sweep; "
            f"sys.exit(sweep.main({sweep_args(sweep_env)!r}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr == "error: " + sweep.RAY_MISSING + "\n"
    assert "pip install -r requirements-sweep.txt" in sweep.RAY_MISSING


@pytest.mark.parametrize("task", ["aa-star", "s3"])  # a paper task and a group task
def test_prepare_data_generates_missing_datasets_once(tmp_path, task):
    sweep.prepare_data([task], tmp_path, bins=3)
    files = sorted(p.name for p in (tmp_path / task).iterdir())
    assert "bin3_50.src" in files and "train_50.tgt" in files
    stamp = (tmp_path / task / "train_50.src").stat().st_mtime_ns
    sweep.prepare_data([task], tmp_path, bins=3)
    assert (tmp_path / task / "train_50.src").stat().st_mtime_ns == stamp


def fake_python(tmp_path):
    """A stand-in interpreter that prints where it runs, the kernel cache, and its arguments."""
    script = tmp_path / "fake_python"
    script.write_text('#!/bin/sh\necho "$PWD"\necho "$TORCH_EXTENSIONS_DIR"\necho "$@"\n')
    script.chmod(0o755)
    env = dict(os.environ, PYTHON=str(script), HOME=str(tmp_path))
    for name in ("TORCH_EXTENSIONS_DIR", "XDG_CACHE_HOME"):
        env.pop(name, None)
    return env


def test_train_sh_passes_fixed_flags_then_extra_flags(tmp_path):
    result = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "train.sh"), "parity", "7", "1", "32", "4", "4",
                             "64", "1e-3", "--num_epoch", "3"], cwd=tmp_path, env=fake_python(tmp_path),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    cwd, extensions_dir, argv = result.stdout.splitlines()
    assert cwd == str(REPO_ROOT)
    assert extensions_dir == str(tmp_path / ".cache" / "torch_extensions" / "formal_lang")
    assert argv.split() == [
        "main.py", "--data_dir", "data/parity", "--level", "50", "--model_type", "7", "--num_layer", "1",
        "--hidden_size", "32", "--n_head", "4", "--ff_factor", "4", "--dropout", "0.0", "--batch_size", "64",
        "--learning_rate", "1e-3", "--seed", "1", "--grad_cummulate", "1", "--num_epoch", "300",
        "--report_every", "50", "--project_name", "2023--formal-lang", "--remove_pos_enc", "--num_epoch", "3"]


def test_train_sh_resume_and_usage(tmp_path):
    script = str(REPO_ROOT / "scripts" / "train.sh")
    env = fake_python(tmp_path)
    resumed = subprocess.run(["bash", script, "--resume", "/x/run"], env=env, capture_output=True, text=True)
    assert resumed.stdout.splitlines()[-1] == "main.py --resume /x/run"
    usage = subprocess.run(["bash", script, "parity", "7"], env=env, capture_output=True, text=True)
    assert usage.returncode == 2 and usage.stdout == ""
    assert usage.stderr.startswith("usage: bash scripts/train.sh TASK MODEL_TYPE LAYERS SIZE HEADS FF BATCH LR")


def start_fake_main(folder):
    """A process that stands for a run's main.py in `folder` (with its pid file there): on SIGTERM it writes
    `folder/saved` and exits with 143."""
    folder.mkdir(parents=True)
    fake_main = folder / "main.py"
    fake_main.write_text(textwrap.dedent("""
        import signal, sys, time
        def save(signum, frame):
            open(sys.argv[2] + "/saved", "w").close()
            sys.exit(143)
        signal.signal(signal.SIGTERM, save)
        print("ready", flush=True)
        time.sleep(60)
    """))
    run = subprocess.Popen([sys.executable, str(fake_main), "--work_dir", str(folder)], stdout=subprocess.PIPE)
    assert run.stdout.readline() == b"ready\n"
    (folder / sweep.PID_FILE).write_text(f"{run.pid}\n")
    return run


def test_an_interrupt_lets_each_running_trial_save_and_leaves_other_processes_alone(tmp_path):
    folder = tmp_path / "search" / "parity" / "lstm" / "lr1e-3-l1-h8-n1-seed1"
    trial = start_fake_main(folder)
    # a stale pid file whose number now belongs to some other process
    stranger = subprocess.Popen(["sleep", "60"])
    other = tmp_path / "search" / "parity" / "lstm" / "lr3e-3-l1-h8-n1-seed1"
    other.mkdir()
    (other / sweep.PID_FILE).write_text(f"{stranger.pid}\n")
    try:
        experiment.stop_runs([folder / sweep.PID_FILE, other / sweep.PID_FILE], timeout=20)
        assert trial.wait(timeout=5) == 143 and (folder / "saved").is_file()
        assert stranger.poll() is None
    finally:
        trial.kill()
        stranger.kill()


def test_without_ray_the_runs_go_as_child_processes_and_a_relaunch_skips_them(tmp_path):
    """--no_ray on a machine where `import ray` fails: the two good runs finish, the SRWM fails, as with Ray."""
    (tmp_path / "hparams.csv").write_text(TINY_CSV)
    write_tiny_parity(tmp_path / "data" / "parity")
    argv = sweep_args(tmp_path, "--no_ray", "--parallel", "2")
    code = ("import sys; sys.modules['ray'] = None; sys.path.insert(0, 'scripts'); import sweep; "
            f"sys.exit(sweep.main({argv!r}))")
    first = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert first.returncode == 1, first.stdout + first.stderr
    assert first.stdout.splitlines()[-1] == "2 of 3 configurations finished; 1 failed: parity SRWM seed 1"
    for slug in ("lstm", "e-lstm"):
        [run_dir] = experiment.run_dirs(config_folder(tmp_path, slug))
        assert (run_dir / "final.json").is_file()
    again = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert again.stdout.count("skipped, finished earlier") == 2, again.stdout + again.stderr


def test_without_ray_a_signal_saves_the_running_run_and_starts_no_queued_one(tmp_path):
    (tmp_path / "hparams.csv").write_text(HEADER + "parity,0,1,8,1,1,16,1e-3,400\nparity,10,1,8,1,1,16,1e-3,400\n")
    write_tiny_parity(tmp_path / "data" / "parity", train_lines=480, random_labels=True)
    argv = sweep_args(tmp_path, "--no_ray", "--parallel", "1")
    sweep_run = subprocess.Popen([sys.executable, str(REPO_ROOT / "scripts" / "sweep.py"), *argv], cwd=REPO_ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = config_folder(tmp_path, "lstm")
    deadline = time.monotonic() + 300
    while not list(first.glob("*/metrics.jsonl")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert list(first.glob("*/metrics.jsonl")), "the first run never evaluated"
    sweep_run.send_signal(signal.SIGTERM)
    out, err = sweep_run.communicate(timeout=120)
    assert sweep_run.returncode == 130, out + err
    [run_dir] = experiment.run_dirs(first)
    assert experiment.has_checkpoint(run_dir) and not experiment.is_finished(run_dir)
    assert not (first / sweep.PID_FILE).exists()
    assert not experiment.run_dirs(config_folder(tmp_path, "e-lstm"))  # queued: never started
    assert "run the same command again" in err
    dry = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "sweep.py"), *argv, "--dry_run"],
                         cwd=REPO_ROOT, capture_output=True, text=True)
    assert f"--resume {run_dir}" in dry.stdout, dry.stdout + dry.stderr
