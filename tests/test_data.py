"""Tests of data.py: the eight generated datasets against an independent reading of the spec, and the loader.

The language and target checks below are written from docs/data.md without using data.py's own
sampling or target code: membership by regular expressions and bracket reduction, targets from what each prefix
allows next.
"""
import functools
import inspect
import multiprocessing
import os
import re
import subprocess
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from random import Random

import pytest
import torch

import data
import digests

REPO = Path(data.__file__).resolve().parent
GENERATED_SPLITS = ("train", "valid", "test")

# ------------------------------------------------------------------------------------ independent oracles

def reduces_to(word, pairs, rest_pattern):
    """Delete adjacent open-close pairs until none is left; True if what remains matches rest_pattern."""
    adjacent = [opener + closer for opener, closer in pairs]
    while any(pair in word for pair in adjacent):
        for pair in adjacent:
            word = word.replace(pair, "")
    return re.fullmatch(rest_pattern, word) is not None


def is_dyck(word, pairs):
    return reduces_to(word, pairs, "")


def is_dyck_prefix(word, pairs):
    return reduces_to(word, pairs, "[" + re.escape("".join(opener for opener, _ in pairs)) + "]*")


def is_shuffle(word):
    return all(is_dyck("".join(c for c in word if c in pair), [pair]) for pair in ("()", "[]"))


def reset_dyck_parts(word):
    """(prefix before the reset, Dyck word after it) of a reset_dyck member, else None."""
    match = re.fullmatch(r"([()]*)1([()]*)", word)
    if match and is_dyck_prefix(match[1], ["()"]) and is_dyck(match[2], ["()"]):
        return match[1], match[2]
    return None


def counter_n(word, letters):
    """n if word is a^n b^n (c^n) with n >= 1, else None."""
    match = re.fullmatch("".join(f"({letter}+)" for letter in letters), word)
    if match and len({len(group) for group in match.groups()}) == 1:
        return len(match[1])
    return None


MEMBERSHIP = {
    "parity": lambda w: re.fullmatch("[01]+", w) is not None and w.count("1") % 2 == 0,
    "aa-star": lambda w: re.fullmatch("(?:aa)+", w) is not None,
    "abab-star": lambda w: re.fullmatch("(?:abab)+", w) is not None,
    "counter-2": lambda w: counter_n(w, "ab") is not None,
    "counter-3": lambda w: counter_n(w, "abc") is not None,
    "shuffle-2": lambda w: re.fullmatch(r"[()\[\]]+", w) is not None and is_shuffle(w),
    "dyck-1": lambda w: re.fullmatch(r"[()]+", w) is not None and is_dyck(w, ["()"]),
    "reset_dyck": lambda w: reset_dyck_parts(w) is not None,
}


@functools.lru_cache(maxsize=None)
def counter_prefixes(letters, max_n):
    """Members a^m b^m (c^m), m <= max_n, and the set of all their non-empty prefixes."""
    members = {"".join(letter * m for letter in letters) for m in range(1, max_n + 1)}
    prefixes = {member[:end] for member in members for end in range(1, len(member) + 1)}
    return members, prefixes


