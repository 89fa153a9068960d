#!/usr/bin/env bash
# The GPU check of the CUDA kernels, for a machine with a CUDA GPU and PyTorch built with CUDA (no internet needed;
# about 5-8 minutes). Stages, each time-limited, in order of value:
#   env        versions of Python, torch, CUDA, the GPU, nvcc and compute-sanitizer
#   build      the four CUDA extensions, built in parallel and timed (compiler errors in full on failure)
#   tests      python -m pytest -q -m "cuda or not cuda" tests/test_cuda.py
#   racecheck  the four kernels, forward and backward at small sizes, under compute-sanitizer --tool racecheck
#   bench      python scripts/bench_ops.py --device cuda
#   memcheck   as racecheck, under --tool memcheck
# Each stage writes <stage>.txt into $OUT (or ./gpu_results); summary.txt gets one line per stage. A stage that
# would start past the time budget (GPU_CHECK_BUDGET_S, default 480 s) is skipped. Exit status 1 if any stage failed.
#   scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."

out_dir=${OUT:-gpu_results}
mkdir -p "$out_dir"
summary="$out_dir/summary.txt"
: >"$summary"
note() { echo "$*" | tee -a "$summary"; }

budget=${GPU_CHECK_BUDGET_S:-480}
failed=0
# stage NAME LIMIT_S COMMAND...: runs COMMAND with its output in $out_dir/NAME.txt, within LIMIT_S and the budget.
stage() {
    local name=$1 limit=$2
    shift 2
    local left=$((budget - SECONDS))
    if [ "$left" -lt 30 ]; then
        note "SKIP $name (time budget of $budget s used up)"
        failed=1
        return 1
    fi
    [ "$limit" -le "$left" ] || limit=$left
    local start=$SECONDS
    # bash -c: COMMAND may be one of the (exported) functions below
    timeout "$limit" bash -c '"$@"' stage "$@" >"$out_dir/$name.txt" 2>&1
    local rc=$?
    local status="ok  "
    [ "$rc" -eq 0 ] || status="FAIL"
    [ "$rc" -eq 124 ] && status="TIMEOUT after $limit s:"
    note "$status $name ($((SECONDS - start)) s)"
    [ "$rc" -eq 0 ] || failed=1
    return "$rc"
}

# The Python that has torch: python3 on the lent machines, python on others.
PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
    for candidate in python3 python; do
        if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import torch" >/dev/null 2>&1; then
            PYTHON=$candidate
            break
        fi
    done
fi
if [ -z "$PYTHON" ]; then
    note "FAIL env (no python with torch)"
    exit 1
fi
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-${TMPDIR:-/tmp}/fwp_torch_extensions}
export PYTHONUNBUFFERED=1
workdir=$(mktemp -d)
trap 'rm -rf "$workdir"' EXIT

environment() {
    "$PYTHON" - <<'EOF' || return 1
import sys
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| torch CUDA", torch.version.cuda)
if not torch.cuda.is_available():
    sys.exit("torch.cuda.is_available() is False")
props = torch.cuda.get_device_properties(0)
print("GPU", props.name, "| compute capability", f"{props.major}.{props.minor}", "|", props.multi_processor_count,
      "SMs |", round(props.total_memory / 2**30), "GiB")
EOF
    nvcc --version | tail -2
    command -v compute-sanitizer >/dev/null && compute-sanitizer --version | head -2
    nvidia-smi -L
}

build_one() {  # folder name: builds <folder>/<name>_cuda.cu through kernel_loader (the path tests will use)
    local start=$SECONDS
    if "$PYTHON" -c "import sys, kernel_loader; sys.exit(kernel_loader.load('$1', '$2', 'cuda') is None)" \
            >"$workdir/build_$2.txt" 2>&1; then
        echo "built $2_cuda in $((SECONDS - start)) s"
    else
        echo "FAILED to build $2_cuda after $((SECONDS - start)) s:"
        cat "$workdir/build_$2.txt"
        ninja -C "$TORCH_EXTENSIONS_DIR/$("$PYTHON" -c "import kernel_loader; print(kernel_loader.extension_name('$2', 'cuda'))")" \
            -v 2>&1 | tail -60  # the compiler's own messages
        return 1
    fi
}

build_all() {
    local pids=() rc=0
    build_one fast_transformers fast_weight_sum >"$workdir/b1.txt" 2>&1 & pids+=($!)
    build_one fast_weight delta_net >"$workdir/b2.txt" 2>&1 & pids+=($!)
    build_one rec_update_fwm_tanh rec_delta >"$workdir/b3.txt" 2>&1 & pids+=($!)
    build_one self_ref_v0 self_ref_v0 >"$workdir/b4.txt" 2>&1 & pids+=($!)
    for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
    cat "$workdir"/b[1-4].txt
    return "$rc"
}

# Forward and backward of every kernel once, at sizes that cover the kernels' layouts (32-lane columns, several
# column blocks, a checkpoint boundary, the largest shared-memory configuration).
cat >"$workdir/sanitize_ops.py" <<'EOF'
import sys
sys.path[:0] = [".", "tests"]
import torch
import test_cuda
for op, shape in [("sum", (1, 2, 20, 200, 40)), ("delta", (1, 2, 20, 40, 200)), ("rec", (1, 2, 35, 64)),
                  ("srwm", (1, 2, 35, 64)), ("rec", (1, 1, 3, 5)), ("srwm", (1, 1, 3, 5))]:
    inputs = test_cuda.make_inputs(op, shape)
    ext = test_cuda.extension(op)
    out, *saved = ext.forward(*inputs)
    grads = ext.backward(torch.randn_like(out), *inputs, saved)
    torch.cuda.synchronize()
    print(op, shape, "ran")
EOF

sanitize() {  # tool
    if ! command -v compute-sanitizer >/dev/null 2>&1; then
        echo "compute-sanitizer not found"
        return 1
    fi
    compute-sanitizer --tool "$1" --error-exitcode 3 "$PYTHON" "$workdir/sanitize_ops.py"
}

export PYTHON workdir
export -f environment build_one build_all sanitize
stage env 60 environment || { note "no usable CUDA GPU: stopping"; exit 1; }
stage build 300 build_all
stage tests 300 "$PYTHON" -m pytest -q -rs -m "cuda or not cuda" tests/test_cuda.py
stage racecheck 120 sanitize racecheck
stage bench 180 "$PYTHON" scripts/bench_ops.py --device cuda
stage memcheck 120 sanitize memcheck
note "total $SECONDS s; outputs in $out_dir"
exit "$failed"
