"""Training-speed benchmark: milliseconds per training step and seconds per epoch for every model.

    python scripts/bench_train.py [--task parity] [--steps 20] [--models 0 10 1 8 2 7 12]

Every model runs at its scripts/hparams.csv configuration for the task (main.py's flags as the sweep gives them),
on CPU, single thread, timed in CPU time of the computing thread (other users' load on a shared machine barely
moves it). A training step is main.py's per batch (its own functions): forward and loss (the batch trimmed to its
longest line), backward, the optimiser step and zero_grad; it is timed on the same random batches for every model
and split into those three parts.
Seconds per epoch: training = the mean step time x batches per epoch; evaluation = one utils.evaluate of valid and
test (what main.py runs at each report) x the reports per epoch (every --report_every batches and at the epoch's
end). Each row ends with the step's ratio to the one-layer LSTM's. The last section lists the most expensive ATen
operators of one training step and of one evaluation of the first two fast-weight models.
"""
import argparse
import math
import statistics
import time

import torch

import experiment  # first: it puts the repository root on sys.path
import data
import kernel_loader
import main as train_main
from model import MODEL_NAMES, MODEL_SLUGS, MODELS, PAPER_MODELS, build_model
from utils import cpu_description, evaluate

EVAL_BATCH_SIZE = train_main.EVAL_BATCH_SIZE  # what main.py evaluates with
BASELINE = "lstm"  # the slug of the model every row is compared with


def timed(fn):
    start = time.thread_time()
    result = fn()
    return time.thread_time() - start, result


def train_step_parts(model, optimizer, clip, split, indices, pad):
    """(forward incl. loss, backward, optimizer) CPU seconds of one training step on `indices`."""
    t_fwd, loss = timed(lambda: train_main.batch_loss(model, split, indices, pad))
    t_bwd, _ = timed(loss.backward)
    t_opt, _ = timed(lambda: train_main.update_weights(model, optimizer, clip))
    return t_fwd, t_bwd, t_opt


