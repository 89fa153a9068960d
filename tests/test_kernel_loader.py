"""kernel_loader: builds that survive a killed predecessor, an unusable kernel cache, and the record of what ran.

The lock tests run the loader in subprocesses with torch's build replaced by a stand-in that follows torch's own
protocol (the FileBaton `lock` file, then a library the next load finds) but compiles nothing; one test builds a
real five-line extension.
"""
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

import kernel_loader

REPO = Path(kernel_loader.__file__).resolve().parent
MODES = ("flock", "owner file")   # the loader's own lock: flock, or the O_EXCL owner file where flock is missing

# argv: lock mode, event log, seconds a build takes. Prints "loaded" or "none".
FAKE_BUILD = r"""
import os, sys, time, types
sys.path.insert(0, {repo!r})
import kernel_loader
from torch.utils import cpp_extension
from torch.utils.file_baton import FileBaton

mode, log_path, build_time = sys.argv[1], sys.argv[2], float(sys.argv[3])
if mode == "owner file":
    kernel_loader.fcntl = None


def log(event):
    with open(log_path, "a") as handle:
        handle.write(f"{{event}} {{os.getpid()}} {{time.time()}}\n")


def fake_load(name, sources, build_directory, **kwargs):
    baton = FileBaton(os.path.join(build_directory, "lock"))
    if baton.try_acquire():
        try:
            library = os.path.join(build_directory, name + ".so")
            kind = "reuse" if os.path.exists(library) else "build"
            log(kind + "-start")
            if kind == "build":
                time.sleep(build_time)
                open(library, "w").close()
            log(kind + "-end")
        finally:
            baton.release()
    else:
        baton.wait()   # torch waits here forever when the lock's owner was killed
    return types.SimpleNamespace(name=name)


cpp_extension.load = fake_load
print("loaded" if kernel_loader.load_source("fwp_fake_cpu", "unused.cpp", "cpu") is not None else "none")
""".format(repo=str(REPO))


def fake_build(cache, mode, log, build_time):
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(cache), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", FAKE_BUILD, mode, str(log), str(build_time)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def events(log):
    return [line.split() for line in log.read_text().splitlines()] if log.exists() else []


@pytest.mark.parametrize("mode", MODES)
def test_build_killed_holding_the_lock_is_taken_over(tmp_path, mode):
    log = tmp_path / "events"
    victim = fake_build(tmp_path / "cache", mode, log, build_time=600)
    deadline = time.time() + 60
    while not any(event[0] == "build-start" for event in events(log)):
        assert victim.poll() is None and time.time() < deadline, victim.communicate()
        time.sleep(0.1)
    os.kill(victim.pid, signal.SIGKILL)   # the OOM killer, a job time limit
    victim.communicate()
    assert (tmp_path / "cache" / "fwp_fake_cpu" / "lock").exists()   # what hung every later torch load

    successor = fake_build(tmp_path / "cache", mode, log, build_time=0.1)
    try:
        out, err = successor.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        successor.kill()
        pytest.fail("the load after a killed build hangs: " + successor.communicate()[1])
    assert successor.returncode == 0 and out.split() == ["loaded"], err
    assert "stale" in err and not (tmp_path / "cache" / "fwp_fake_cpu" / "lock").exists()
    assert [event[0] for event in events(log)] == ["build-start", "build-start", "build-end"]


@pytest.mark.parametrize("mode", MODES)
def test_concurrent_loads_build_once(tmp_path, mode):
    log = tmp_path / "events"
    procs = [fake_build(tmp_path / "cache", mode, log, build_time=1.0) for _ in range(3)]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and out.split() == ["loaded"], err
    kinds = sorted(event[0] for event in events(log))
    assert kinds == ["build-end", "build-start", "reuse-end", "reuse-end", "reuse-start", "reuse-start"]
    spans = {}
    for kind, pid, stamp in events(log):
        spans.setdefault(pid, []).append(float(stamp))
    ordered = sorted(spans.values())
    assert all(earlier[1] <= later[0] for earlier, later in zip(ordered, ordered[1:])), "builds overlapped"


def test_owner_file_of_another_host_is_stale_only_when_idle(tmp_path, monkeypatch):
    owner = tmp_path / kernel_loader.OWNER_NAME
    owner.write_text("some-other-host 12345 abcd")
    assert not kernel_loader._owner_gone(str(owner), str(tmp_path))   # just written: a live build elsewhere
    monkeypatch.setattr(kernel_loader, "STALE_LOCK_SECONDS", -1)
    assert kernel_loader._owner_gone(str(owner), str(tmp_path))


