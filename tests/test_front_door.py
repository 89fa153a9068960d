"""The README as a front door that cannot go stale: its counts, model and task tables, flags table and rerun cost
are checked against the registries, main.py's parser and the committed runs; its links to the paper, the original
code and the works it compares with are there. And CI's entry point fails when no test is collected."""
import re
import subprocess
import sys
from pathlib import Path

import data
import main
from model import EXTENSION_MODELS, MODELS, PAPER_MODELS

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
sys.path.insert(0, str(REPO / "scripts"))
import results  # noqa: E402


def number_before(pattern):
    match = re.search(r"(\d+)" + pattern, README)
    assert match, f"the README does not say '<number>{pattern}'"
    return int(match.group(1))


def section(heading):
    start = README.index(f"## {heading}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end != -1 else None]


def test_the_counts_are_the_registries():
    assert len(PAPER_MODELS) == 7 and "the paper's seven" in README
    assert number_before(r" beyond it: DeltaNet") == len(EXTENSION_MODELS)
    assert number_before(r" `--model_type` IDs") == len(MODELS)
    assert len(data.TASKS) == 8 and "the paper's eight formal languages" in README
    assert number_before(r" group word problems beyond it") == len(data.GROUP_TASKS)
    assert number_before(r" tasks\.") == len(data.ALL_TASKS)


def test_the_models_table_lists_every_id_and_the_tasks_table_every_task():
    ids = {int(n) for row in re.findall(r"^\| ([\d, ]+) \|", section("Models"), re.M) for n in row.split(",")}
    assert ids == set(MODELS)
    tasks_section = section("Tasks")
    assert all(f"| {task}" in tasks_section or f" {task}," in tasks_section or f" {task} (" in tasks_section
               for task in data.ALL_TASKS), [t for t in data.ALL_TASKS if t not in tasks_section]


def test_the_flags_table_is_the_parser():
    table = set(re.findall(r"^\| `--(\w+)", section("Flags of `main.py`"), re.M))
    parser = {action.dest for action in main.build_parser()._actions if action.dest != "help"}
    assert table == parser


def test_the_rerun_cost_is_that_of_the_committed_runs():
    runs, hours = results.rerun_cost(results.collect_search(results.chosen_summaries(REPO / "results" / "search")))
    claim = f"{runs} runs, about {hours:.1f} CPU-hours"
    assert claim in README
    assert claim in (REPO / "docs" / "reproducing.md").read_text().replace("\n", " ")


def test_it_links_the_paper_the_original_code_and_the_works_it_compares_with():
    for address in ("https://arxiv.org/abs/2310.16076",   # Irie, Csordás & Schmidhuber (EMNLP 2023)
                    "https://github.com/IDSIA/fwp-formal-lang",
                    "https://arxiv.org/abs/2009.11264",   # Bhattamishra et al. (EMNLP 2020)
                    "https://arxiv.org/abs/2411.12537",   # Grazzi et al. (ICLR 2025)
                    "https://arxiv.org/abs/2502.10297",   # Siems et al. (2025)
                    "https://arxiv.org/abs/2404.08819"):  # Merrill et al. (ICML 2024)
        assert f"]({address})" in README, address


def test_ci_fails_when_no_test_is_collected(tmp_path):
    """.ci/run's test commands, run in a project whose tests folder is empty, must end non-zero (pytest says 5)."""
    commands = [line for line in (REPO / ".ci" / "run").read_text().splitlines()
                if "pytest" in line and "pip" not in line and not line.lstrip().startswith("#")]
    assert commands, ".ci/run runs no pytest"
    (tmp_path / "tests").mkdir()
    (tmp_path / "pytest.ini").write_text("[pytest]\ntestpaths = tests\n")
    script = "set -euo pipefail\n" + "\n".join(commands)
    assert subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True).returncode != 0
