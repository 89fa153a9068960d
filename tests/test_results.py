"""scripts/results.py: fixture run directories (tests/fixtures/run_dirs) into the exact table and a plot, and the
repository's hparams_searched.csv against its searches."""
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURE_RUNS = REPO_ROOT / "tests" / "fixtures" / "run_dirs"
# The repository's own results/search and results/paper_budget must not leak into the fixture tables.
NO_REPO_RESULTS = ["--search", str(REPO_ROOT / "tests" / "fixtures" / "no_such_search"),
                   "--paper_budget", str(REPO_ROOT / "tests" / "fixtures" / "no_such_paper_budget")]
sys.path.insert(0, str(REPO_ROOT / "scripts"))

import experiment  # noqa: E402
import results  # noqa: E402
from model import MODEL_SLUGS  # noqa: E402

# What the fixtures hold:
# - parity / LSTM, seed 1: finished, 100 / 100.
# - parity / Linear Transformer: seed 1 finished 60.26 / 10.04, seed 2 finished 58.07 / 19.99; seed 2 has the
#   higher mean. Accuracies are truncated: 19.99 -> 19.9.
# - reset_dyck / DeltaNet, seed 1: no final.json; the best metrics.jsonl row is the middle one (99.96 / 85.05),
#   not the last one (90 / 80).
# - reset_dyck / SRWM, seed 1: args.json and an empty metrics.jsonl: nothing to report, so `-`.
# - my-lang / e-LSTM: a task outside the paper's eight gets its own column after them.
EXPECTED_TABLE = """\
# Accuracy (%) of the best checkpoint: Bin0 / Bin1

| Model | parity | aa-star | abab-star | counter-2 | counter-3 | shuffle-2 | dyck-1 | reset_dyck | my-lang |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
| LSTM | 100.0 / 100.0 | - | - | - | - | - | - | - | - |
| e-LSTM | - | - | - | - | - | - | - | - | 100.0 / 50.0 |
| Transformer | - | - | - | - | - | - | - | - | - |
| Linear Transformer | 58.0 / 19.9 | - | - | - | - | - | - | - | - |
| DeltaNet | - | - | - | - | - | - | - | 99.9 / 85.0* | - |
| Recurrent Delta | - | - | - | - | - | - | - | - | - |
| SRWM | - | - | - | - | - | - | - | - | - |

- Sequence-level accuracy in percent, truncated to one decimal. Bin0: validation strings of the training \
lengths; Bin1: longer strings (main.py's `valid2`). `-`: not run. The best checkpoint is the evaluation with the \
highest mean of Bin0 and Bin1.
- `*`: the run has not finished (no final.json); its best evaluation so far in metrics.jsonl.
- Where a cell has several runs (seeds), it shows the one with the highest mean of Bin0 and Bin1 (see the run list).

## Runs (directories relative to this file)

| Task | Model | Seed | Runs | Status | Run directory |
| --- | --- | --- | --- | --- | --- |
| parity | LSTM | 1 | 1 | finished | runs/parity/lstm-seed1/lstm-parity-20240101-120000-a1b2c3 |
| parity | Linear Transformer | 2 | 2 | finished | \
runs/parity/linear-transformer-seed2/linear-transformer-parity-20240102-090000-0718aa |
| reset_dyck | DeltaNet | 1 | 1 | unfinished | \
runs/reset_dyck/deltanet-seed1/deltanet-reset_dyck-20240103-100000-bb99cc |
| my-lang | e-LSTM | 1 | 1 | finished | runs/my-lang/e-lstm-seed1/e-lstm-my-lang-20240104-080000-123abc |
"""


@pytest.fixture
def results_dir(tmp_path):
    """A results folder laid out like the repository's: the fixture runs copied to <tmp>/runs."""
    shutil.copytree(FIXTURE_RUNS, tmp_path / "runs")
    return tmp_path


def test_table_from_fixture_runs(results_dir):
    assert results.main(["--runs", str(results_dir / "runs"), "--out_dir", str(results_dir), *NO_REPO_RESULTS]) == 0
    assert (results_dir / "table.md").read_text() == EXPECTED_TABLE


