"""Collect main.py run directories into the paper's table and a length-generalisation plot.

    python scripts/results.py                  # the repository's results/: runs, search and paper_budget
    python scripts/results.py --runs DIR [--search DIR] [--paper_budget DIR] --out_dir OUT_DIR  # those alone

Writes OUT_DIR/table.md (one row per model, one column per task, each cell `Bin0 / Bin1` accuracy of the best
checkpoint) and OUT_DIR/length_generalization.png (accuracy against string length, one panel per task).
A run directory is any folder below --runs that holds an args.json. Finished runs (final.json) report their
best checkpoint; unfinished ones the best evaluation in their metrics.jsonl so far, marked `*`.
A cell searched by scripts/tune.py (a search.json below --search) shows the seed-1 run of its best configuration
instead, with how many of its seeds reach 99 % on Bin1, and OUT_DIR/search.md lists every searched cell.
--searched_csv (default OUT_DIR/hparams_searched.csv) gets the chosen configuration of every searched cell in the
format of scripts/hparams.csv, with the search's epoch cap as num_epoch: `python scripts/sweep.py --csv
OUT_DIR/hparams_searched.csv --work_dir DIR` trains them again.
Runs below --paper_budget (sweep.py's layout: the disputed cells trained up to 300 epochs) get a section of table.md
beside their 40-epoch search, and their curves OUT_DIR/paper_budget_curves.png.

Without --runs the inputs are the repository's results/runs, results/search and results/paper_budget (--search
and --paper_budget name others, `none` for none); with --runs, only the folders the flags name. Nothing is written
outside OUT_DIR unless a flag names it, but for the default OUT_DIR, the repository's results/: there the csv is
scripts/hparams_searched.csv and README.md's grid is rewritten (--readme), so that they follow the committed
results.
"""
import argparse
import json
import os
import sys
from collections import defaultdict
from dataclasses import dataclass
from decimal import ROUND_DOWN, Decimal
from pathlib import Path

import experiment  # first: it puts the repository root on sys.path
from data import GROUP_TASKS, TASKS
from experiment import REPO_ROOT
from model import EXTENSION_MODELS, MODEL_NAMES, PAPER_MODELS
from tune import SEARCH_SEED, search_ended, trial_configuration, trials_done
from utils import selection_score

TABLE_FILE = "table.md"
PLOT_FILE = "length_generalization.png"
SEARCHED_CSV = "hparams_searched.csv"


@dataclass
class Run:
    path: Path
    task: str
    model_type: int
    seed: int
    bin0: float
    bin1: float
    finished: bool
    by_length: dict  # split -> {length: [correct, total]}; empty for unfinished runs

    @property
    def score(self):
        return selection_score(self.bin0, self.bin1)


def read_run(run_dir):
    """A Run from one run directory, or None when it has no evaluation yet."""
    with open(run_dir / "args.json") as f:
        args = json.load(f)
    common = dict(path=run_dir, task=os.path.basename(os.path.normpath(args["data_dir"])),
                  model_type=int(args["model_type"]), seed=int(args["seed"]))
    final = experiment.read_final(run_dir)
    if final is not None:
        return Run(**common, bin0=final["valid_acc"], bin1=final["valid2_acc"], finished=True,
                   by_length=final.get("by_length", {}))
    row = experiment.best_evaluation(experiment.read_metrics(run_dir))
    if row is None:
        return None
    return Run(**common, bin0=row["valid_acc"], bin1=row["valid2_acc"], finished=False, by_length={})


def collect_runs(root):
    """Every run with at least one evaluation below `root`, in path order; unreadable ones are skipped, with a note."""
    runs = []
    for args_file in sorted(Path(root).rglob("args.json")):
        try:
            run = read_run(args_file.parent)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"warning: skipping {args_file.parent}: unreadable run files ({type(exc).__name__}: {exc})",
                  file=sys.stderr)
            continue
        if run is not None:
            runs.append(run)
    return runs