TINY_SOURCE = """#include <pybind11/pybind11.h>
static int add_one(int x) { return x + 1; }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("add_one", &add_one); }
"""


def test_real_build_ignores_a_stale_torch_lock(tmp_path):
    """A real (tiny) cpp_extension build, with the `lock` a killed build leaves planted in its folder."""
    source = tmp_path / "tiny.cpp"
    source.write_text(TINY_SOURCE)
    (tmp_path / "cache" / "fwp_tiny_cpu").mkdir(parents=True)
    (tmp_path / "cache" / "fwp_tiny_cpu" / "lock").touch()
    script = (f"import sys; sys.path.insert(0, {str(REPO)!r}); import kernel_loader; "
              f"ext = kernel_loader.load_source('fwp_tiny_cpu', {str(source)!r}, 'cpu'); "
              f"print(ext.add_one(41), kernel_loader.build_seconds() > 0)")
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    try:
        result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                                timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("cpp_extension.load waited for the stale lock")
    assert result.returncode == 0 and result.stdout.split() == ["42", "True"], result.stderr
    assert "stale" in result.stderr and not (tmp_path / "cache" / "fwp_tiny_cpu" / "lock").exists()


def load_tiny(checkout, cache, ext_name=None):
    """In a new process: load `<checkout>/tiny/one_cpu.cpp` with `<checkout>/kernel_loader.py` (through load(), or
    through load_source under `ext_name`); its stderr."""
    call = (f"kernel_loader.load_source({ext_name!r}, {str(checkout / 'tiny' / 'one_cpu.cpp')!r}, 'cpu')" if ext_name
            else "kernel_loader.load('tiny', 'one', 'cpu')")
    script = f"import sys; sys.path.insert(0, {str(checkout)!r}); import kernel_loader; assert {call}.add_one(1) == 2"
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(cache), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stderr


def tiny_checkout(folder):
    (folder / "tiny").mkdir(parents=True)
    (folder / "tiny" / "one_cpu.cpp").write_text(TINY_SOURCE)
    (folder / "kernel_loader.py").write_bytes((REPO / "kernel_loader.py").read_bytes())
    return folder


def test_every_build_says_so_also_a_rebuild_for_a_source_from_another_path(tmp_path):
    """A cache folder last built from another checkout's source: torch rebuilds it, which prints the line too."""
    first, second = tiny_checkout(tmp_path / "first"), tiny_checkout(tmp_path / "second")
    assert "Building the CPU kernel 'fwp_tiny_cpu'" in load_tiny(first, tmp_path / "cache", "fwp_tiny_cpu")
    assert "Building the CPU kernel 'fwp_tiny_cpu'" in load_tiny(second, tmp_path / "cache", "fwp_tiny_cpu")
    assert "Building" not in load_tiny(second, tmp_path / "cache", "fwp_tiny_cpu")  # built: nothing to say


def test_two_checkouts_sharing_a_cache_keep_a_build_each(tmp_path):
    first, second = tiny_checkout(tmp_path / "first"), tiny_checkout(tmp_path / "second")
    cache = tmp_path / "cache"
    assert "Building" in load_tiny(first, cache)
    [library] = cache.glob("one_cpu_*/*.so")
    built = library.stat().st_mtime_ns
    assert "Building" in load_tiny(second, cache)
    assert "Building" not in load_tiny(first, cache)
    assert library.stat().st_mtime_ns == built  # not rebuilt after the other checkout's build
    assert len(list(cache.glob("one_cpu_*/*.so"))) == 2


# ------------------------------------------------------------------------------------ what ran, in process

@pytest.fixture
def fresh_records(monkeypatch):
    """Empty records and warning memory, as at the start of a process."""
    monkeypatch.setattr(kernel_loader, "_paths", {})
    monkeypatch.setattr(kernel_loader, "_unavailable", {})
    monkeypatch.setattr(kernel_loader, "_warned_caches", set())
    monkeypatch.setattr(kernel_loader, "_self_checks", {})
    monkeypatch.delenv(kernel_loader.FORCE_REFERENCE_ENV, raising=False)


def doubled(x):
    return 2 * x


def unusable_cache(tmp_path, case):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    if case == "is a file":
        return blocker
    if case == "under a file":
        return blocker / "cache"
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    read_only = tmp_path / "read-only"
    read_only.mkdir(mode=0o555)
    return read_only