def step_flops(model, split, indices, pad):
    """Floating-point operations of the matrix products (mm, addmm, bmm, ..., the LSTM's gates) of one forward +
    backward; the fused fast-weight operators and element-wise work are not included."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    lstm_flops = []

    def count_lstm(module, inputs, _output):
        # nn.LSTM runs as one ATen op that the counter does not see into; per token and layer its products are
        # 2 * 4H * (input + H) forward and twice that backward.
        tokens = inputs[0].numel() // module.input_size
        for layer in range(module.num_layers):
            width = module.input_size if layer == 0 else module.hidden_size
            lstm_flops.append(3 * 2 * 4 * module.hidden_size * (width + module.hidden_size) * tokens)
    hooks = [m.register_forward_hook(count_lstm) for m in model.modules() if isinstance(m, torch.nn.LSTM)]
    with counter:
        train_main.batch_loss(model, split, indices, pad).backward()
    for hook in hooks:
        hook.remove()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() + sum(lstm_flops)


def bench_model(model_type, hparams, dataset, args, batches):
    parsed = train_main.build_parser().parse_args(experiment.main_args(args.task, model_type, hparams, seed=1))
    torch.manual_seed(parsed.seed)
    model = build_model(parsed, len(dataset.src_vocab) + 1, len(dataset.tgt_vocab) + 1)
    optimizer = train_main.make_optimizer(model, parsed)
    model.train()
    train = dataset.splits["train"]
    for indices in batches[:2]:  # warm-up: kernel loading, allocator
        train_step_parts(model, optimizer, parsed.clip, train, indices, dataset.tgt_pad)
    parts = [train_step_parts(model, optimizer, parsed.clip, train, indices, dataset.tgt_pad)
             for indices in batches[2:]]
    fwd, bwd, opt = (statistics.mean(p[i] for p in parts) for i in range(3))
    flops = statistics.mean(step_flops(model, train, indices, dataset.tgt_pad) for indices in batches[2:])
    step = fwd + bwd + opt
    batches_per_epoch = math.ceil(len(train) / parsed.batch_size)
    evaluations = (math.ceil(batches_per_epoch / args.report_every) if args.report_every > 0 else 0) + 1
    t_eval = min(timed(lambda: [evaluate(model, dataset.splits[name], dataset.tgt_pad, EVAL_BATCH_SIZE)
                                for name in ("valid", "test")])[0] for _ in range(args.eval_repeats))
    return {"name": MODEL_NAMES[model_type], "type": model_type, "step": step, "fwd": fwd, "bwd": bwd, "opt": opt,
            "train_epoch": step * batches_per_epoch, "eval": t_eval, "eval_epoch": t_eval * evaluations, "flops": flops,
            "evaluations": evaluations, "batches": batches_per_epoch, "model": model, "optimizer": optimizer,
            "clip": parsed.clip}


def top_ops(fn, count):
    """The `count` ATen operators with the largest self CPU time in one call of fn, as table rows."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [f"| {e.key} | {e.count} | {e.self_cpu_time_total / 1e3:.2f} | {100 * e.self_cpu_time_total / total:.0f}% |"
            for e in events[:count]]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="parity")
    parser.add_argument("--data_dir", default=None, help="default: data/<task>, generated when missing")
    parser.add_argument("--hparams", default=str(experiment.REPO_ROOT / "scripts" / "hparams.csv"))
    parser.add_argument("--models", type=int, nargs="+", default=list(PAPER_MODELS))
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per model (after 2 warm-up)")
    parser.add_argument("--eval_repeats", type=int, default=1)
    parser.add_argument("--report_every", type=int, default=50, help="main.py's --report_every")
    parser.add_argument("--profile", action="store_true", help="list the costliest operators of a step and an eval")
    parser.add_argument("--flush_denormal", action="store_true",
                        help="torch.set_flush_denormal(True): denormal floats become zero (x86 computes them slowly)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.flush_denormal:
        torch.set_flush_denormal(True)

    data_dir = args.data_dir or str(experiment.REPO_ROOT / "data" / args.task)
    if data.needs_generation(data_dir):
        data.write_task(args.task, data_dir)
    dataset = data.load_data(data_dir, device="cpu")
    configs = {model_type: hparams for (task, model_type), hparams in experiment.read_hparams(args.hparams).items()
               if task == args.task}
    train = dataset.splits["train"]
    generator = torch.Generator().manual_seed(0)
    batch_size = next(iter(configs.values())).batch_size  # one set of batches for every model: the first row's size
    batches = torch.randperm(len(train), generator=generator).split(batch_size)[:args.steps + 2]

    isa = "reference (no kernel)"
    ext = None if kernel_loader.reference_forced() else kernel_loader.load("fast_weight", "delta_net", "cpu")
    if ext is not None and hasattr(ext, "isa"):
        isa = ext.isa()
    print(f"task {args.task}: {len(train)} training lines in {math.ceil(len(train) / batch_size)} batches of "
          f"{batch_size}, valid {len(dataset.splits['valid'])} + test {len(dataset.splits['test'])} lines per "
          f"evaluation; 1 thread, CPU time{', denormals flushed' if args.flush_denormal else ''}")
    print(f"CPU: {cpu_description()}; fused kernels: {isa}; ATen: {torch.backends.cpu.get_cpu_capability()}\n")
    print("| model | step (ms) | forward | backward | optimizer | x LSTM step | matmul GFLOP/step | x LSTM GFLOP "
          "| GFLOP/s | train s/epoch | eval s (valid+test) | evals/epoch | eval s/epoch |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    results, lstm = [], None
    for model_type in args.models:
        if model_type not in configs:
            print(f"| {MODEL_NAMES.get(model_type, model_type)} | no hparams.csv row for {args.task} |")
            continue
        r = bench_model(model_type, configs[model_type], dataset, args, batches)
        results.append(r)
        if MODEL_SLUGS[model_type] == BASELINE:
            lstm = r
        step_ratio, flop_ratio = (f"{r[key] / lstm[key]:.2f}x" if lstm else "n/a" for key in ("step", "flops"))
        print(f"| {r['name']} ({model_type}) | {r['step'] * 1e3:.1f} | {r['fwd'] * 1e3:.1f} | {r['bwd'] * 1e3:.1f} | "
              f"{r['opt'] * 1e3:.1f} | {step_ratio} | {r['flops'] / 1e9:.2f} | {flop_ratio} | "
              f"{r['flops'] / r['step'] / 1e9:.0f} | {r['train_epoch']:.1f} | {r['eval']:.2f} | {r['evaluations']} | "
              f"{r['eval_epoch']:.1f} |", flush=True)

    if args.profile:
        fast = [r for r in results if MODELS[r["type"]].operator is not None] or results
        for r in fast[:2]:
            model, optimizer, clip = r["model"], r["optimizer"], r["clip"]
            print(f"\nCostliest operators (self CPU time) of one training step of {r['name']}:\n")
            print("| operator | calls | ms | share |\n| --- | ---: | ---: | ---: |")
            print("\n".join(top_ops(lambda: train_step_parts(model, optimizer, clip, train, batches[2],
                                                              dataset.tgt_pad), 12)))
            print(f"\nCostliest operators of one evaluation (valid + test) of {r['name']}:\n")
            print("| operator | calls | ms | share |\n| --- | ---: | ---: | ---: |")
            print("\n".join(top_ops(lambda: [evaluate(model, dataset.splits[name], dataset.tgt_pad, EVAL_BATCH_SIZE)
                                             for name in ("valid", "test")], 12)))


if __name__ == "__main__":
    main()
