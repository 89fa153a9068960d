"""JIT building of the operator extensions, shared by the four operator folders, and the record of what ran.

Each operator folder ships `<name>_cpu.cpp` and `<name>_cuda.cu`. Both compile to an extension with the same two
functions, `forward` and `backward`; the folder's dispatcher picks one by device. Extensions are built once with
ninja and cached in TORCH_EXTENSIONS_DIR (torch's default cache when unset), as `<name>_<device>_<checkout>`: the
last part is a hash of this checkout's path, so that two checkouts sharing a cache keep a build each instead of
rebuilding each other's (ninja rebuilds whenever the folder's build.ninja names other sources). Every build, for
whatever reason ninja has (first use, an edited source, other flags), prints one line on stderr.

Stopped builds. ninja and its compilers run in a session of their own: when main.py's signal handler abandons a
build, they are killed with it instead of compiling on, re-parented to init.

Killed builds. torch guards a build with an empty `lock` file in the extension's folder, created with O_EXCL and
removed when the build ends; a build killed with SIGKILL (OOM killer, job time limit, Ray, Slurm) leaves it behind
and every later torch load waits for it forever. Here each build first takes this loader's own lock on the folder,
which dies with its holder: an flock on `fwp_build.lock` (the kernel releases it when the process dies), or where
the filesystem has no flock, an O_EXCL file `fwp_build.owner` naming its owner's host and pid, taken over when that
process is gone (same host) or the folder has been idle for STALE_LOCK_SECONDS. One process of a sweep builds, the
others wait for the lock and then load the finished extension. A torch `lock` found while holding this lock was
left by a dead build (every build of these extensions goes through here) and is removed.

What ran. run_fused records, per operator, which path it took: operator_paths() returns them, build_seconds() the
time spent in load() (building, or waiting for another process's build).
"""
import contextlib
import functools
import hashlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import warnings

try:
    import fcntl
except ImportError:   # Windows: the owner-file lock below
    fcntl = None

import torch

FORCE_REFERENCE_ENV = "FWP_FORCE_REFERENCE"
TORCH_LOCK_NAME = "lock"              # torch's FileBaton in the extension's folder
FLOCK_NAME = "fwp_build.lock"         # held with flock during a build; the file itself stays
OWNER_NAME = "fwp_build.owner"        # "host pid token" of the builder where flock is unavailable
STALE_LOCK_SECONDS = 600              # owner file of another host: stale once the folder is idle this long
_POLL_SECONDS = 0.2
NINJA_STOP_SECONDS = 1.0              # for ninja to stop its compilers once told to

_paths = {}          # operator name -> {description: None}, in order of first use
_unavailable = {}    # extension name -> why load() returned None
_warned_caches = set()
_build_seconds = 0.0
_building = False    # inside load_source: building, or waiting for another process's build


def reference_forced():
    """True when the user asked for the plain PyTorch reference (FWP_FORCE_REFERENCE=1)."""
    return os.environ.get(FORCE_REFERENCE_ENV, "0") not in ("", "0", "false", "False")


# ------------------------------------------------------------------------------------------------ what ran

def record_path(op_name, description):
    """Note that operator `op_name` ran through `description` (e.g. "fused CPU kernel"); cheap enough per call."""
    seen = _paths.setdefault(op_name, {})
    if description not in seen:
        seen[description] = None


def operator_paths():
    """{operator name: the path(s) it used so far, "; "-joined in order of first use}, e.g.
    {"delta_net": "fused CPU kernel"} or {"delta_net": "PyTorch reference (FWP_FORCE_REFERENCE=1)"}."""
    return {op_name: "; ".join(descriptions) for op_name, descriptions in _paths.items()}


def forget_operator_paths():
    """Start a new record: a second run in the same process (tests, notebooks) reports only its own paths."""
    _paths.clear()


def build_seconds():
    """Seconds this process spent inside load(): building extensions, or waiting for another process's build."""
    return _build_seconds


def building():
    """Whether this process is building an extension (or waiting for another's build) right now. main.py's signal
    handler stops at once then: a build outlasts a scheduler's grace period."""
    return _building


# ------------------------------------------------------------------------------------------------- building

class _CacheUnusable(Exception):
    """The extension cache folder cannot be created or written."""