@pytest.mark.parametrize("case", ["is a file", "under a file", "read-only"])
def test_unusable_cache_falls_back_with_one_warning(tmp_path, monkeypatch, fresh_records, case):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(unusable_cache(tmp_path, case)))
    x = torch.arange(3.0)
    tag = case.replace(" ", "_")
    with pytest.warns(UserWarning) as caught:
        assert torch.equal(kernel_loader.run_fused("no_such_folder", f"first_{tag}", doubled, 1, x, num_sequences=0),
                           2 * x)
        assert torch.equal(kernel_loader.run_fused("no_such_folder", f"second_{tag}", doubled, 1, x, num_sequences=0),
                           2 * x)
    assert len(caught) == 1 and "cannot be used" in str(caught[0].message)
    assert "\n" not in str(caught[0].message)
    paths = kernel_loader.operator_paths()
    assert set(paths) == {f"first_{tag}", f"second_{tag}"}
    assert all(path.startswith("PyTorch reference (kernel cache unusable: ") for path in paths.values()), paths


def test_forced_reference_is_recorded(monkeypatch, fresh_records):
    monkeypatch.setenv(kernel_loader.FORCE_REFERENCE_ENV, "1")
    monkeypatch.setattr(kernel_loader, "load", lambda *args: pytest.fail("forced reference must not build"))
    kernel_loader.run_fused("fast_weight", "delta_net", doubled, 1, torch.ones(2), num_sequences=0)
    assert kernel_loader.operator_paths() == {"delta_net": "PyTorch reference (FWP_FORCE_REFERENCE=1)"}


def test_fused_and_unsupported_paths_are_recorded(monkeypatch, fresh_records):
    calls = []
    fake = types.SimpleNamespace(forward=lambda x: calls.append("kernel") or [2 * x],
                                 backward=lambda grad, x, saved: [2 * grad],
                                 supports=lambda x: x.dtype == torch.float32)
    monkeypatch.setattr(kernel_loader, "load", lambda *args: fake)
    kernel_loader._warn_unsupported.cache_clear()
    x = torch.ones(3, requires_grad=True)
    kernel_loader.run_fused("folder", "op", doubled, 1, x, num_sequences=0).sum().backward()
    assert calls == ["kernel", "kernel"] and x.grad.tolist() == [2.0, 2.0, 2.0]  # its self-check, then the call
    assert kernel_loader.operator_paths() == {"op": "fused CPU kernel"}
    with pytest.warns(UserWarning, match="does not handle"):
        kernel_loader.run_fused("folder", "op", doubled, 1, torch.ones(3, dtype=torch.float64),
                                num_sequences=0)
    assert kernel_loader.operator_paths() == {
        "op": "fused CPU kernel; PyTorch reference (CPU kernel does not handle torch.float64 inputs with last "
              "dimensions [3])"}


def test_failed_build_is_recorded_and_timed(tmp_path, monkeypatch, fresh_records):
    from torch.utils import cpp_extension

    def failing_build(**kwargs):
        time.sleep(0.2)
        raise RuntimeError("Error building extension 'failing_op_cpu'\nlong compiler output")

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", failing_build)
    before = kernel_loader.build_seconds()
    with pytest.warns(UserWarning, match="could not build failing_op_cpu"):
        kernel_loader.run_fused("no_such_folder", "failing_op", doubled, 1, torch.ones(2), num_sequences=0)
    assert kernel_loader.build_seconds() >= before + 0.2
    assert kernel_loader.operator_paths() == {
        "failing_op": "PyTorch reference (build failed: Error building extension 'failing_op_cpu')"}


# -- the self-check: a kernel proves itself against the reference before it is trusted --------------------------

def off_by_a_tenth(reference, num_differentiable, where="output"):
    """An extension that is wrong the way a miscompiled kernel would be: its output (or, with where="gradient",
    its gradients) off by 0.1 from the reference's."""
    def forward(*inputs):
        return [reference(*inputs) + (0.1 if where == "output" else 0.0)]

    def backward(grad_out, *inputs_and_saved):
        inputs = [x.detach().requires_grad_(i < num_differentiable) for i, x in enumerate(inputs_and_saved[:-1])]
        with torch.enable_grad():
            grads = torch.autograd.grad(reference(*inputs), inputs[:num_differentiable], grad_out)
        return [g + (0.1 if where == "gradient" else 0.0) for g in grads]

    calls = []
    return types.SimpleNamespace(isa=lambda: "fake-isa", forward=lambda *xs: calls.append(1) or forward(*xs),
                                 backward=backward, calls=calls)


