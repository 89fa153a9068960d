"""Benchmark of the four fast-weight operators: fused kernel vs the per-step reference loop, forward + backward.

    python scripts/bench_ops.py [--device cpu|cuda] [--dims 16 32 64] [--batch 64] [--heads 4] [--length 100]

For each operator and head size D it prints, as a markdown table, the median wall time of forward + backward
through the public function (fused kernel) and through the reference loop, measured in the same run, their
ratio, and the fused path's achieved GFLOP/s next to this machine's large-matmul GFLOP/s (the practical peak),
measured again for every row: on a shared machine the load changes during a run, and a low matmul rate marks a
row timed while other work was running.
FLOPs are those of the equations: each operator's forward multiply-adds per step (below) times 3 for forward
plus backward (the backward forms two products per forward product); recomputation inside kernels is not counted.
`--chunked` adds the chunk-parallel forms of the sum and delta rules. `--threads 1 --cpu-time` times the CPU
time of the one computing thread instead of wall time, which other users' load on a shared machine barely moves.
The first lines name the CPU, its vector instruction sets, the one the fused kernels run (`--isa avx2` caps it,
through FWP_CPU_ISA, to measure the AVX2 kernels on an AVX-512 machine) and ATen's.
"""
import argparse
import os
import statistics
import time

import torch

import experiment  # noqa: F401 (first: it puts the repository root on sys.path)
import kernel_loader
from fast_transformers import fast_weight_sum, fast_weight_sum_reference
from fast_transformers.chunked import fast_weight_sum_chunked
from fast_weight import delta_net_fn, delta_net_reference
from fast_weight.chunked import delta_net_chunked
from rec_update_fwm_tanh import rec_delta_fn, rec_delta_reference
from self_ref_v0 import self_ref_v0, self_ref_v0_reference
from utils import cpu_description


def sum_inputs(B, H, L, D, gen):
    return [torch.randn(B, H, L, D, generator=gen) for _ in range(3)], [torch.zeros(B, H, D, D)]


def delta_inputs(B, H, L, D, gen):
    q, k, v = (torch.randn(B, H, L, D, generator=gen) for _ in range(3))
    beta = torch.rand(B, H, L, 1, generator=gen)
    return [q, torch.softmax(k, -1), v, beta], [torch.zeros(B, H, D, D)]


def rec_inputs(B, H, L, D, gen):
    sequences = [torch.randn(B, H, L, D, generator=gen) for _ in range(3)] + [torch.randn(B, H, L, 1, generator=gen)]
    recurrent = [torch.randn(1, H, D, D, generator=gen) / D ** 0.5 for _ in range(3)]
    recurrent.append(torch.randn(1, H, 1, D, generator=gen) / D ** 0.5)
    return sequences + recurrent, [torch.zeros(B, H, D, D), torch.zeros(B, H, 1, D)]


def srwm_inputs(B, H, L, D, gen):
    x = torch.randn(B, H, L, D, generator=gen)
    weights = [torch.randn(B, H, D, D, generator=gen) / D ** 0.5 for _ in range(3)]
    w_b = torch.randn(B, H, D, 4, generator=gen) / D ** 0.5 - 1
    return [x, *weights, w_b], []


# name -> (public function, reference, (folder, kernel base name), input maker, forward FLOPs per step and head,
# chunk-parallel form or None). Per-step forward FLOPs (2 per multiply-add), D = E = M:
#   sum:   W += k v^T, q W                                  4 D^2
#   delta: k W, W += k u^T, q W                             6 D^2
#   rec:   s R_q, s R_k, s R_v + the delta rule             12 D^2
#   srwm:  x W_y, x W_q, x W_k; per matrix q W, k W, update 24 D^2  (the D x 4 w_b terms are left out)
OPERATORS = {
    "fast_weight_sum": (fast_weight_sum, fast_weight_sum_reference, ("fast_transformers", "fast_weight_sum"),
                        sum_inputs, lambda D: 4 * D * D, fast_weight_sum_chunked),
    "delta_net_fn": (delta_net_fn, delta_net_reference, ("fast_weight", "delta_net"),
                     delta_inputs, lambda D: 6 * D * D, delta_net_chunked),
    "rec_delta_fn": (rec_delta_fn, rec_delta_reference, ("rec_update_fwm_tanh", "rec_delta"),
                     rec_inputs, lambda D: 12 * D * D, None),
    "self_ref_v0": (self_ref_v0, self_ref_v0_reference, ("self_ref_v0", "self_ref_v0"),
                    srwm_inputs, lambda D: 24 * D * D, None),
}


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, repeats, device, clock, warm_up=True):
    if warm_up:  # first-use kernel build, allocator
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = clock()
        fn()
        synchronize(device)
        times.append(clock() - start)
    return statistics.median(times)


def matmul_gflops(device, clock, size=2048, repeats=5):
    a, b = (torch.randn(size, size, device=device) for _ in range(2))
    return 2 * size ** 3 / median_seconds(lambda: a @ b, repeats, device, clock) / 1e9