def choose(runs):
    """{(task, model_type): (chosen run, number of runs)}: the best run by score; finished, then lower seed, first."""
    groups = defaultdict(list)
    for run in runs:
        groups[(run.task, run.model_type)].append(run)
    return {key: (max(group, key=lambda r: (r.score, r.finished, -r.seed)), len(group))
            for key, group in groups.items()}


@dataclass
class SearchCell:
    """A cell searched by scripts/tune.py: its search.json and the runs of its best configuration."""
    summary: dict
    folder: Path
    runs: list  # Run of seed 1 (the search trial), then seeds 2 and 3 where they have evaluations

    @property
    def seeds_solved(self):
        return sum(run.bin1 >= SOLVED_BIN1 for run in self.runs)

    @property
    def seeds_planned(self):
        """Seed 1 and the robustness seeds, whether or not they have run yet."""
        return 1 + len(self.summary["seeds"])

    @property
    def complete(self):
        """Every trial has ended and so have the seeds: the chosen configuration can no longer change. The seeds'
        end comes from their runs' final.json: tune.py rewrites search.json only when its driver collects them, so a
        stopped driver leaves seed statuses there that predate the runs' end."""
        seed_runs = self.runs[1:]
        return (search_ended(self.summary) and len(seed_runs) == len(self.summary["seeds"])
                and all(run.finished for run in seed_runs))


SOLVED_BIN1 = 99.0
SEARCH_FILE = "search.md"


def from_table(path, table_dir):
    """`path` relative to the folder of table.md, as its links give it."""
    return Path(os.path.relpath(Path(path).resolve(), Path(table_dir).resolve())).as_posix()


def latest_run(trial_folder):
    run_dir = experiment.latest_run_dir(trial_folder)
    return read_run(run_dir) if run_dir else None


def chosen_summaries(root):
    """[(folder, summary)] for every search.json below `root` that has chosen a configuration, in path order."""
    summaries = []
    for path in sorted(Path(root).rglob("search.json")) if Path(root).is_dir() else []:
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            print(f"warning: skipping {path}: unreadable ({exc})", file=sys.stderr)
            continue
        if summary.get("best"):
            summaries.append((path.parent, summary))
    return summaries


def collect_search(summaries):
    """{(task, model_type): SearchCell} of the chosen_summaries whose chosen trial has a run with an evaluation."""
    cells = {}
    for folder, summary in summaries:
        names = [summary["best"]] + [seed["name"] for seed in summary["seeds"]]
        runs = [run for run in (latest_run(folder / name) for name in names) if run is not None]
        if runs and runs[0].seed == SEARCH_SEED:
            cells[(summary["task"], summary["model_type"])] = SearchCell(summary, folder, runs)
    return cells


def rerun_cost(cells):
    """(runs, CPU-hours) of rerunning seed 1 of every searched cell (`collect_search`'s cells), as the committed
    seed-1 runs took: the sum of their training and evaluation time (elapsed_s), one thread each."""
    seconds = sum(experiment.read_metrics(cell.runs[0].path)[-1]["elapsed_s"] for cell in cells.values())
    return len(cells), seconds / 3600


def chosen_configuration(summary):
    """The experiment.HParams of a search.json's chosen trial, with the search's epoch cap as num_epoch. Summaries
    written before tune.py searched the batch size hold trials without one: they ran at the space's."""
    space = summary["space"]
    best = next(trial for trial in summary["trials"] if trial["name"] == summary["best"])
    return trial_configuration({"batch_size": space["batch_size"], **best["hparams"]}, space["ff_factor"],
                               space["epoch_cap"])


def write_searched_hparams(path, summaries):
    """The chosen configuration of every summary as an hparams csv, rows in the table's order."""
    table = {(s["task"], s["model_type"]): chosen_configuration(s) for _, s in summaries}
    experiment.write_hparams(path, {key: table[key] for key in in_table_order(table)})


