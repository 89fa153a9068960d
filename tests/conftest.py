"""Suite-wide set-up: the CPU kernels start building as the session starts, and the kernel tests run last.

The default suite runs on two pytest-xdist workers, a test file at a time each (pytest.ini). On a cold kernel cache
(a fresh clone, CI) the four builds take about a minute of one core each; left to the tests that first need them,
they come late and one at a time, while the other worker waits for the same build (kernel_loader's lock). So two
processes started here build them from the start, beside the workers' first test files, and the files whose tests
nearly all run a kernel come last, when the builds are done. On a warm cache the builders only import torch.
"""
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# (folder, name) of every operator folder's CPU kernel, <folder>/<name>_cpu.cpp
CPU_KERNELS = sorted((source.parent.name, source.name[:-len("_cpu.cpp")]) for source in REPO.glob("*/*_cpu.cpp"))
BUILDERS = 2
BUILD = "import sys, kernel_loader\nfor kernel in sys.argv[1:]:\n    kernel_loader.load(*kernel.split(':'), 'cpu')\n"
KERNEL_TEST_FILES = {"test_deltaproduct.py", "test_gated_delta.py", "test_golden.py", "test_model.py",
                     "test_neg_eigval.py", "test_ops_rec_srwm.py", "test_ops_sum_delta.py"}

_builders = []


def pytest_sessionstart(session):
    if session.config.option.collectonly or hasattr(session.config, "workerinput"):  # not in xdist's workers
        return
    for share in range(BUILDERS):
        kernels = [f"{folder}:{name}" for folder, name in CPU_KERNELS[share::BUILDERS]]
        _builders.append(subprocess.Popen([sys.executable, "-c", BUILD, *kernels], cwd=REPO,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          start_new_session=True))  # its ninja and compilers in its group


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: item.path.name in KERNEL_TEST_FILES)  # stable: each file keeps its order


def pytest_sessionfinish(session):
    # A builder still running when the tests are done (a few tests selected with -k) is stopped with its compilers,
    # which would otherwise go on writing into the cache; kernel_loader takes over the torch `lock` a killed build
    # leaves behind.
    for builder in _builders:
        if builder.poll() is None:
            os.killpg(builder.pid, signal.SIGTERM)
        builder.wait()