def kernel_isa(ops, device):
    """The instruction set the compiled CPU kernels dispatch to (they all decide alike)."""
    if device != "cpu":
        return "n/a"
    for name in ops:
        _, _, (folder, base), *_ = OPERATORS[name]
        ext = None if kernel_loader.reference_forced() else kernel_loader.load(folder, base, "cpu")
        if ext is not None and hasattr(ext, "isa"):
            return ext.isa()
    return "none (no kernel)"


def forward_backward(fn, differentiable, fixed):
    def run():
        for t in differentiable:
            t.grad = None
        out = fn(*differentiable, *fixed)
        out.backward(torch.ones_like(out))
    return run


def kernel_status(public, reference, folder, name, device):
    """Why the public function would not run a compiled kernel, or None when it does."""
    if public is reference:
        return "no kernel yet (public name is the reference)"
    if kernel_loader.reference_forced():
        return f"{kernel_loader.FORCE_REFERENCE_ENV} is set"
    if kernel_loader.load(folder, name, device) is None:
        return "kernel did not build"
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dims", type=int, nargs="+", default=[16, 32, 64], help="head sizes D (= E = M)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--length", type=int, default=100)
    parser.add_argument("--ops", nargs="+", choices=tuple(OPERATORS), default=list(OPERATORS))
    parser.add_argument("--repeats", type=int, default=10, help="timed runs of each fused path")
    parser.add_argument("--reference-repeats", type=int, default=3,
                        help="timed runs of each reference loop (no warm-up run: it has nothing to build)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="CPU threads for every path (default: torch's, one per core)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time the CPU time of the computing thread (needs --threads 1 and --device cpu)")
    parser.add_argument("--chunked", action="store_true", help="also time the chunk-parallel sum and delta forms")
    parser.add_argument("--isa", choices=("native", "avx2", "baseline"), default="native",
                        help="cap the CPU kernels' instruction set (sets FWP_CPU_ISA; native: the best the CPU has)")
    args = parser.parse_args(argv)
    if args.isa != "native":
        os.environ["FWP_CPU_ISA"] = args.isa  # read once, at the kernels' first call
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "bench_ops.py: error: --device cuda but no CUDA device is available\n")
    if args.cpu_time and (args.threads != 1 or args.device != "cpu"):
        parser.exit(2, "bench_ops.py: error: --cpu-time needs --threads 1 and --device cpu\n")
    clock = time.thread_time if args.cpu_time else time.perf_counter

    torch.set_num_threads(args.threads)
    B, H, L = args.batch, args.heads, args.length
    print(f"device {args.device}, {torch.get_num_threads()} threads, B={B} H={H} L={L}, float32, forward + backward, "
          f"{'CPU' if args.cpu_time else 'wall'} time")
    if args.device == "cpu":
        print(f"CPU: {cpu_description()}; fused kernels: {kernel_isa(args.ops, args.device)}; "
              f"ATen: {torch.backends.cpu.get_cpu_capability()}")
    print()
    # The last column is what a kernel 25x faster than the reference would have to run at, in % of the matmul rate:
    # where the reference loop is itself fast (large batched products on a wide-vector CPU) it exceeds 100 %.
    print("| operator | D | fused (ms) | reference (ms) | speed-up | fused GFLOP/s | matmul GFLOP/s | % of matmul "
          "| 25x needs |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    notes = []
    for name in args.ops:
        public, reference, (folder, base), make_inputs, step_flops, chunked = OPERATORS[name]
        status = kernel_status(public, reference, folder, base, args.device)
        if status:
            notes.append(f"{name}: {status}; its 'fused' column times the reference")
        paths = [(name, public)] + ([(f"{name} (chunked)", chunked)] if args.chunked and chunked else [])
        for D in args.dims:
            differentiable, fixed = make_inputs(B, H, L, D, torch.Generator().manual_seed(0))
            differentiable = [t.to(args.device).requires_grad_() for t in differentiable]
            fixed = [t.to(args.device) for t in fixed]
            flops = 3 * step_flops(D) * B * H * L
            reference_s = median_seconds(forward_backward(reference, differentiable, fixed),
                                         args.reference_repeats, args.device, clock, warm_up=False)
            for label, fn in paths:
                peak = matmul_gflops(args.device, clock)
                fused_s = median_seconds(forward_backward(fn, differentiable, fixed), args.repeats, args.device,
                                         clock)
                gflops = flops / fused_s / 1e9
                needed = 25 * flops / reference_s / 1e9
                print(f"| {label} | {D} | {fused_s * 1e3:.2f} | {reference_s * 1e3:.1f} | "
                      f"{reference_s / fused_s:.1f}x | {gflops:.1f} | {peak:.0f} | {100 * gflops / peak:.0f}% | "
                      f"{100 * needed / peak:.0f}% |", flush=True)
    for note in notes:
        print(f"\nnote: {note}")


if __name__ == "__main__":
    main()
