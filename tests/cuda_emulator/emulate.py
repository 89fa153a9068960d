"""Build a CUDA extension source (.cu) as a CPU extension that runs its kernels in the emulator of emu_cuda.h.

The .cu file and the project headers it includes by relative path are rewritten mechanically (launch syntax,
extern __shared__, CUDA-only headers, is_cuda checks, NaN-poisoned at::empty) and compiled with g++ through
torch.utils.cpp_extension. The kernel code is not edited: what runs is the code that nvcc compiles.
"""
import functools
import os
import re
import tempfile

from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
LOCAL_INCLUDE = re.compile(r'^#include "([^"]+)"\n', flags=re.M)


def inline_local_includes(path, seen):
    """The text of `path` with its `#include "..."` headers pasted in, each once (they are `#pragma once`): the
    rewrite below must reach the helpers in those headers too, and the generated file lives elsewhere."""
    def paste(match):
        header = os.path.normpath(os.path.join(os.path.dirname(path), match.group(1)))
        if header in seen:
            return ""
        seen.add(header)
        return inline_local_includes(header, seen).replace("#pragma once\n", "")
    with open(path) as f:
        return LOCAL_INCLUDE.sub(paste, f.read())


def translate(source):
    source = re.sub(r"^#include <(c10/cuda|ATen/cuda)/[^>]*>\n", "", source, flags=re.M)
    source = re.sub(r"extern __shared__ (?:__align__\(\d+\) )?(\w+) (\w+)\[\];",
                    r"\1* \2 = static_cast<\1*>(::emu::dynamic_smem());", source)
    source = re.sub(r"([\w:]+(?:<[^<>;()]*>)?)\s*<<<(.*?)>>>\(", r"::emu::launch(\1, \2, ", source, flags=re.S)
    # The emulated "GPU" is the CPU: tensors on it are CPU tensors.
    source = source.replace(".is_cuda()", ".is_cpu()").replace("->is_cuda()", "->is_cpu()")
    source = re.sub(r"\b(?:at|torch)::empty_like\(", "::emu::empty_like(", source)
    source = re.sub(r"\b(?:at|torch)::empty\(", "::emu::empty(", source)
    return '#include "emu_cuda.h"\n' + source


@functools.lru_cache(maxsize=None)
def load(relative_path, verbose=False):
    """Build (cached on disk) and import the emulated extension of `relative_path` (a .cu file in the repo)."""
    path = os.path.join(REPO, relative_path)
    name = os.path.splitext(os.path.basename(path))[0] + "_emu"
    cache = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(tempfile.gettempdir(), "torch_extensions")
    build_dir = os.path.join(cache, "cuda_emulator", name)
    os.makedirs(build_dir, exist_ok=True)
    cpp = os.path.join(build_dir, name + ".cpp")
    text = translate(inline_local_includes(path, set()))
    # Rewrite only on change, so that ninja's timestamps let an unchanged kernel skip the build.
    if not os.path.exists(cpp) or open(cpp).read() != text:
        with open(cpp, "w") as f:
            f.write(text)
    # -O1: the fibers make -O0 slow, and -O2/-O3 builds take much longer for no gain in a test.
    return cpp_extension.load(name=name, sources=[cpp], extra_include_paths=[HERE], build_directory=build_dir,
                              extra_cflags=["-O1"], verbose=verbose)