def _first_line(exc):
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _build_directory(ext_name):
    """`<TORCH_EXTENSIONS_DIR>/<ext_name>`, created; _CacheUnusable when it cannot be created or written."""
    from torch.utils.cpp_extension import _get_build_directory
    try:
        build_dir = _get_build_directory(ext_name, verbose=False)
    except OSError as exc:
        raise _CacheUnusable(_first_line(exc)) from None
    if not os.access(build_dir, os.W_OK | os.X_OK):
        raise _CacheUnusable(f"{build_dir} is not writable")
    return build_dir


def _cache_root():
    from torch.utils.cpp_extension import get_default_build_root
    return os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()


def _waiting(ext_name, lock_path):
    print(f"Waiting for another process to finish building '{ext_name}' (lock {lock_path})...",
          file=sys.stderr, flush=True)


def _try_flock(fd, ext_name, lock_path):
    """Hold an exclusive flock on fd (waiting for a live holder); False where the filesystem has no flock."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        _waiting(ext_name, lock_path)
    except OSError:   # ENOLCK, EOPNOTSUPP, ENOSYS: NFS without lockd, Lustre without -o flock, ...
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return True
    except OSError:
        return False


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # alive, another user's
        return True
    return True


def _idle_seconds(folder):
    """Seconds since anything directly in `folder` (or the folder itself) last changed."""
    newest = os.stat(folder).st_mtime
    with os.scandir(folder) as entries:
        for entry in entries:
            with contextlib.suppress(OSError):
                newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
    return time.time() - newest


def _owner_gone(owner_path, build_dir):
    """True when the owner file's process cannot be building any more."""
    try:
        with open(owner_path) as handle:
            fields = handle.read().split()
        age = time.time() - os.stat(owner_path).st_mtime
    except FileNotFoundError:
        return False   # released meanwhile: just retry
    if len(fields) != 3 or not fields[1].isdigit():
        return age > 10   # its owner died between creating and writing it
    host, pid = fields[0], int(fields[1])
    if host == socket.gethostname() and os.name == "posix":
        return not _pid_alive(pid)
    return _idle_seconds(build_dir) > STALE_LOCK_SECONDS


@contextlib.contextmanager
def _owner_file_lock(build_dir, ext_name):
    """Exclusive build rights without flock: an O_EXCL owner file, taken over when its owner is gone."""
    path = os.path.join(build_dir, OWNER_NAME)
    me = f"{socket.gethostname()} {os.getpid()} {secrets.token_hex(8)}"
    waited = False
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            if _owner_gone(path, build_dir):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                continue
            if not waited:
                _waiting(ext_name, path)
                waited = True
            time.sleep(_POLL_SECONDS)
    with os.fdopen(fd, "w") as handle:
        handle.write(me)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            with open(path) as handle:
                mine = handle.read() == me
            if mine:
                os.remove(path)


@contextlib.contextmanager
def _build_lock(build_dir, ext_name):
    """Exclusive right to build in build_dir, released when the holder exits or dies."""
    flock_path = os.path.join(build_dir, FLOCK_NAME)
    try:
        fd = os.open(flock_path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise _CacheUnusable(_first_line(exc)) from None
    try:
        if _try_flock(fd, ext_name, flock_path):
            yield
        else:
            with _owner_file_lock(build_dir, ext_name):
                yield
    finally:
        os.close(fd)   # releases the flock


def _remove_stale_torch_lock(build_dir, ext_name):
    """Called holding the build lock: a torch `lock` file now can only be left by a killed build."""
    torch_lock = os.path.join(build_dir, TORCH_LOCK_NAME)
    if os.path.exists(torch_lock):
        with contextlib.suppress(FileNotFoundError):
            os.remove(torch_lock)
        print(f"Removed the stale {torch_lock}, left by a killed build of '{ext_name}'.",
              file=sys.stderr, flush=True)


def _run_in_own_session(command, check=False, **kwargs):
    """subprocess.run(ninja's command) in a new session, stopped with its compilers when the wait is interrupted
    (main.py's handler raises StopSignal there on SIGTERM or SIGINT). subprocess.run would SIGKILL ninja alone and
    leave them running: ninja starts each compiler in a process group of its own and kills those groups itself on
    SIGTERM. Whatever is still in ninja's group after NINJA_STOP_SECONDS is killed."""
    with subprocess.Popen(command, start_new_session=True, **kwargs) as proc:
        try:
            out, err = proc.communicate()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(NINJA_STOP_SECONDS)
                os.killpg(proc.pid, signal.SIGKILL)
            raise
    if check and proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, command, out, err)
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


