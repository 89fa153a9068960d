"""Tests of data.py's group tasks s3, a4, s4, a5 and s5 against an independent reading of their definition.

An element of S_n is the arrangement (g[0], ..., g[n-1]) of 0..n-1, written as one token of n digits; token g turns
the state s into s' with s'[i] = s[g[i]], starting from the identity 0..n-1, and the target at each position is
the state after that token. The checks below compute that product on the token strings themselves and find the even
permutations by counting cycles, without data.py's group tables or targets.
"""
import functools
import itertools
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import data
import digests

REPO = Path(data.__file__).resolve().parent
SPLITS = ("train", "valid", "test", "bin2", "bin3")
SIZES = {"train": 10000, "valid": 2000, "test": 2000, "bin2": 2000, "bin3": 2000}
WINDOWS = {"train": (2, 50), "valid": (2, 50), "test": (51, 100), "bin2": (101, 150), "bin3": (151, 200)}
# task: (n, even permutations only)
GROUPS = {"s3": (3, False), "a4": (4, True), "s4": (4, False), "a5": (5, True), "s5": (5, False)}


# ------------------------------------------------------------------------------------ independent oracles

def apply(state, g):
    """The state after token g: s'[i] = s[g[i]], on the digit strings."""
    return "".join(state[int(digit)] for digit in g)


@functools.lru_cache(maxsize=None)
def applied(state, g):
    return apply(state, g)


def is_even(g):
    """A permutation is even when n minus its number of cycles is even."""
    seen, cycles = set(), 0
    for start in range(len(g)):
        if start not in seen:
            cycles += 1
            position = start
            while position not in seen:
                seen.add(position)
                position = int(g[position])
    return (len(g) - cycles) % 2 == 0


def group_elements(task):
    n, even_only = GROUPS[task]
    elements = {"".join(map(str, p)) for p in itertools.permutations(range(n))}
    return {g for g in elements if is_even(g)} if even_only else elements


def expected_states(tokens):
    state, states = "".join(map(str, range(len(tokens[0])))), []
    for g in tokens:
        state = applied(state, g)
        states.append(state)
    return states


def read_lines(path):
    return path.read_text().splitlines()


# ----------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def with_bins(tmp_path_factory):
    """The group tasks written by write_task with seed 1 and bins=3 (what `python data.py --task T --out_dir DIR/T
    --bins 3` writes): the folder holding <task>/."""
    out = tmp_path_factory.mktemp("groups")
    for task in data.GROUP_TASKS:
        data.write_task(task, out / task, seed=1, bins=3)
    return out


# ---------------------------------------------------------------------------------------------- the tests

def test_oracle_examples():
    assert apply("01234", "10234") == "10234"              # swaps 0 and 1
    assert apply("10234", "12340") == "02341"              # then rotates left
    assert apply("012", "012") == "012"
    assert {task: len(group_elements(task)) for task in GROUPS} == {"s3": 6, "a4": 12, "s4": 24, "a5": 60, "s5": 120}
    assert is_even("01234") and not is_even("10234") and is_even("12034") and not is_even("1230")


def test_task_lists():
    """TASKS stays the paper's eight (--task all, the scripts' defaults); ALL_TASKS adds the group tasks, smallest
    group first; each list is the registry's entries of one family."""
    assert data.TASKS == ("parity", "aa-star", "abab-star", "counter-2", "counter-3", "shuffle-2", "dyck-1",
                          "reset_dyck")
    assert data.GROUP_TASKS == ("s3", "a4", "s4", "a5", "s5") and data.ALL_TASKS == data.TASKS + data.GROUP_TASKS
    assert {data.TASK_REGISTRY[name].family for name in data.TASKS} == {data.PAPER}
    assert {data.TASK_REGISTRY[name].family for name in data.GROUP_TASKS} == {data.GROUP_WORD_PROBLEMS}


@pytest.mark.parametrize("task", data.GROUP_TASKS)
def test_targets_are_the_running_product(with_bins, task):
    for split in SPLITS:
        src = read_lines(with_bins / task / f"{split}_50.src")
        tgt = read_lines(with_bins / task / f"{split}_50.tgt")
        assert len(src) == len(tgt) == SIZES[split]
        for src_line, tgt_line in zip(src, tgt):
            assert tgt_line.split(" ") == expected_states(src_line.split(" ")), (task, split, src_line)