def test_unreadable_run_is_skipped_with_a_warning(results_dir, capsys):
    broken = results_dir / "runs" / "parity" / "srwm-seed1" / "srwm-parity-20240105-000000-0badf0"
    broken.mkdir(parents=True)
    (broken / "args.json").write_text("{}")
    (broken / "final.json").write_text("{}")
    assert results.main(["--runs", str(results_dir / "runs"), "--out_dir", str(results_dir), *NO_REPO_RESULTS]) == 0
    assert (results_dir / "table.md").read_text() == EXPECTED_TABLE
    assert capsys.readouterr().err.startswith(f"warning: skipping {broken}: unreadable run files (KeyError")


def test_plot_is_written_for_tasks_with_per_length_results(results_dir):
    pytest.importorskip("matplotlib")
    results.main(["--runs", str(results_dir / "runs"), "--out_dir", str(results_dir), *NO_REPO_RESULTS])
    plot = results_dir / "length_generalization.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000


def test_only_finished_runs_with_lengths_get_a_panel(results_dir):
    chosen = results.choose(results.collect_runs(results_dir / "runs"))
    panels = [task for task in results.table_tasks(chosen)
              if any(t == task and run.by_length for (t, _), (run, _) in chosen.items())]
    assert panels == ["parity"]  # reset_dyck is unfinished, my-lang's run has no per-length results


def test_accuracy_by_length_pools_splits_into_buckets():
    by_length = {"valid": {"3": [1, 2], "9": [2, 2], "10": [0, 1]},
                 "test": {"12": [3, 3], "25": [0, 4]}}
    assert results.accuracy_by_length(by_length, bucket=10) == [(0, 75.0), (10, 75.0), (20, 0.0)]