def delta_inputs(B=2, H=2, L=7, D=4):
    generator = torch.Generator().manual_seed(1)
    randn = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731
    return [randn(B, H, L, D).softmax(-1), randn(B, H, L, D).softmax(-1), randn(B, H, L, D),
            torch.rand(B, H, L, 1, generator=generator), torch.zeros(B, H, D, D)]


@pytest.mark.parametrize("where, what", [("output", "its output"), ("gradient", "its gradient of input 0")])
def test_a_kernel_that_disagrees_with_the_reference_is_replaced_by_it_with_one_warning(monkeypatch, fresh_records,
                                                                                       where, what):
    from fast_weight import delta_net_reference

    fake = off_by_a_tenth(delta_net_reference, 4, where)
    monkeypatch.setattr(kernel_loader, "load", lambda *args: fake)
    inputs = delta_inputs()
    with pytest.warns(UserWarning, match="failed its self-check") as caught:
        first = kernel_loader.run_fused("fast_weight", "delta_net", delta_net_reference, 4, *inputs, num_sequences=4)
        second = kernel_loader.run_fused("fast_weight", "delta_net", delta_net_reference, 4, *inputs,
                                         num_sequences=4)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert all(word in message for word in ("delta_net", "CPU", "fake-isa", "torch.float32", what)), message
    assert torch.equal(first, delta_net_reference(*inputs)) and torch.equal(second, first)
    assert len(fake.calls) == 1  # the self-check's call only: never on real inputs
    assert kernel_loader.operator_paths() == {
        "delta_net": f"PyTorch reference (the fused CPU kernel failed its self-check: {what} is off by up to "
                     f"{0.1:.3g})"}


def test_the_self_check_runs_once_per_dtype_and_leaves_the_global_rng_where_it_was(monkeypatch, fresh_records):
    from fast_weight import delta_net_reference

    fake = off_by_a_tenth(delta_net_reference, 4, where="neither")  # a correct kernel
    monkeypatch.setattr(kernel_loader, "load", lambda *args: fake)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    for dtype in (torch.float32, torch.float32, torch.float64):
        inputs = [x.to(dtype) for x in delta_inputs()]
        kernel_loader.run_fused("fast_weight", "delta_net", delta_net_reference, 4, *inputs, num_sequences=4)
    assert torch.equal(torch.get_rng_state(), before)
    assert len(fake.calls) == 2 + 3  # a self-check per dtype, then the three real calls
    assert set(kernel_loader._self_checks) == {("delta_net", "cpu", torch.float32, "fake-isa"),
                                               ("delta_net", "cpu", torch.float64, "fake-isa")}
    assert kernel_loader.operator_paths() == {"delta_net": "fused CPU kernel"}


def test_the_self_check_input_is_tiny_with_the_real_head_sizes():
    inputs = delta_inputs(B=64, H=4, L=100, D=32)
    tiny, _ = kernel_loader.self_check_input(inputs, num_sequences=4)
    assert [tuple(t.shape) for t in tiny] == [(1, 4, 5, 32)] * 3 + [(1, 4, 5, 1), (1, 4, 32, 32)]


def test_a_run_whose_kernel_fails_its_self_check_trains_as_the_reference_would_and_says_so(tmp_path, monkeypatch,
                                                                                           fresh_records):
    from fast_weight import delta_net_reference
    from test_main import read_metrics, run_main, without_time, write_tiny_parity

    data_dir = write_tiny_parity(tmp_path / "data" / "tiny")
    flags = ["--model_type", "2", "--num_layer", "1", "--hidden_size", "8", "--n_head", "2", "--batch_size", "16",
             "--num_epoch", "2", "--remove_pos_enc"]
    monkeypatch.setenv(kernel_loader.FORCE_REFERENCE_ENV, "1")
    code, reference_run = run_main(tmp_path, data_dir, *flags, work_dir="reference")
    assert code == 0
    monkeypatch.delenv(kernel_loader.FORCE_REFERENCE_ENV)
    monkeypatch.setattr(kernel_loader, "load", lambda *args: off_by_a_tenth(delta_net_reference, 4))
    with pytest.warns(UserWarning, match="delta_net: the fused CPU kernel .* failed its self-check"):
        code, run_dir = run_main(tmp_path, data_dir, *flags, work_dir="miscompiled")
    assert code == 0
    path = "PyTorch reference (the fused CPU kernel failed its self-check: its output is off by up to 0.1)"
    assert json.loads((run_dir / "final.json").read_text())["operators"] == {"delta_net": path}
    assert f"Operator delta_net: {path}" in (run_dir / "log.txt").read_text()
    assert without_time(read_metrics(run_dir)) == without_time(read_metrics(reference_run))