class _BuildSubprocess:
    """What torch's cpp_extension sees as its `subprocess` module during load_source: the real one, except that
    ninja is first asked (`ninja -n`, a dry run) whether it has work to do, which `announce()`s the build, and then
    runs in a session of its own (_run_in_own_session)."""

    def __init__(self, announce):
        self.announce = announce

    def __getattr__(self, name):
        return getattr(subprocess, name)

    def run(self, command, **kwargs):
        if not (isinstance(command, list) and command[:1] == ["ninja"]):
            return subprocess.run(command, **kwargs)
        dry_run = subprocess.run(["ninja", "-n"], cwd=kwargs.get("cwd"), env=kwargs.get("env"),
                                 capture_output=True, text=True)
        if "no work to do" not in dry_run.stdout:
            self.announce()
        if os.name != "posix":  # no sessions to kill
            return subprocess.run(command, **kwargs)
        return _run_in_own_session(command, **kwargs)


@contextlib.contextmanager
def _torch_subprocess(replacement):
    from torch.utils import cpp_extension
    real, cpp_extension.subprocess = cpp_extension.subprocess, replacement
    try:
        yield
    finally:
        cpp_extension.subprocess = real


def load_source(ext_name, source, device_type):
    """Build (if needed) and import the extension `ext_name` from one source file; None, with one warning, when
    it cannot be built or the cache cannot be used (the reason is kept for operator_paths). Not cached: use load."""
    global _build_seconds, _building
    from torch.utils import cpp_extension

    start = time.monotonic()
    _building = True
    try:
        build_dir = _build_directory(ext_name)
        with _build_lock(build_dir, ext_name):
            _remove_stale_torch_lock(build_dir, ext_name)

            def announce():
                print(f"Building the {device_type.upper()} kernel '{ext_name}' in {build_dir} (about a minute; "
                      f"once per checkout and source change)...", file=sys.stderr, flush=True)
            # at::parallel_for only runs in parallel when the extension itself is compiled with OpenMP.
            openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
            # Without -fno-trapping-math GCC may not if-convert the element-wise exp/tanh loops for AVX2 (it will not
            # evaluate a division that the source only reaches on one branch), and they stay scalar. The kernels
            # never read floating-point exception flags, and IEEE rounding is unchanged.
            cflags = ["-O3", "-fno-trapping-math"] + openmp
            with _torch_subprocess(_BuildSubprocess(announce)):
                return cpp_extension.load(name=ext_name, sources=[source], extra_cflags=cflags,
                                          extra_ldflags=openmp, extra_cuda_cflags=["-O3"],
                                          build_directory=build_dir, verbose=False)
    except _CacheUnusable as exc:
        _unavailable[ext_name] = f"kernel cache unusable: {exc}"
        root = _cache_root()
        if root not in _warned_caches:   # one warning for all extensions
            _warned_caches.add(root)
            warnings.warn(f"the kernel cache {root} (TORCH_EXTENSIONS_DIR) cannot be used ({exc}); "
                          f"using the slow PyTorch reference instead", stacklevel=2)
        return None
    except Exception as exc:  # no compiler, no nvcc, ...: the reference still gives correct results
        _unavailable[ext_name] = f"build failed: {_first_line(exc)}"
        warnings.warn(f"could not build {ext_name} ({_first_line(exc)}); using the slow PyTorch reference instead",
                      stacklevel=2)
        return None
    finally:
        _building = False
        _build_seconds += time.monotonic() - start


CHECKOUT = os.path.dirname(os.path.abspath(__file__))


def extension_name(name, device_type, checkout=CHECKOUT):
    """`<name>_<device_type>_<8 hex digits of the checkout's path>`: the extension's name and its cache folder."""
    return f"{name}_{device_type}_{hashlib.sha1(checkout.encode()).hexdigest()[:8]}"