def counter_targets(word, letters):
    """At each prefix, the symbols that can follow within the language (END: the prefix is a member)."""
    members, prefixes = counter_prefixes(letters, len(word) // len(letters) + 1)
    tokens = []
    for end in range(1, len(word) + 1):
        prefix = word[:end]
        allowed = [letter for letter in letters if prefix + letter in prefixes]
        assert not (allowed and prefix in members)
        tokens.append("/".join(allowed) if allowed else "END")
    return tokens


def closers_allowed(segment, pairs):
    """Closing brackets that may follow a valid bracket prefix: those of pairs with unmatched openers."""
    return "".join(closer for opener, closer in pairs if segment.count(opener) > segment.count(closer)) or "-"


def expected_targets(task, word):
    prefixes = [word[:end] for end in range(1, len(word) + 1)]
    if task in ("parity", "aa-star", "abab-star"):
        return ["acc" if MEMBERSHIP[task](prefix) else "rej" for prefix in prefixes]
    if task in ("counter-2", "counter-3"):
        return counter_targets(word, "ab" if task == "counter-2" else "abc")
    if task == "reset_dyck":   # the count restarts after the reset symbol
        return [closers_allowed(prefix.rsplit("1", 1)[-1], ["()"]) for prefix in prefixes]
    pairs = ["()", "[]"] if task == "shuffle-2" else ["()"]
    return [closers_allowed(prefix, pairs) for prefix in prefixes]


# Spec section 4.3, converted examples.
SPEC_EXAMPLES = [
    ("parity", "0110", "acc rej acc acc"),
    ("parity", "11011", "rej acc acc rej acc"),
    ("aa-star", "aaaaaa", "rej acc rej acc rej acc"),
    ("abab-star", "abababab", "rej rej rej acc rej rej rej acc"),
    ("counter-2", "aaabbb", "a/b a/b a/b b b END"),
    ("counter-2", "ab", "a/b END"),
    ("counter-3", "aabbcc", "a/b a/b b c c END"),
    ("counter-3", "abc", "a/b c END"),
    ("shuffle-2", "([])[]", ") )] ) - ] -"),
    ("dyck-1", "(()())()", ") ) ) ) ) - ) -"),
    ("reset_dyck", "(()1()", ") ) ) - ) -"),
    ("reset_dyck", "((1(())", ") ) - ) ) ) -"),
]

# ------------------------------------------------------------------------------- expected sizes and windows
# Finite languages: the de-duplicated bins hold every string of the window, ordered by length.
EXACT = {
    "aa-star": {"valid": range(1, 26), "test": range(26, 51), "bin2": range(51, 76)},
    "abab-star": {"valid": range(1, 13), "test": range(13, 26), "bin2": range(26, 38)},
    "counter-2": {"valid": range(1, 51), "test": range(51, 101), "bin2": range(101, 151)},
    "counter-3": {"valid": range(1, 51), "test": range(51, 101), "bin2": range(101, 151)},
}
EXACT_WORD = {"aa-star": lambda k: "aa" * k, "abab-star": lambda k: "abab" * k,
              "counter-2": lambda n: "a" * n + "b" * n, "counter-3": lambda n: "a" * n + "b" * n + "c" * n}
# Sampled languages: (shortest, longest) length; for reset_dyck (shortest, bound on each Dyck part).
WINDOWS = {
    "parity": {"train": (2, 50), "valid": (2, 50), "test": (51, 100), "bin2": (101, 150)},
    "shuffle-2": {"train": (2, 50), "valid": (2, 50), "test": (52, 100), "bin2": (102, 150)},
    "dyck-1": {"train": (2, 50), "valid": (2, 50), "test": (52, 100), "bin2": (102, 150)},
    "reset_dyck": {"train": (2, 50), "valid": (2, 50), "test": (51, 100), "bin2": (101, 150)},
}


def expected_size(task, split):
    if split == "train":
        return 10000
    return len(EXACT[task][split]) if task in EXACT else 2000


def check_split(task, split, words, tgt_lines):
    """Size, window, membership and per-position targets of one split."""
    assert len(words) == len(tgt_lines) == expected_size(task, split)
    for word, tgt in set(zip(words, tgt_lines)):
        assert MEMBERSHIP[task](word), (task, split, word)
        assert tgt.split(" ") == expected_targets(task, word), (task, split, word)
    if task in EXACT:
        everything = [EXACT_WORD[task](k) for k in EXACT[task]["valid" if split == "train" else split]]
        if split == "train":
            assert set(words) == set(everything)
        else:
            assert words == everything
        return
    # Both ends of the window are reached (valid of a joint split lacks the shortest words, see the spec).
    shortest, longest = WINDOWS[task][split]
    if task == "reset_dyck":   # longest bounds each Dyck part, as the length of a word the prefix came from
        parts = [reset_dyck_parts(word) for word in words]
        sizes = [max(len(prefix) + prefix.count("(") - prefix.count(")"), len(suffix)) for prefix, suffix in parts]
        assert max(sizes) == longest
    else:
        assert max(map(len, words)) == longest
    assert min(map(len, words)) >= shortest
    if split != "valid":
        assert min(map(len, words)) == shortest


# ----------------------------------------------------------------------------------------------- fixtures

def read_lines(path):
    text = path.read_text()
    return text[:-1].split("\n") if text else []


def read_words(task_dir, split):
    """(input words, tgt lines) of a written split; a word is the src line without its separators."""
    src = read_lines(task_dir / f"{split}_50.src")
    return ["".join(line.split(" ")) for line in src], read_lines(task_dir / f"{split}_50.tgt")


# The grammar languages take most of the generation time (rejection sampling of long strings): started first.
SLOWEST_TASKS_FIRST = sorted(data.TASKS, key=lambda task: task not in ("shuffle-2", "reset_dyck", "dyck-1"))


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The two folders below, written at the same time (about a minute of CPU in all): the CLI in one process, the
    bins=3 tasks in two worker processes."""
    generated, with_bins = tmp_path_factory.mktemp("generated"), tmp_path_factory.mktemp("bins")
    cli = subprocess.Popen([sys.executable, str(REPO / "data.py"), "--task", "all", "--out_dir", str(generated)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as workers:
        for writing in [workers.submit(data.write_task, task, with_bins / task, seed=1, bins=3)
                        for task in SLOWEST_TASKS_FIRST]:
            writing.result()
    _, stderr = cli.communicate(timeout=300)
    assert cli.returncode == 0, stderr
    return generated, with_bins


@pytest.fixture(scope="module")
def generated(written):
    """All eight tasks written once through the CLI with the default seed: the folder holding <task>/."""
    return written[0]


@pytest.fixture(scope="module")
def with_bins(written):
    """All eight tasks written by write_task with seed 1 and bins=3 (what `python data.py --task all --bins 3`
    writes): the folder holding <task>/."""
    return written[1]


# ------------------------------------------------------------------------------------------ generation

@pytest.mark.parametrize("task, word, tgt", SPEC_EXAMPLES)
def test_oracle_reproduces_spec_examples(task, word, tgt):
    assert MEMBERSHIP[task](word)
    assert " ".join(expected_targets(task, word)) == tgt


@pytest.mark.parametrize("task", data.TASKS)
def test_generated_splits_match_spec(generated, task):
    for split in GENERATED_SPLITS:
        check_split(task, split, *read_words(generated / task, split))


@pytest.mark.parametrize("task", data.TASKS)
def test_file_format(generated, task):
    files = sorted((generated / task).iterdir())
    assert [f.name for f in files] == [f"{s}_50.{e}" for s in ("test", "train", "valid") for e in ("src", "tgt")]
    for split in GENERATED_SPLITS:
        src_text = (generated / task / f"{split}_50.src").read_text()
        tgt_text = (generated / task / f"{split}_50.tgt").read_text()
        for text in (src_text, tgt_text):
            assert text.endswith("\n") and not text.startswith("\n") and "\n\n" not in text
            assert "  " not in text and " \n" not in text and "\n " not in text
        for src_line, tgt_line in zip(read_lines(generated / task / f"{split}_50.src"),
                                      read_lines(generated / task / f"{split}_50.tgt")):
            assert all(len(token) == 1 for token in src_line.split(" "))
            assert len(src_line.split(" ")) == len(tgt_line.split(" "))


def test_construction_modes(generated):
    """Joint split (parity, reset_dyck), separate draws (dyck-1, shuffle-2), de-duplicated finite bins."""
    train, _ = read_words(generated / "reset_dyck", "train")
    valid, _ = read_words(generated / "reset_dyck", "valid")
    assert len(set(train)) == 10000 and len(set(valid)) == 2000 and not set(train) & set(valid)
    for task in ("dyck-1", "shuffle-2"):
        train, _ = read_words(generated / task, "train")
        valid, _ = read_words(generated / task, "valid")
        assert len(set(train)) == 10000 and len(set(valid)) == 2000
        assert len(set(train) & set(valid)) > 100   # drawn apart, so they share common short words
    # parity: uniqueness is checked on the raw draw, before the parity fix-up appends a 1, so repeats occur
    # (about 14% of train), but only of fixed-up words; one joint corpus means this holds across train+valid.
    train, _ = read_words(generated / "parity", "train")
    valid, _ = read_words(generated / "parity", "valid")
    assert 8000 < len(set(train)) < 9500
    repeated = [word for word, count in Counter(train + valid).items() if count > 1]
    assert repeated and all(word.endswith("1") and word[:-1].count("1") % 2 == 1 for word in repeated)
    for task in EXACT:
        train, _ = read_words(generated / task, "train")
        assert len(set(train)) == len(EXACT[task]["valid"])


def test_shuffle_inputs_are_nested(generated):
    """The Shuffle sampler is the Dyck-2 grammar: crossings like ([)] never occur."""
    for split in GENERATED_SPLITS:
        words, _ = read_words(generated / "shuffle-2", split)
        assert all(is_dyck(word, ["()", "[]"]) for word in words)
        assert any("[" in word for word in words) and any("(" in word for word in words)


@pytest.mark.parametrize("task", data.TASKS)
def test_extra_bins(generated, with_bins, task):
    """Extra bins add a genuinely longer bin2 and leave train/valid/test byte-identical (same seed)."""
    for split in GENERATED_SPLITS:
        for suffix in ("src", "tgt"):
            name = f"{split}_50.{suffix}"
            assert (with_bins / task / name).read_bytes() == (generated / task / name).read_bytes()
    check_split(task, "bin2", *read_words(with_bins / task, "bin2"))


# sha256 of every file of the seed-1 datasets with three bins, as `sha256sum */*` prints them in a folder written by
# `python data.py --task all --out_dir DIR --bins 3` (`sha256sum -c` checks such a folder against it). The committed
# results were trained and evaluated on exactly these bytes: a change of any sampler, target or file format must
# show up here, not silently in new runs.


def test_generated_files_are_the_bytes_the_committed_results_used(with_bins):
    assert digests.written(with_bins) == digests.recorded(digests.DATA_SHA256)


@pytest.mark.parametrize("task", ["parity", "aa-star", "counter-3", "dyck-1"])   # one per construction mode
def test_other_seed_gives_other_data(generated, task):
    other = data.generate_task(task, seed=2)
    assert set(other) == set(GENERATED_SPLITS)
    ours = read_lines(generated / task / "train_50.src")
    assert other["train"][0] != ours
    for split in GENERATED_SPLITS:
        check_split(task, split, ["".join(line.split(" ")) for line in other[split][0]], other[split][1])


def test_generate_task_keys_for_bins():
    assert list(data.generate_task("aa-star", bins=4)) == ["train", "valid", "test", "bin2", "bin3", "bin4"]
    with pytest.raises(ValueError):
        data.generate_task("aa-star", bins=0)
    with pytest.raises(ValueError):
        data.generate_task("no-such-task")


def recursive_dyck(rng, pairs, max_size, current_size=0):
    """satwik's recursive DyckLanguage.generate with the draw order data.py promises (rule, pair, left, right)."""
    if current_size >= max_size:
        return ""
    u = rng.random()
    if u < 0.5:
        opener, closer = pairs[int(rng.random() * len(pairs))] if len(pairs) > 1 else pairs[0]
        word = opener + recursive_dyck(rng, pairs, max_size, current_size + 2) + closer
    elif u < 0.75:
        word = recursive_dyck(rng, pairs, max_size, current_size) + recursive_dyck(rng, pairs, max_size,
                                                                                  current_size)
    else:
        return ""
    return word if len(word) <= max_size else ""


@pytest.mark.parametrize("pairs", [("()",), ("()", "[]")])
@pytest.mark.parametrize("max_size", [2, 7, 50, 100])
def test_dyck_sampler_matches_recursive_grammar(pairs, max_size):
    ours, reference = Random(3), Random(3)
    words = [data._dyck_word(ours, pairs, max_size) for _ in range(500)]
    assert words == [recursive_dyck(reference, pairs, max_size) for _ in range(500)]
    assert any(len(word) > max_size // 2 for word in words) and all(len(word) <= max_size for word in words)


def test_dyck_sampler_needs_no_recursion():
    """Nesting far deeper than the allowed Python stack: the sampler must not recurse."""
    limit = sys.getrecursionlimit()
    rng = Random(0)
    sys.setrecursionlimit(len(inspect.stack()) + 15)
    try:
        words = [data._dyck_word(rng, ("()",), 400) for _ in range(300)]
    finally:
        sys.setrecursionlimit(limit)
    deepest = max(max(w[:end].count("(") - w[:end].count(")") for end in range(len(w) + 1)) for w in words)
    assert deepest > 20   # a recursive sampler would need at least this many nested calls


# ---------------------------------------------------------------------------------------------- loader

def write_dir(folder, files):
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        if isinstance(content, bytes):
            (folder / name).write_bytes(content)
        else:
            (folder / name).write_text(content)
    return folder


SMALL = {   # satwik-style spelling: any tokens must load
    "train_50.src": "( ) (\n( (\n",
    "train_50.tgt": "1 0 1\n1 1\n",
    "valid_50.src": ") (\n",
    "valid_50.tgt": "0 0\n",
    "test_50.src": "(\n( ( ) )\n",
    "test_50.tgt": "1\n1 1 1 0\n",
}


def test_loader_small_round_trip(tmp_path):
    loaded = data.load_data(write_dir(tmp_path, SMALL))
    assert loaded.src_vocab == ["(", ")"] and loaded.tgt_vocab == ["1", "0"]
    assert loaded.src_pad == 2 and loaded.tgt_pad == 2
    assert list(loaded.splits) == ["train", "valid", "test"]
    train, test = loaded.splits["train"], loaded.splits["test"]
    assert [t.tolist() for t in train.batch(torch.arange(2))] == [[[0, 1, 0], [0, 0, 2]], [[0, 1, 0], [0, 0, 2]]]
    assert [t.tolist() for t in test.batch(torch.arange(2))] == [[[0, 2, 2, 2], [0, 0, 1, 1]],
                                                                 [[0, 2, 2, 2], [0, 0, 0, 1]]]
    assert [t.tolist() for t in test.batch(torch.tensor([0]))] == [[[0]], [[0]]]   # trimmed to the batch
    assert torch.equal(test.lengths, torch.tensor([1, 4]))
    assert len(loaded.splits["valid"]) == 1
    src, tgt, length = test[0]
    assert src.tolist() == [0] and tgt.tolist() == [0] and int(length) == 1
    src, tgt, length = test[1]
    assert src.tolist() == [0, 0, 1, 1] and tgt.tolist() == [0, 0, 0, 1] and int(length) == 4
    assert all(t.dtype == torch.long and t.device.type == "cpu" for s in loaded.splits.values()
               for t in (*s.batch(torch.arange(len(s))), s.lengths, *s[0][:2]))


def test_a_long_line_costs_its_own_length(tmp_path):
    """The ids are stored flat, one byte each for a small vocabulary: 100 lines and one of 100000 tokens take
    about 100000 bytes per side, where a table padded to the longest line would take 8 * 101 * 100000."""
    files = dict(SMALL, **{"train_50.src": "( )\n" * 100 + "( " * 99999 + ")\n",
                           "train_50.tgt": "1 0\n" * 100 + "1 " * 99999 + "0\n"})
    train = data.load_data(write_dir(tmp_path, files)).splits["train"]
    stored = sum(t.numel() * t.element_size() for t in (train.src_ids, train.tgt_ids, train.offsets, train.lengths))
    assert stored < 2 * (100200 + 16 * 101)
    src, tgt = train.batch(torch.tensor([3, 100, 7]))
    assert src.tolist() == [[0, 1] + [2] * 99998, [0] * 99999 + [1], [0, 1] + [2] * 99998]
    assert tgt[1].tolist() == [0] * 99999 + [1] and tgt.dtype == torch.long



PEAK_RSS_LIMIT = 2 << 30


def test_peak_memory_of_a_full_train_file_plus_one_very_long_line(tmp_path):
    """10000 training lines of 2 to 50 tokens plus one of 100000: padded to the longest line, the splits took about
    16 GB; stored flat they add megabytes to what Python and torch need anyway. Peak RSS of a process that loads
    them (ru_maxrss, in KiB on Linux)."""
    rng = Random(0)
    lines = [" ".join(rng.choice("01") for _ in range(rng.randint(2, 50))) for _ in range(data.TRAIN_SIZE)]
    lines.append(" ".join("1" for _ in range(100000)))
    folder = write_dir(tmp_path, {
        "train_50.src": "".join(line + "\n" for line in lines),
        "train_50.tgt": "".join(line.replace("1", "b").replace("0", "a") + "\n" for line in lines),
        "valid_50.src": "0 1\n", "valid_50.tgt": "a b\n", "test_50.src": "1 1 0\n", "test_50.tgt": "b b a\n"})
    script = ("import resource, sys, data\nloaded = data.load_data(sys.argv[1])\n"
              "print(len(loaded.splits['train']), int(loaded.splits['train'].lengths.max()),"
              " resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    result = subprocess.run([sys.executable, "-c", script, str(folder)], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    num_lines, longest, peak_kib = map(int, result.stdout.split())
    assert (num_lines, longest) == (data.TRAIN_SIZE + 1, 100000)
    assert peak_kib * 1024 < PEAK_RSS_LIMIT, f"peak RSS {peak_kib / 2 ** 20:.2f} GiB"

@pytest.mark.parametrize("task", data.TASKS)
def test_loader_round_trip_generated(generated, task):
    loaded = data.load_data(generated / task)
    train_src = [line.split(" ") for line in read_lines(generated / task / "train_50.src")]
    train_tgt = [line.split(" ") for line in read_lines(generated / task / "train_50.tgt")]
    src_vocab, tgt_vocab = [], []
    for vocab, lines in ((src_vocab, train_src), (tgt_vocab, train_tgt)):
        for token in (token for line in lines for token in line):
            if token not in vocab:
                vocab.append(token)
    assert loaded.src_vocab == src_vocab and loaded.tgt_vocab == tgt_vocab
    assert list(loaded.splits) == list(GENERATED_SPLITS)
    for split in GENERATED_SPLITS:
        rows = {}
        for suffix, vocab in (("src", src_vocab), ("tgt", tgt_vocab)):
            lines = [line.split(" ") for line in read_lines(generated / task / f"{split}_50.{suffix}")]
            width = max(map(len, lines))
            ids = {token: index for index, token in enumerate(vocab)}
            rows[suffix] = [[ids[t] for t in line] + [len(vocab)] * (width - len(line)) for line in lines]
        got = loaded.splits[split]
        src, tgt = got.batch(torch.arange(len(got)))
        assert torch.equal(src, torch.tensor(rows["src"])) and torch.equal(tgt, torch.tensor(rows["tgt"]))
        assert got.lengths.tolist() == [len(line.split(" ")) for line in read_lines(generated / task /
                                                                                    f"{split}_50.src")]


def test_loader_finds_bins_in_order(tmp_path):
    out = tmp_path / "aa-star"
    data.write_task("aa-star", out, bins=11)
    loaded = data.load_data(out)
    assert list(loaded.splits) == ["train", "valid", "test"] + [f"bin{k}" for k in range(2, 12)]
    assert int(loaded.splits["bin11"].lengths.min()) == 552
    assert int(loaded.splits["bin2"].lengths.max()) == 150 and len(loaded.splits["bin2"]) == 25


def broken(files_change):
    files = dict(SMALL)
    files.update(files_change)
    return files


# (files to change (None: delete), file named in the message, words the message must contain)
LOADER_ERRORS = {
    "missing file": ({"valid_50.tgt": None}, "valid_50.tgt", ["python data.py --task TASK --out_dir"]),
    "empty training file": ({"train_50.src": "", "train_50.tgt": ""}, "train_50.src", ["empty"]),
    "line-count mismatch": ({"test_50.tgt": "1\n"}, "test_50.tgt", ["1 lines", "has 2"]),
    "token-count mismatch": ({"test_50.tgt": "1\n1 1 1\n"}, "test_50.tgt", ["line 2", "3 tokens"]),
    "unknown src token": ({"valid_50.src": ") [\n"}, "valid_50.src", ["line 1", "'['", "train_50.src"]),
    "unknown tgt token": ({"test_50.tgt": "1\n1 1 2 0\n"}, "test_50.tgt", ["line 2", "'2'", "train_50.tgt"]),
    "empty line": ({"train_50.src": "( ) (\n\n( (\n", "train_50.tgt": "1 0 1\n\n1 1\n"}, "train_50.src",
                   ["line 2", "empty line"]),
    "empty line before the last": ({"test_50.src": "(\n\n( ( ) )\n"}, "test_50.src", ["line 2", "empty line"]),
    "blank line of spaces": ({"valid_50.tgt": " \t\n"}, "valid_50.tgt", ["file is empty"]),
    "bin without partner": ({"bin2_50.src": "( (\n"}, "bin2_50.tgt", ["no such file"]),
    "not text": ({"train_50.tgt": b"1 0 \xff\n1 1\n"}, "train_50.tgt", ["UTF-8"]),
    # The offset counts the byte-order mark: it is the byte to look at in a hex editor.
    "not text after a byte-order mark": ({"train_50.tgt": b"\xef\xbb\xbf1 0 \xff\n1 1\n"}, "train_50.tgt",
                                         ["UTF-8", "(byte 7)"]),
}


@pytest.mark.parametrize("case", list(LOADER_ERRORS))
def test_loader_errors(tmp_path, case):
    change, culprit, words = LOADER_ERRORS[case]
    folder = write_dir(tmp_path, {k: v for k, v in broken(change).items() if v is not None})
    with pytest.raises(data.DataError) as error:
        data.load_data(folder)
    message = str(error.value)
    assert "\n" not in message and str(folder / culprit) in message
    assert all(word in message for word in words), message


def test_missing_file_names_the_task(tmp_path):
    with pytest.raises(data.DataError, match=r"python data\.py --task dyck-1 --out_dir .*dyck-1"):
        data.load_data(tmp_path / "dyck-1")


def test_missing_file_of_another_level_does_not_suggest_data_py(tmp_path):
    folder = write_dir(tmp_path / "dyck-1", SMALL)   # level-50 files only
    with pytest.raises(data.DataError) as error:
        data.load_data(folder, level=500)
    message = str(error.value)
    assert str(folder / "train_500.src") in message and "python data.py" not in message, message
    assert "only level-50" in message and "level 500 needs its own" in message and "\n" not in message


@pytest.mark.parametrize("tail", ["\n", "\n\n", "\n\n\n", "\n \n", "\r\n\r\n"])
def test_blank_lines_at_the_end_are_ignored(tmp_path, tail):
    files = {name: text.rstrip("\n") + tail for name, text in SMALL.items()}
    loaded = data.load_data(write_dir(tmp_path, files))
    assert [len(split) for split in loaded.splits.values()] == [2, 1, 2]


def assert_same_data(a, b):
    assert a.src_vocab == b.src_vocab and a.tgt_vocab == b.tgt_vocab
    assert list(a.splits) == list(b.splits)
    for name in a.splits:
        for field in ("src_ids", "tgt_ids", "offsets", "lengths"):
            assert torch.equal(getattr(a.splits[name], field), getattr(b.splits[name], field)), (name, field)


@pytest.mark.parametrize("name", list(SMALL))
def test_a_byte_order_mark_at_the_start_of_a_file_is_dropped(tmp_path, name):
    """A file saved by Windows Notepad starts with the UTF-8 byte-order mark EF BB BF; kept, it would become part
    of the first token (a new vocabulary entry in a training file, an unknown token elsewhere)."""
    files = dict(SMALL, **{name: b"\xef\xbb\xbf" + SMALL[name].encode()})
    with_bom = data.load_data(write_dir(tmp_path / "with_bom", files))
    assert_same_data(with_bom, data.load_data(write_dir(tmp_path / "without", SMALL)))


def test_a_byte_order_mark_inside_a_file_stays_in_its_token(tmp_path):
    """Only the first character of a file can be a byte-order mark; U+FEFF anywhere else is data."""
    loaded = data.load_data(write_dir(tmp_path, broken({"train_50.src": "( ) (\n\ufeff( (\n"})))
    assert loaded.src_vocab == ["(", ")", "\ufeff("]


# ------------------------------------------------------------------------------------------ writing safely

def test_generation_failing_midway_leaves_no_folder(tmp_path, monkeypatch):
    written = []

    def failing_write(path, lines):
        if len(written) == 3:
            raise RuntimeError("killed")
        written.append(path)
        path.write_text("\n".join(lines))

    monkeypatch.setattr(data, "_write_lines", failing_write)
    with pytest.raises(RuntimeError, match="killed"):
        data.write_task("aa-star", tmp_path / "aa-star")
    assert list(tmp_path.iterdir()) == []   # neither the folder nor its staging copy


KILLED_WRITER = """
import os, sys
sys.path.insert(0, {repo!r})
import data
real_write, count = data._write_lines, []
def write_then_die(path, lines):
    if len(count) == 3:
        os._exit(9)   # as SIGKILL: no clean-up runs
    count.append(path)
    real_write(path, lines)
data._write_lines = write_then_die
data.write_task("aa-star", {out!r})
"""


def test_killed_generation_leaves_no_partial_folder(tmp_path):
    out = tmp_path / "aa-star"
    result = subprocess.run([sys.executable, "-c", KILLED_WRITER.format(repo=str(REPO), out=str(out))],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 9, result.stderr
    assert not out.exists() and data.needs_generation(out)
    assert all(path.name.startswith(".aa-star.partial-") for path in tmp_path.iterdir())   # hidden leftovers
    data.write_task("aa-star", out)
    assert sorted(path.name for path in out.iterdir()) == sorted(f"{s}_50.{x}" for s in GENERATED_SPLITS
                                                                 for x in ("src", "tgt"))


def test_empty_folder_needs_generation_and_is_filled(tmp_path):
    out = tmp_path / "counter-2"
    assert data.needs_generation(out)
    out.mkdir()   # what an interrupted older version left
    assert data.needs_generation(out)
    data.write_task("counter-2", out)
    assert not data.needs_generation(out)
    assert len(data.load_data(out).splits["train"]) == data.TRAIN_SIZE
    assert [path.name for path in tmp_path.iterdir()] == ["counter-2"]


def test_writing_into_a_folder_with_other_files_keeps_them(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "train_50.src").write_text("old\n")
    data.write_task("counter-2", tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert len(read_lines(tmp_path / "train_50.src")) == data.TRAIN_SIZE
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]


@pytest.mark.parametrize("case", ["under a file", "read-only"])
def test_unwritable_output_is_a_one_line_data_error(tmp_path, case):
    if case == "under a file":
        (tmp_path / "blocker").write_text("")
        out = tmp_path / "blocker" / "parity"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        (tmp_path / "ro").mkdir(mode=0o555)
        out = tmp_path / "ro" / "parity"
    with pytest.raises(data.DataError) as error:
        data.write_task("parity", out)
    message = str(error.value)
    assert message.startswith(f"{out}: cannot write the dataset") and "\n" not in message, message
    result = run_cli("--task", "parity", "--out_dir", out)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and str(out) in result.stderr


# ------------------------------------------------------------------------------------------------- CLI

def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, str(REPO / "data.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=120, cwd=cwd)


@pytest.mark.parametrize("args", [
    ("--task", "no-such-task", "--out_dir", "x"),
    ("--task", "parity"),
    ("--task", "parity", "--out_dir", "x", "--bins", "0"),
    ("--task", "parity", "--out_dir", "x", "--seed", "one"),
    ("--check", "x", "--seed", "2"),
    (),
])
def test_cli_usage_errors(tmp_path, args):
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "error" in result.stderr
    assert not (tmp_path / "x").exists()


def test_cli_check(generated, tmp_path, capsys):
    assert data.main(["--check", str(generated / "counter-2")]) == 0
    summary = capsys.readouterr().out
    assert "train: 10000 lines, 50 distinct, lengths 2-100" in summary
    assert "test: 50 lines, 50 distinct, lengths 102-200" in summary
    write_dir(tmp_path, broken({"valid_50.src": ") [\n"}))
    assert data.main(["--check", str(tmp_path)]) == 2   # a data error exits like a usage error
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "valid_50.src, line 1" in err


# -- other length windows (--train_lengths / --test_lengths; Grazzi et al.'s parity split) ----------------------

def lengths(lines):
    return [len(line.split()) for line in lines]


def parity_targets(src_line):
    tokens, ones = [], 0
    for bit in src_line.split():
        ones += bit == "1"
        tokens.append("rej" if ones % 2 else "acc")
    return " ".join(tokens)


@pytest.fixture(scope="module")
def grazzi_split():
    return data.generate_task("parity", seed=1, train_lengths=(3, 40), test_lengths=(40, 256))


def test_windows_bound_the_lengths(grazzi_split):
    assert {name: len(src) for name, (src, _) in grazzi_split.items()} == {"train": 10000, "valid": 2000,
                                                                          "test": 2000}
    for name, (low, high) in (("train", (3, 40)), ("valid", (3, 40)), ("test", (40, 256))):
        found = lengths(grazzi_split[name][0])
        assert low <= min(found) and max(found) <= high, name
        assert max(found) >= high - 1 and min(found) <= low + 2, name   # the window is used end to end
    assert sum(n > 200 for n in lengths(grazzi_split["test"][0])) > 100


def test_window_targets_are_prefix_parities(grazzi_split):
    for name, (src, tgt) in grazzi_split.items():
        for src_line, tgt_line in zip(src, tgt, strict=True):
            assert tgt_line == parity_targets(src_line), name


def test_default_windows_give_the_paper_files():
    """The option only replaces the windows: given the defaults explicitly, it writes the paper's files."""
    assert data.generate_task("parity", seed=3, train_lengths=(2, 50), test_lengths=(51, 100)) == \
        data.generate_task("parity", seed=3)
    explicit_train = data.generate_task("dyck-1", seed=1, train_lengths=(2, 50))
    assert explicit_train == data.generate_task("dyck-1", seed=1)


def test_window_cli(tmp_path, capsys):
    out = tmp_path / "parity_grazzi"
    assert data.main(["--task", "parity", "--out_dir", str(out), "--train_lengths", "3", "40",
                      "--test_lengths", "40", "256"]) == 0
    assert (out / "test_50.src").read_text().splitlines() == \
        data.generate_task("parity", train_lengths=(3, 40), test_lengths=(40, 256))["test"][0]
    bad_flags = (["--train_lengths", "5", "3"], ["--test_lengths", "0", "9"],
                 ["--bins", "2", "--test_lengths", "3", "9"])
    for bad in bad_flags:
        with pytest.raises(SystemExit) as exit_info:
            data.main(["--task", "parity", "--out_dir", str(tmp_path / "x"), *bad])
        assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        data.main(["--check", str(out), "--train_lengths", "3", "40"])
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("task,windows", [("abab-star", {"train_lengths": (1, 3)}),
                                          ("dyck-1", {"train_lengths": (1, 1)}),
                                          ("aa-star", {"test_lengths": (51, 51)})])
def test_a_window_without_enough_strings_is_an_error_not_a_hang(task, windows):
    with pytest.raises(data.DataError, match="too few strings"):
        data.generate_task(task, **windows)