def evaluation_curve(run_dir):
    """The score at each epoch end, from metrics.jsonl."""
    return [experiment.evaluation_score(r) for r in experiment.read_metrics(run_dir) if r.get("end_of_epoch")]


def render_search(cells, table_dir):
    """search.md: per searched cell, its space, every trial, the chosen configuration, its curve and seeds."""
    lines = ["# Hyper-parameter search (scripts/tune.py)", "",
             f"Per cell: every trial (seed 1) with its status and best mean of Bin0 and Bin1; the chosen "
             f"configuration (highest best mean, then fewest steps), its curve (mean of Bin0 and Bin1 at each "
             f"epoch end) and its seeds 2 and 3. Solved: Bin1 >= {SOLVED_BIN1:g} %."]
    for task, model_type in in_table_order(cells):
        cell = cells[(task, model_type)]
        summary, best_run = cell.summary, cell.runs[0]
        space = summary["space"]
        lines += ["", f"## {task} / {MODEL_NAMES[model_type]}", "",
                  f"Space: learning rate {space['learning_rate']}, layers {space['num_layer']}, "
                  f"(hidden, heads) {space['hidden_size/n_head']}, batch {space['batch_size']}, "
                  f"ff_factor {space['ff_factor']}, at most {space['epoch_cap']} epochs; {space['scheduler']}."
                  + around_best_sentence(space), "",
                  "| Trial | Status | Epochs | Best mean (%) |", "| --- | --- | --- | --- |"]
        for trial in summary["trials"]:
            score = "-" if trial["best_score"] is None else one_decimal(trial["best_score"])
            mark = " **chosen**" if trial["name"] == summary["best"] else ""
            lines.append(f"| {trial['name']}{mark} | {trial['status']} | {trial['epochs']} | {score} |")
        curve = ", ".join(one_decimal(score) for score in evaluation_curve(best_run.path))
        seeds = "; ".join(f"seed {run.seed}: {one_decimal(run.bin0)} / {one_decimal(run.bin1)}"
                          + ("" if run.finished else "*") for run in cell.runs)
        lines += ["", f"Chosen: `{summary['best']}`, run "
                      f"`{from_table(best_run.path, table_dir)}`.",
                  f"Curve: {curve or '-'}.", f"Seeds (Bin0 / Bin1): {seeds}; "
                  f"{cell.seeds_solved}/{cell.seeds_planned} solve Bin1."]
    return "\n".join(lines) + "\n"


def around_best_sentence(space):
    """What tune.py --around_best added to a cell's grid, or nothing."""
    if "around_best" not in space:
        return ""
    ladders = "; ".join(" then ".join(", ".join(f"{k} {v}" for k, v in step.items()) for step in steps)
                        for steps in space["around_best"]["ladders"].values())
    return (f" Then one factor at a time around the grid's best `{space['around_best']['anchor']}` (a later step "
            f"only where the one before beat it): {ladders}.")


def table_models(chosen):
    """The paper's seven rows, then each extension model that has a run."""
    return PAPER_MODELS + tuple(m for m in EXTENSION_MODELS if any(model == m for _, model in chosen))


def table_tasks(chosen):
    """The paper's eight tasks, then any other task that has runs, then the group tasks that have runs."""
    present = {task for task, _ in chosen}
    others = sorted(present - set(TASKS) - set(GROUP_TASKS))
    return list(TASKS) + others + [task for task in GROUP_TASKS if task in present]


def grid(chosen, searched, tasks, models):
    """A Markdown table: one row per model, one `Bin0 / Bin1` column per task."""
    lines = ["| Model | " + " | ".join(tasks) + " |", "| --- |" + " --- |" * len(tasks)]
    for model_type in models:
        cells = [cell(chosen.get((task, model_type)), searched.get((task, model_type))) for task in tasks]
        lines.append(f"| {MODEL_NAMES[model_type]} | " + " | ".join(cells) + " |")
    return lines


def in_table_order(cells):
    """The (task, model_type) keys of `cells` as the table orders them: by task column, then by model row."""
    tasks, models = table_tasks(cells), table_models(cells)
    return sorted(cells, key=lambda key: (tasks.index(key[0]), models.index(key[1])))