def test_no_runs_gives_an_empty_table_and_no_plot(tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    assert results.main(["--runs", str(tmp_path / "runs"), "--out_dir", str(tmp_path), *NO_REPO_RESULTS]) == 0
    rows = [line for line in (tmp_path / "table.md").read_text().splitlines() if line.startswith("| ")][2:]
    assert [row.split(" | ")[0] for row in rows] == ["| LSTM", "| e-LSTM", "| Transformer", "| Linear Transformer",
                                                     "| DeltaNet", "| Recurrent Delta", "| SRWM"]
    assert all(row.split(" | ")[1:] == ["-"] * 7 + ["- |"] for row in rows)
    assert "## Runs" not in (tmp_path / "table.md").read_text()
    assert not (tmp_path / "length_generalization.png").exists()
    assert "no plot" in capsys.readouterr().out


def test_missing_runs_folder_is_one_line_error(tmp_path, capsys):
    assert results.main(["--runs", str(tmp_path / "nothing"), "--out_dir", str(tmp_path), *NO_REPO_RESULTS]) == 2
    assert capsys.readouterr().err == f"error: no run directory {tmp_path / 'nothing'}\n"


def test_an_extension_model_gets_a_row_only_when_it_has_runs(results_dir):
    source = next((results_dir / "runs" / "parity" / "lstm-seed1").iterdir())
    target = results_dir / "runs" / "parity" / "deltanet-neg-seed1" / source.name.replace("lstm", "deltanet-neg")
    shutil.copytree(source, target)
    args = json.loads((target / "args.json").read_text())
    (target / "args.json").write_text(json.dumps(dict(args, model_type=20)))
    assert results.main(["--runs", str(results_dir / "runs"), "--out_dir", str(results_dir), *NO_REPO_RESULTS]) == 0
    table = (results_dir / "table.md").read_text().split("## Runs")[0]
    rows = [line.split(" | ")[0] for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[-2:] == ["| SRWM", "| DeltaNet [-1,1]"]
    assert "DeltaNet L2" not in (results_dir / "table.md").read_text()


def test_hparams_searched_csv_holds_the_choice_of_every_searched_cell():
    """scripts/hparams_searched.csv (written by results.py) against each results/search/<task>/<model>/search.json:
    the best trial's hparams, the space's ff_factor and epoch cap, and the batch size its name carries (-b32; none:
    the grid's 64). Rerun `python scripts/results.py` when a search has moved on."""
    expected = {}
    for path in sorted((REPO_ROOT / "results" / "search").glob("*/*/search.json")):
        summary = json.loads(path.read_text())
        if not summary.get("best"):
            continue
        [best] = [trial for trial in summary["trials"] if trial["name"] == summary["best"]]
        hparams, space = best["hparams"], summary["space"]
        named_batch = re.search(r"-b(\d+)-seed", best["name"])
        batch_size = int(named_batch.group(1)) if named_batch else space["batch_size"]
        assert hparams.get("batch_size", batch_size) == batch_size, best["name"]
        expected[(summary["task"], summary["model_type"])] = experiment.HParams(
            num_layer=hparams["num_layer"], hidden_size=hparams["hidden_size"], n_head=hparams["n_head"],
            ff_factor=space["ff_factor"], batch_size=batch_size, learning_rate=hparams["learning_rate"],
            num_epoch=space["epoch_cap"])
    assert expected, "no search.json with a chosen configuration"
    assert experiment.read_hparams(REPO_ROOT / "scripts" / "hparams_searched.csv") == expected


def test_the_readme_grid_is_rewritten_from_the_table_and_the_committed_one_is_current(tmp_path):
    table = (results.REPO_ROOT / "results" / "table.md").read_text()
    readme = results.REPO_ROOT / "README.md"
    copy = tmp_path / "README.md"
    copy.write_text(readme.read_text().replace("| LSTM | 100.0", "| LSTM | 0.0"))
    assert results.update_readme_grid(copy, table)
    assert copy.read_text() == readme.read_text()  # the committed README shows the committed table
    for start, end, heading in results.README_GRIDS:  # the paper's grid and the group grid, each in its place
        grid = "\n".join(results.grid_lines(table, heading))
        assert grid and f"{start}\n{grid}\n{end}" in readme.read_text()
    assert results.grid_lines(table, results.GROUP_GRID_HEADING)[0].startswith("| Model | s3 |")
    (tmp_path / "other.md").write_text("no markers\n")
    assert not results.update_readme_grid(tmp_path / "other.md", table)


def write_sweep_run(root, task, model_type, seed, accuracies, stopped=None):
    """A run as sweep.py lays it out (the paper-budget runs, say): one end-of-epoch record per (Bin0, Bin1) in
    `accuracies`; final.json (the best record's accuracies) only when `stopped` says why it ended."""
    slug = MODEL_SLUGS[model_type]
    run_dir = root / task / f"{slug}-seed{seed}" / f"{slug}-{task}-20261201-120000-{seed:06d}"
    run_dir.mkdir(parents=True)
    (run_dir / "args.json").write_text(json.dumps({"data_dir": f"data/{task}", "model_type": model_type,
                                                   "seed": seed}))
    records = [{"epoch": epoch, "step": 10 * epoch, "end_of_epoch": True, "valid_acc": bin0, "valid2_acc": bin1}
               for epoch, (bin0, bin1) in enumerate(accuracies, start=1)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if stopped:
        best = max(records, key=lambda r: r["valid_acc"] + r["valid2_acc"])
        (run_dir / "final.json").write_text(json.dumps({"valid_acc": best["valid_acc"], "valid2_acc":
                                                        best["valid2_acc"], "stopped": stopped, "by_length": {}}))
    return run_dir


def test_the_paper_budget_runs_get_their_section_and_curves(results_dir):
    budget = results_dir / "paper_budget"
    write_sweep_run(budget, "counter-3", 12, 1, [(90.0, 40.0), (100.0, 99.5), (100.0, 99.0)], stopped="patience")
    write_sweep_run(budget, "counter-3", 12, 2, [(100.0, 100.0)], stopped="stop_acc")
    write_sweep_run(budget, "counter-3", 12, 3, [(99.0, 20.0), (100.0, 30.0)], stopped="num_epoch")
    write_sweep_run(budget, "reset_dyck", 2, 1, [(100.0, 80.0), (100.0, 88.96)])  # still running
    assert results.main(["--runs", str(results_dir / "runs"), *NO_REPO_RESULTS, "--paper_budget", str(budget),
                         "--out_dir", str(results_dir), "--searched_csv", str(results_dir / "searched.csv")]) == 0
    table = (results_dir / "table.md").read_text()
    assert table.startswith(EXPECTED_TABLE)  # the 40-epoch table as it was
    section = table[len(EXPECTED_TABLE):].splitlines()
    rows = [line for line in section if line.startswith("| counter-3") or line.startswith("| reset_dyck")]
    assert rows == [
        "| counter-3 | SRWM | - | 100.0 / 99.5 | 3 epochs, patience | 100.0 / 100.0 (1 epoch, stop_acc); "
        "100.0 / 30.0 (2 epochs, num_epoch) | 2/3 | "
        "paper_budget/counter-3/srwm-seed1/srwm-counter-3-20261201-120000-000001 |",
        "| reset_dyck | DeltaNet | - | 100.0 / 88.9* | 2 epochs, running | - | 0/1 | "
        "paper_budget/reset_dyck/deltanet-seed1/deltanet-reset_dyck-20261201-120000-000001 |"]
    assert (results_dir / results.CURVES_PLOT_FILE).stat().st_size > 10_000
    # Without paper-budget runs there is no section and no curves.
    (results_dir / results.CURVES_PLOT_FILE).unlink()
    assert results.main(["--runs", str(results_dir / "runs"), *NO_REPO_RESULTS,
                         "--out_dir", str(results_dir), "--searched_csv", str(results_dir / "searched.csv")]) == 0
    assert (results_dir / "table.md").read_text() == EXPECTED_TABLE
    assert not (results_dir / results.CURVES_PLOT_FILE).exists()


def test_waits_between_new_bests_count_only_higher_scores_above_zero():
    import best_waits
    scores = [(1, 0.0), (2, 10.0), (2, 20.0), (3, 20.0), (7, 30.0), (9, 25.0)]  # (epoch, mean of Bin0 and Bin1)
    records = [{"epoch": epoch, "valid_acc": score, "valid2_acc": score} for epoch, score in scores]
    assert best_waits.waits_between_new_bests(records) == [0, 5]


def test_group_tasks_get_a_grid_of_their_own_and_every_model_a_colour(results_dir):
    """s3 runs of the LSTM and of the five models beyond the paper (12 models with a run in all, more than one
    palette holds): a second grid with just those rows; the languages' grid and its rows as they were."""
    per_length = {"valid": {"10": [9, 10]}, "test": {"60": [5, 10]}}
    for model_type in (0, 20, 23, 24, 25, 26):
        run_dir = write_sweep_run(results_dir / "runs", "s3", model_type, 1, [(100.0, 50.0)], stopped="num_epoch")
        final = json.loads((run_dir / "final.json").read_text())
        (run_dir / "final.json").write_text(json.dumps({**final, "by_length": per_length}))
    assert results.main(["--runs", str(results_dir / "runs"), "--out_dir", str(results_dir), *NO_REPO_RESULTS]) == 0
    table = (results_dir / "table.md").read_text()
    grids = table.split("## Runs")[0]
    languages, groups = grids.split("## Beyond the paper: group word problems")
    assert languages.startswith(EXPECTED_TABLE.split("\n\n- Sequence")[0])  # same columns, same seven rows
    assert "| s3 |" in groups and [line.split(" | ")[0] for line in groups.splitlines() if line.startswith("| ")
                                   and "---" not in line][1:] == [
        "| LSTM", "| DeltaNet [-1,1]", "| DeltaProduct n2 [-1,1]", "| DeltaProduct n3 [-1,1]",
        "| DeltaProduct n4 [-1,1]", "| DeltaProduct n2 [0,1]"]
    assert "| DeltaProduct n2 [-1,1] | 100.0 / 50.0 |" in groups
    assert results.grid_lines(table) == [line for line in languages.splitlines() if line.startswith("|")]
    assert (results_dir / results.PLOT_FILE).stat().st_size > 10_000


def write_search_cell(root, task, model_type, learning_rate):
    """A search.json below `root` that has chosen one trial (no trial folders: hparams_searched.csv needs none)."""
    name = f"lr{learning_rate}-l1-h8-n1-seed1"
    summary = {"task": task, "model_type": model_type,
               "space": {"batch_size": 64, "ff_factor": 4, "epoch_cap": 2},
               "trials": [{"name": name, "hparams": {"learning_rate": learning_rate, "num_layer": 1, "hidden_size": 8,
                                                     "n_head": 1}}],
               "best": name, "seeds": []}
    folder = root / task / MODEL_SLUGS[model_type]
    folder.mkdir(parents=True)
    (folder / "search.json").write_text(json.dumps(summary))


@pytest.fixture
def fake_repository(tmp_path, monkeypatch):
    """results.py's REPO_ROOT as a copy of the repository's outputs: results/{runs,search,paper_budget}, results/
    table.md, scripts/hparams_searched.csv and README.md, each with something results.py would change."""
    repo = tmp_path / "repo"
    shutil.copytree(FIXTURE_RUNS, repo / "results" / "runs")
    write_search_cell(repo / "results" / "search", "parity", 0, "1e-3")
    write_sweep_run(repo / "results" / "paper_budget", "counter-3", 12, 1, [(90.0, 40.0)], stopped="num_epoch")
    (repo / "results" / "table.md").write_text("the committed table\n")
    (repo / "scripts").mkdir()
    (repo / "scripts" / "hparams_searched.csv").write_text("the committed csv\n")
    (repo / "README.md").write_text(f"{results.README_GRID_START}\n| old grid |\n{results.README_GRID_END}\n")
    monkeypatch.setattr(results, "REPO_ROOT", repo)
    return repo


def repository_files(repo):
    return {path: path.read_bytes() for path in sorted(repo.rglob("*")) if path.is_file()}


def test_other_folders_make_a_table_of_their_own_and_leave_the_repository_alone(fake_repository, results_dir):
    write_search_cell(results_dir / "search", "parity", 2, "3e-3")
    before = repository_files(fake_repository)
    out_dir = results_dir  # beside the fake repository, not in it
    assert results.main(["--runs", str(results_dir / "runs"), "--search", str(results_dir / "search"),
                         "--out_dir", str(out_dir)]) == 0
    assert repository_files(fake_repository) == before  # no table, csv or README grid written there
    # Its table has only what the flags name: not the repository's paper-budget runs (no section, no curves).
    assert (out_dir / "table.md").read_text() == EXPECTED_TABLE
    assert not (out_dir / results.CURVES_PLOT_FILE).exists()
    assert list(experiment.read_hparams(out_dir / "hparams_searched.csv")) == [("parity", 2)]


def test_without_flags_the_repository_results_are_read_and_its_files_written(fake_repository):
    assert results.main([]) == 0
    table = (fake_repository / "results" / "table.md").read_text()
    assert table.startswith(EXPECTED_TABLE.split("\n\n- Sequence")[0])
    assert "## The paper's budget" in table and (fake_repository / "results" / results.CURVES_PLOT_FILE).is_file()
    assert list(experiment.read_hparams(fake_repository / "scripts" / "hparams_searched.csv")) == [("parity", 0)]
    assert "| old grid |" not in (fake_repository / "README.md").read_text()


def test_a_corrupt_metrics_line_is_reported_and_a_line_being_written_is_not(tmp_path, capsys):
    records = [{"epoch": 1, "valid_acc": 50.0, "valid2_acc": 10.0}, {"epoch": 2, "valid_acc": 60.0, "valid2_acc": 20.0}]
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(records[0]) + "\n" + '{"epoch": 2, "valid_a\n' + json.dumps(records[1]) + "\n"
                    + '{"epoch": 3, "val')
    assert experiment.read_metrics(tmp_path) == records
    [warning] = capsys.readouterr().err.splitlines()  # line 4, still being written, is no warning
    assert warning.startswith(f"warning: {path} line 2: not a JSON record, skipped (Unterminated string")