@functools.lru_cache(maxsize=None)
def load(folder, name, device_type):
    """Build (first use only) and import `<folder>/<name>_<device_type>.{cpp,cu}`; None if it cannot be built."""
    suffix = "cpp" if device_type == "cpu" else "cu"
    source = os.path.join(CHECKOUT, folder, f"{name}_{device_type}.{suffix}")
    return load_source(extension_name(name, device_type), source, device_type)


KERNEL_DEVICES = ("cpu", "cuda")   # the devices an operator may ship a kernel for


def extension_for(folder, name, tensor, kernel_devices=KERNEL_DEVICES):
    """The compiled extension for `tensor`'s device, or None when the reference must be used: forced, or the
    operator has no kernel for that device (`kernel_devices`, those it ships), or it could not be built."""
    if reference_forced() or tensor.device.type not in kernel_devices:
        return None
    return load(folder, name, tensor.device.type)


def _why_reference(name, device_type, kernel_devices):
    """Why extension_for gave no extension, for operator_paths."""
    if reference_forced():
        return f"{FORCE_REFERENCE_ENV}={os.environ[FORCE_REFERENCE_ENV]}"
    if device_type not in KERNEL_DEVICES:
        return f"no kernel for {device_type} tensors"
    if device_type not in kernel_devices:
        return f"no {device_type.upper()} kernel"
    return _unavailable.get(extension_name(name, device_type), f"no {device_type.upper()} kernel")


class _FusedOp(torch.autograd.Function):
    """Autograd glue for every extension: `ext.forward(*inputs) -> [out, *saved]`,
    `ext.backward(grad_out, *inputs, saved) -> grads of the first `num_differentiable` inputs`."""

    @staticmethod
    def forward(ctx, ext, num_differentiable, *inputs):
        out, *saved = ext.forward(*inputs)
        ctx.ext = ext
        ctx.num_inputs = len(inputs)
        ctx.num_differentiable = num_differentiable
        ctx.save_for_backward(*inputs, *saved)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        tensors = ctx.saved_tensors
        inputs, saved = tensors[:ctx.num_inputs], list(tensors[ctx.num_inputs:])
        grads = ctx.ext.backward(grad_out.contiguous(), *inputs, saved)
        return (None, None, *grads, *([None] * (ctx.num_inputs - ctx.num_differentiable)))


@functools.lru_cache(maxsize=None)
def _warn_unsupported(description):
    """One warning per distinct unsupported case, not one per call."""
    warnings.warn(f"{description}; using the PyTorch reference instead (same results, slower)", stacklevel=3)


# The self-check's input: batch 1 and at most this many time steps, the other sizes those of the first real call
# (the head size decides the kernels' vector paths). Its seed feeds a private generator: the global RNG, which
# decides a run's initialisation, dropout and data order, must not move.
SELF_CHECK_STEPS = 5
SELF_CHECK_SEED = 0
# Agreement asked of the kernel; a miscompiled kernel is off by far more, a correct one by float rounding only.
SELF_CHECK_TOLERANCE = {torch.float32: dict(rtol=1e-3, atol=1e-4), torch.float64: dict(rtol=1e-8, atol=1e-10)}

_self_checks = {}    # (operator, device type, dtype, instruction set) -> None (passed) or what went wrong


def self_check_input(inputs, num_sequences):
    """Random tensors shaped like `inputs` with batch 1 and SELF_CHECK_STEPS steps in the first `num_sequences`
    ones (those shaped (B, H, L, ...)), whatever the caller's length: on one step the SRWM's output does not depend
    on some of its inputs, and the check would fail on the length instead of the kernel."""
    generator = torch.Generator(device=inputs[0].device).manual_seed(SELF_CHECK_SEED)
    tiny = []
    for index, tensor in enumerate(inputs):
        shape = [1, *tensor.shape[1:]]
        if index < num_sequences:
            shape[2] = SELF_CHECK_STEPS
        tiny.append(0.5 * torch.randn(shape, generator=generator, dtype=tensor.dtype, device=tensor.device))
    return tiny, generator