def one_decimal(accuracy):
    """Truncated, not rounded, so that 100.0 always means every string was right."""
    return str(Decimal(str(accuracy)).quantize(Decimal("0.1"), rounding=ROUND_DOWN))


def cell(entry, searched=None):
    if entry is None:
        return "-"
    run, _ = entry
    text = f"{one_decimal(run.bin0)} / {one_decimal(run.bin1)}" + ("" if run.finished else "*")
    if searched is None:
        return text
    return f"{text} ({searched.seeds_solved}/{searched.seeds_planned}{'' if searched.complete else ', searching'})"


GROUP_GRID_HEADING = "## Beyond the paper: group word problems"  # table.md's second grid, below the paper's


def render_table(chosen, table_dir, searched=None):
    """table.md; `searched` ({(task, model_type): SearchCell}) marks the cells that come from a search."""
    searched = searched or {}
    tasks = table_tasks(chosen)
    languages = [task for task in tasks if task not in GROUP_TASKS]
    groups = [task for task in tasks if task in GROUP_TASKS]
    # The paper's rows always; a model beyond the paper where it has runs on those tasks.
    language_rows = [m for m in table_models(chosen) if m in PAPER_MODELS or any((t, m) in chosen for t in languages)]
    lines = ["# Accuracy (%) of the best checkpoint: Bin0 / Bin1", "", *grid(chosen, searched, languages,
                                                                             language_rows)]
    if groups:
        group_rows = [m for m in table_models(chosen) if any((t, m) in chosen for t in groups)]
        lines += ["", GROUP_GRID_HEADING, "", *grid(chosen, searched, groups, group_rows)]
    lines += ["", "- Sequence-level accuracy in percent, truncated to one decimal. Bin0: validation strings of the "
              "training lengths; Bin1: longer strings (main.py's `valid2`). `-`: not run. The best checkpoint is "
              "the evaluation with the highest mean of Bin0 and Bin1."]
    entries = [(task, model_type, *chosen[(task, model_type)])
               for task in tasks for model_type in table_models(chosen) if (task, model_type) in chosen]
    if any(not run.finished for _, _, run, _ in entries):
        lines.append("- `*`: the run has not finished (no final.json); its best evaluation so far in metrics.jsonl.")
    if searched:
        lines.append(f"- `(k/n)`: a cell searched by scripts/tune.py shows seed 1 of its best configuration; k of its "
                     f"n seeds reach {SOLVED_BIN1:g} % on Bin1. Trials, spaces and curves: search.md.")
    if any(not c.complete for c in searched.values()):
        lines.append("- `searching`: the cell's search has not ended; it shows the best configuration so far.")
    if any(count > 1 and (task, model_type) not in searched for task, model_type, _, count in entries):
        lines.append("- Where a cell has several runs (seeds), it shows the one with the highest mean of Bin0 and "
                     "Bin1 (see the run list).")
    if entries:
        lines += ["", "## Runs (directories relative to this file)", "",
                  "| Task | Model | Seed | Runs | Status | Run directory |", "| --- | --- | --- | --- | --- | --- |"]
    for task, model_type, run, count in entries:
        status = "finished" if run.finished else "unfinished"
        if (task, model_type) in searched:
            search = searched[(task, model_type)]
            status += f", searched ({trials_done(search.summary)} of {len(search.summary['trials'])} trials done)"
        lines.append(f"| {task} | {MODEL_NAMES[model_type]} | {run.seed} | {count} | {status} | "
                     f"{from_table(run.path, table_dir)} |")
    return "\n".join(lines) + "\n"


MATPLOTLIB_MISSING = "matplotlib is not installed (pip install -r requirements-sweep.txt)"


