#!/usr/bin/env bash
# Compile-check the CUDA kernels: every <folder>/*_cuda.cu (or the files given) is compiled to an object file with
# nvcc against the installed PyTorch headers, with the flags torch's extension builder uses. No GPU is needed.
# One line per file; exit status 1 if any file fails. About 3-6 minutes per file on a small CPU machine.
#   scripts/check_cuda_compile.sh [FILE.cu ...]
# Environment: PYTHON (default python), CUDA_ARCH_FLAGS (default: sm_80 and sm_90 machine code).
set -uo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvcc >/dev/null 2>&1; then
    echo "check_cuda_compile: nvcc not found on PATH" >&2
    exit 1
fi
PYTHON=${PYTHON:-python}
ARCH_FLAGS=${CUDA_ARCH_FLAGS:-"-gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90"}

workdir=$(mktemp -d)
trap 'rm -rf "$workdir"' EXIT

# Include paths and the common nvcc flags, as torch.utils.cpp_extension builds an extension.
if ! torch_flags=$("$PYTHON" - "$workdir" <<'EOF'
import os
import sys
import sysconfig

from torch.utils import cpp_extension

stub_dir = sys.argv[1]
includes = cpp_extension.include_paths() + [sysconfig.get_paths()["include"]]
# CPU-only wheels ship the c10/cuda headers without this generated one; its content is fixed, so supply it.
if not any(os.path.exists(os.path.join(p, "c10/cuda/impl/cuda_cmake_macros.h")) for p in includes):
    os.makedirs(os.path.join(stub_dir, "c10/cuda/impl"))
    with open(os.path.join(stub_dir, "c10/cuda/impl/cuda_cmake_macros.h"), "w") as f:
        f.write("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes.append(stub_dir)
print(" ".join(["-I" + p for p in includes] + cpp_extension.COMMON_NVCC_FLAGS))
EOF
); then
    echo "check_cuda_compile: could not import torch with $PYTHON" >&2
    exit 1
fi

if [ "$#" -gt 0 ]; then
    sources=("$@")
else
    sources=(fast_transformers/*_cuda.cu fast_weight/*_cuda.cu rec_update_fwm_tanh/*_cuda.cu self_ref_v0/*_cuda.cu)
fi

failed=0
for src in "${sources[@]}"; do
    name=$(basename "$src" .cu)
    start=$SECONDS
    # torch >= 2.10 builds extensions as C++20, under which torch's own headers trip diagnostic 3189 ("module"
    # parsed as an identifier); it is silenced, nothing else. -Xptxas reports spills to local memory as warnings.
    # shellcheck disable=SC2086
    if nvcc -c "$src" -o "$workdir/$name.o" -std=c++20 -O3 -Xcompiler -fPIC $ARCH_FLAGS $torch_flags \
            -DTORCH_EXTENSION_NAME="$name" -DTORCH_API_INCLUDE_EXTENSION_H -diag-suppress=3189 \
            -Xptxas=-warn-spills,-warn-lmem-usage >"$workdir/$name.log" 2>&1; then
        warnings=$(grep -c -i "warning" "$workdir/$name.log")
        if [ "$warnings" -gt 0 ]; then
            echo "WARN $src ($((SECONDS - start)) s, $warnings warning lines)"
            sed 's/^/    /' "$workdir/$name.log"
        else
            echo "ok   $src ($((SECONDS - start)) s)"
        fi
    else
        echo "FAIL $src ($((SECONDS - start)) s)"
        sed 's/^/    /' "$workdir/$name.log"
        failed=1
    fi
done
exit "$failed"