def self_check(ext, reference, num_differentiable, inputs, num_sequences):
    """None when the fused kernel agrees with the reference on a tiny random input (output and the gradients of
    the first `num_differentiable` inputs), else what disagreed or failed, in a few words."""
    tiny, generator = self_check_input(inputs, num_sequences)
    results = []
    with torch.inference_mode(False), torch.enable_grad():
        grad_out = None
        for forward in (lambda *xs: _FusedOp.apply(ext, num_differentiable, *xs), reference):
            leaves = [t.clone().requires_grad_(i < num_differentiable) for i, t in enumerate(tiny)]
            try:
                out = forward(*leaves)
                if grad_out is None:
                    grad_out = torch.randn(out.shape, generator=generator, dtype=out.dtype, device=out.device)
                grads = torch.autograd.grad(out, leaves[:num_differentiable], grad_out)
            except Exception as exc:  # a kernel that fails outright (a CUDA error, ...) has failed its check too
                return f"it raised {type(exc).__name__}: {_first_line(exc)}"
            results.append([out.detach(), *grads])
    tolerance = SELF_CHECK_TOLERANCE.get(inputs[0].dtype, dict(rtol=1e-2, atol=1e-3))
    for index, (fused, expected) in enumerate(zip(*results)):
        what = "output" if index == 0 else f"gradient of input {index - 1}"
        if fused.shape != expected.shape:
            return f"its {what} has shape {tuple(fused.shape)}, not {tuple(expected.shape)}"
        if not torch.allclose(fused, expected, **tolerance):
            return f"its {what} is off by up to {(fused - expected).abs().max().item():.3g}"
    return None


def self_check_failure(ext, name, reference, num_differentiable, inputs, num_sequences):
    """None when the fused kernel may run these inputs (it has passed its self-check for this operator, device,
    dtype and instruction set in this process), else what went wrong. The first failure warns once; the caller
    records it for operator_paths."""
    device_type = inputs[0].device.type
    isa = ext.isa() if hasattr(ext, "isa") else device_type
    key = (name, device_type, inputs[0].dtype, isa)
    if key not in _self_checks:
        _self_checks[key] = self_check(ext, reference, num_differentiable, inputs, num_sequences)
        if _self_checks[key] is not None:
            warnings.warn(f"{name}: the fused {device_type.upper()} kernel ({isa}, {inputs[0].dtype}) failed its "
                          f"self-check against the PyTorch reference ({_self_checks[key]}); using the reference "
                          f"for the rest of this process", stacklevel=3)
    return _self_checks[key]


def run_fused(folder, name, reference, num_differentiable, *inputs, num_sequences, kernel_devices=KERNEL_DEVICES):
    """Run an operator through its compiled kernel, or through `reference` when no kernel applies.

    The first `num_differentiable` inputs get gradients; the rest (initial states) do not; the first
    `num_sequences` are shaped (B, H, L, ...). `kernel_devices`: the devices whose kernel the operator ships
    (`<folder>/<name>_cpu.cpp`, `<name>_cuda.cu`); on the others the reference runs without a build or a warning. An extension may expose `supports(*inputs)`; when it says False (a
    dtype or head size the kernel does not handle), the reference runs. So it does when the kernel has failed its
    self-check (self_check_failure). The path taken is recorded under `name` (see operator_paths).
    """
    device_type = inputs[0].device.type
    ext = extension_for(folder, name, inputs[0], kernel_devices)
    if ext is None:
        record_path(name, f"PyTorch reference ({_why_reference(name, device_type, kernel_devices)})")
        return reference(*inputs)
    if hasattr(ext, "supports") and not ext.supports(*inputs):
        sizes = sorted({t.shape[-1] for t in inputs})
        detail = (f"{device_type.upper()} kernel does not handle {inputs[0].dtype} inputs with last dimensions "
                  f"{sizes}")
        record_path(name, f"PyTorch reference ({detail})")
        _warn_unsupported(f"{folder}.{name}: the {detail}")
        return reference(*inputs)
    failure = self_check_failure(ext, name, reference, num_differentiable, inputs, num_sequences)
    if failure is not None:
        record_path(name, f"PyTorch reference (the fused {device_type.upper()} kernel failed its self-check: "
                          f"{failure})")
        return reference(*inputs)
    record_path(name, f"fused {device_type.upper()} kernel")
    return _FusedOp.apply(ext, num_differentiable, *(t.contiguous() for t in inputs))