def pyplot():
    """matplotlib.pyplot drawing to files, or None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# The paper's budget (issue 34): the disputed cells' chosen configurations trained again up to 300 epochs by
# scripts/sweep.py, one folder per (task, model, seed) below --paper_budget.
CURVES_PLOT_FILE = "paper_budget_curves.png"
SEED_LINE_STYLES = ("-", "--", ":")  # seed 1, 2, 3


def collect_paper_budget(root):
    """{(task, model_type): [Run of each seed, by seed]}: per seed the latest run directory with an evaluation."""
    by_seed = {}
    for run in collect_runs(root) if Path(root).is_dir() else []:  # path order: a folder's runs oldest first
        by_seed[(run.task, run.model_type, run.seed)] = run
    cells = defaultdict(list)
    for (task, model_type, _), run in sorted(by_seed.items()):
        cells[(task, model_type)].append(run)
    return dict(cells)


def how_it_ended(run):
    """`E epochs, <why>` from metrics.jsonl and final.json ('running' before the end)."""
    records = experiment.read_metrics(run.path)
    epochs = records[-1]["epoch"] if records else 0
    final = experiment.read_final(run.path)
    return f"{epochs} epoch{'' if epochs == 1 else 's'}, {final['stopped'] if final else 'running'}"


def render_paper_budget(budget, searched, table_dir):
    """The section of table.md for the paper's budget: per cell its 40-epoch search result beside the longer runs."""
    lines = ["", "## The paper's budget: the disputed cells trained up to 300 epochs", "",
             "| Task | Model | 40-epoch search | Up to 300 epochs: seed 1 | Its end | Seeds 2, 3 | Solved | "
             "Run directory (seed 1) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for task, model_type in in_table_order(budget):
        runs = budget[(task, model_type)]
        first, others = runs[0], runs[1:]
        search = searched.get((task, model_type))
        search_text = cell((search.runs[0], 1), search) if search else "-"
        others_text = "; ".join(f"{cell((run, 1))} ({how_it_ended(run)})" for run in others) or "-"
        solved = f"{sum(run.bin1 >= SOLVED_BIN1 for run in runs)}/{len(runs)}"
        lines.append(f"| {task} | {MODEL_NAMES[model_type]} | {search_text} | {cell((first, 1))} | "
                     f"{how_it_ended(first)} | {others_text} | {solved} | "
                     f"{from_table(first.path, table_dir)} |")
    lines += ["", f"- Each cell's chosen configuration (scripts/hparams_searched.csv) with `--num_epoch 300 --patience "
              f"100`: the original's stop rule (mean of Bin0 and Bin1 at 100 %), or 300 epochs, or 100 epochs without "
              f"a new best (docs/reproducing.md#the-papers-budget). Seeds 2 and 3 only where seed 1 reached "
              f"{SOLVED_BIN1:g} % on Bin1; Solved: runs at {SOLVED_BIN1:g} % or more on Bin1. Curves: "
              f"{CURVES_PLOT_FILE}."]
    return lines


def plot_paper_budget_curves(budget, path):
    """One panel per cell: Bin0 and Bin1 accuracy at every epoch end, one line per seed (seed 1 bold); the reason
    when there is no plot, else None."""
    plt = pyplot()
    if plt is None:
        return MATPLOTLIB_MISSING
    keys = in_table_order(budget)
    cols = min(len(keys), 4)
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (task, model_type) in zip(axes.flat, keys):
        for run in budget[(task, model_type)]:
            records = [r for r in experiment.read_metrics(run.path) if r.get("end_of_epoch")]
            epochs = [r["epoch"] for r in records]
            width = 1.6 if run.seed == SEARCH_SEED else 0.9
            style = SEED_LINE_STYLES[(run.seed - 1) % len(SEED_LINE_STYLES)]
            for key, color, split in (("valid_acc", "tab:blue", "Bin0"), ("valid2_acc", "tab:red", "Bin1")):
                ax.plot(epochs, [r[key] for r in records], color=color, linewidth=width, linestyle=style,
                        label=f"{split}, seed {run.seed}")
        label_accuracy_panel(ax, f"{task} / {MODEL_NAMES[model_type]}", "epoch", legend_size=6, title_size=9)
    save_panels(plt, fig, axes, len(keys), path, dpi=110)
    return None


def label_accuracy_panel(ax, title, xlabel, legend_size, title_size=None):
    ax.set_title(title, **({} if title_size is None else {"fontsize": title_size}))  # fontsize=None: not the default
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)