@pytest.mark.parametrize("task", data.GROUP_TASKS)
def test_inputs_are_uniform_elements_of_the_group(with_bins, task):
    elements = group_elements(task)
    for split in SPLITS:
        tokens = [line.split(" ") for line in read_lines(with_bins / task / f"{split}_50.src")]
        assert set(itertools.chain.from_iterable(tokens)) == elements, (task, split)   # every element, no other
    states = {token for line in read_lines(with_bins / task / "train_50.tgt") for token in line.split(" ")}
    assert states == elements   # every state occurs in train: no test or bin token is unknown to the loader
    # About 260k uniform draws in train: each element within 15% of its share (over 5 standard deviations for s5).
    counts = Counter(token for line in read_lines(with_bins / task / "train_50.src") for token in line.split(" "))
    share = sum(counts.values()) / len(elements)
    assert all(abs(count - share) < 0.15 * share for count in counts.values()), counts


@pytest.mark.parametrize("task", data.GROUP_TASKS)
def test_lengths_per_split(with_bins, task):
    for split in SPLITS:
        lengths = [len(line.split(" ")) for line in read_lines(with_bins / task / f"{split}_50.src")]
        assert len(lengths) == SIZES[split]
        assert (min(lengths), max(lengths)) == WINDOWS[split], (task, split)


def test_loader_accepts_every_split(with_bins):
    """s5, the largest vocabulary: all 120 elements and states occur in train, so the bins load."""
    loaded = data.load_data(with_bins / "s5")
    assert list(loaded.splits) == list(SPLITS)
    assert set(loaded.src_vocab) == set(loaded.tgt_vocab) == group_elements("s5")
    assert [len(split) for split in loaded.splits.values()] == [SIZES[split] for split in SPLITS]


def test_cli_writes_the_six_files(with_bins, tmp_path):
    """The CLI in its own process writes the same bytes as write_task (same seed); --bins adds files only."""
    out = tmp_path / "s5"
    result = subprocess.run([sys.executable, str(REPO / "data.py"), "--task", "s5", "--out_dir", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    names = sorted(path.name for path in out.iterdir())
    assert names == sorted(f"{split}_50.{suffix}" for split in ("train", "valid", "test") for suffix in ("src", "tgt"))
    for name in names:
        assert (out / name).read_bytes() == (with_bins / "s5" / name).read_bytes(), name


def test_other_seed_gives_other_data(with_bins):
    other = data.generate_task("s3", seed=2)
    assert list(other) == ["train", "valid", "test"]
    for split, (src_lines, tgt_lines) in other.items():
        assert src_lines != read_lines(with_bins / "s3" / f"{split}_50.src")
        assert len(src_lines) == SIZES[split]
        for src_line, tgt_line in zip(src_lines, tgt_lines):
            assert tgt_line.split(" ") == expected_states(src_line.split(" "))


def test_other_length_windows():
    splits = data.generate_task("a5", seed=3, train_lengths=(1, 3), test_lengths=(7, 8))
    for split, window in (("train", (1, 3)), ("valid", (1, 3)), ("test", (7, 8))):
        lengths = {len(line.split(" ")) for line in splits[split][0]}
        assert lengths == set(range(window[0], window[1] + 1)), split
        for src_line, tgt_line in zip(*splits[split]):
            assert tgt_line.split(" ") == expected_states(src_line.split(" "))


def test_missing_folder_names_the_group_task(tmp_path):
    with pytest.raises(data.DataError, match=r"python data\.py --task s5 --out_dir .*s5"):
        data.load_data(tmp_path / "s5")


# sha256 of every file of the seed-1 group datasets with three bins, as `sha256sum */*` prints them in a folder DIR
# written by `for t in s3 a4 s4 a5 s5; do python data.py --task $t --out_dir DIR/$t --bins 3; done` (`sha256sum -c`
# checks such a folder against it): a change of the sampler, the targets or the format must show up here.
GROUP_SHA256 = Path(__file__).resolve().parent / "fixtures" / "group_data_sha256.txt"


def test_generated_files_have_the_recorded_bytes(with_bins):
    assert digests.written(with_bins) == digests.recorded(GROUP_SHA256)