def save_panels(plt, fig, axes, used, path, dpi):
    """Hides the panels after the first `used`, writes the figure to `path` and closes it."""
    for ax in list(axes.flat)[used:]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def accuracy_by_length(by_length, bucket):
    """[(bucket start, accuracy %)] over all evaluated splits, lengths grouped into `bucket`-wide intervals."""
    correct, total = defaultdict(int), defaultdict(int)
    for per_length in by_length.values():
        for length, (num_correct, num_total) in per_length.items():
            start = int(length) // bucket * bucket
            correct[start] += num_correct
            total[start] += num_total
    return [(start, 100.0 * correct[start] / total[start]) for start in sorted(total) if total[start]]


def plot_length_generalization(chosen, path, bucket):
    """One panel per task with a finished run; the reason when there is no plot, else None."""
    plt = pyplot()
    if plt is None:
        return MATPLOTLIB_MISSING
    tasks = [t for t in table_tasks(chosen) if any(t == task and run.by_length
                                                    for (task, _), (run, _) in chosen.items())]
    if not tasks:
        return "no finished run has per-length results"
    cols = min(len(tasks), 4)
    rows = (len(tasks) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    # tab10 for the first ten rows (the colours the committed plot has), Dark2 for the models after them.
    colors = dict(zip(table_models(chosen), plt.get_cmap("tab10").colors + plt.get_cmap("Dark2").colors))
    for ax, task in zip(axes.flat, tasks):
        longest_bin0 = 0
        for model_type in table_models(chosen):
            run = chosen.get((task, model_type), (None,))[0]
            if run is None or not run.by_length:
                continue
            longest_bin0 = max([longest_bin0] + [int(n) for n in run.by_length.get("valid", {})])
            points = accuracy_by_length(run.by_length, bucket)
            ax.plot([start + bucket / 2 for start, _ in points], [acc for _, acc in points], marker=".",
                    color=colors[model_type], label=MODEL_NAMES[model_type])
        if longest_bin0:
            ax.axvline(longest_bin0, color="gray", linestyle="--", linewidth=1, label="longest Bin0 string")
        label_accuracy_panel(ax, task, f"string length ({bucket}-wide buckets)", legend_size=7)
    save_panels(plt, fig, axes, len(tasks), path, dpi=120)
    return None


# README.md shows table.md's grids between these pairs of lines: the paper's (table.md's first table) and the group
# word problems' (its second); results.py rewrites them there, so the front page cannot fall behind the table.
README_GRID_START = "<!-- the grid of results/table.md, written by scripts/results.py -->"
README_GRID_END = "<!-- end of the grid -->"
README_GROUP_GRID_START = "<!-- the group grid of results/table.md, written by scripts/results.py -->"
README_GROUP_GRID_END = "<!-- end of the group grid -->"
README_GRIDS = ((README_GRID_START, README_GRID_END, None), (README_GROUP_GRID_START, README_GROUP_GRID_END,
                                                               GROUP_GRID_HEADING))


def grid_lines(table_text, heading=None):
    """The first Markdown table of table.md after the line `heading` (None: from its start): its header, rule and
    one row per model; [] when there is none (no group task was run, say)."""
    lines = table_text.splitlines()
    if heading is not None:
        if heading not in lines:
            return []
        lines = lines[lines.index(heading):]
    start = next((i for i, line in enumerate(lines) if line.startswith("| ")), None)
    if start is None:
        return []
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def update_readme_grid(readme, table_text):
    """Replaces each grid between its README_GRIDS markers in `readme`; False when it has none of them."""
    text, found = readme.read_text(), False
    for start, end, heading in README_GRIDS:
        if start not in text or end not in text:
            continue
        found = True
        before, rest = text.split(start + "\n", 1)
        _, after = rest.split(end, 1)
        text = before + start + "\n" + "".join(line + "\n" for line in grid_lines(table_text, heading)) + end + after
    if found:
        readme.write_text(text)
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", help="root of the run directories (default: results/runs)")
    parser.add_argument("--search", help="root of scripts/tune.py's cells (search.json; default: results/search "
                                         "without --runs, else none)")
    parser.add_argument("--paper_budget", help="root of the paper-budget runs (scripts/sweep.py's layout), a section "
                                               "of table.md (default: results/paper_budget without --runs, else none)")
    parser.add_argument("--out_dir", default=str(REPO_ROOT / "results"), help="where table.md and the plot go")
    parser.add_argument("--bucket", type=int, default=10, help="width of the length buckets of the plot")
    parser.add_argument("--searched_csv", default=None,
                        help="where the chosen configuration of every searched cell goes (hparams.csv's format; "
                             "default: OUT_DIR/hparams_searched.csv, scripts/hparams_searched.csv for the repository's "
                             "results/)")
    parser.add_argument("--readme", default=None,
                        help="a README whose grid to rewrite (default: the repository's README.md, when --out_dir is "
                             "the repository's results/; else none)")
    args = parser.parse_args(argv)
    if args.runs is None:  # the repository's results; a table of other runs has only what its flags name
        args.runs = str(REPO_ROOT / "results" / "runs")
        args.search = args.search or str(REPO_ROOT / "results" / "search")
        args.paper_budget = args.paper_budget or str(REPO_ROOT / "results" / "paper_budget")
    repository_results = Path(args.out_dir).resolve() == (REPO_ROOT / "results").resolve()
    if args.readme is None and repository_results:
        args.readme = str(REPO_ROOT / "README.md")
    if args.searched_csv is None:
        args.searched_csv = str(REPO_ROOT / "scripts" / SEARCHED_CSV if repository_results
                                else Path(args.out_dir) / SEARCHED_CSV)
    if not Path(args.runs).is_dir():
        print(f"error: no run directory {args.runs}", file=sys.stderr)
        return 2
    if args.bucket < 1:
        print("error: --bucket must be at least 1", file=sys.stderr)
        return 2
    chosen = choose(collect_runs(args.runs))
    summaries = chosen_summaries(args.search) if args.search else []
    searched = collect_search(summaries)
    chosen.update({key: (cell.runs[0], 1) for key, cell in searched.items()})
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table_text = render_table(chosen, out_dir, searched)
    budget = collect_paper_budget(args.paper_budget) if args.paper_budget else {}
    if budget:
        table_text += "\n".join(render_paper_budget(budget, searched, out_dir)) + "\n"
    (out_dir / TABLE_FILE).write_text(table_text)
    print(f"wrote {out_dir / TABLE_FILE} ({len(chosen)} cells, {len(searched)} searched)")
    if args.readme and update_readme_grid(Path(args.readme), table_text):
        print(f"wrote its grid into {args.readme}")
    if searched:
        (out_dir / SEARCH_FILE).write_text(render_search(searched, out_dir))
        print(f"wrote {out_dir / SEARCH_FILE}")
    if summaries:
        write_searched_hparams(args.searched_csv, summaries)
        print(f"wrote {args.searched_csv} ({len(summaries)} searched cells)")
    if budget:
        no_plot_reason = plot_paper_budget_curves(budget, out_dir / CURVES_PLOT_FILE)
        print(f"no curves: {no_plot_reason}" if no_plot_reason else
              f"wrote {out_dir / CURVES_PLOT_FILE} ({len(budget)} cells at the paper's budget)")
    no_plot_reason = plot_length_generalization(chosen, out_dir / PLOT_FILE, args.bucket)
    print(f"no plot: {no_plot_reason}" if no_plot_reason else f"wrote {out_dir / PLOT_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
