"""The eight formal-language tasks of the paper (Bhattamishra et al., 2020 samplers), five permutation-group
state-tracking tasks (s3, a4, s4, a5, s5), their registry (TASK_REGISTRY), generators and the six-file loader.

Generation follows docs/data.md (the "paper settings" of satwik77/Transformer-Formal-Languages) and
writes IDSIA's format: `{train,valid,test}_50.{src,tgt}`, one space-separated example per line, one target token
per input token. valid is satwik's Bin0 (training lengths), test is Bin1 (longer strings); `--bins K` adds Bin2..BinK
as `bin{k}_50.*`. Every draw comes from one private `random.Random(seed)` per task, so the files are the same
bytes on every machine.

The group tasks (not in the paper) use the same format, splits and bins: the input is a sequence of uniformly drawn
elements of S3, A4, S4, A5 or S5, each one token in one-line notation (`10234` swaps 0 and 1), and the target at each
position is the product so far, the state s' with s'[i] = s[g[i]] after token g, starting from the identity.

    python data.py --task TASK|all --out_dir DIR [--seed N] [--bins K]   # all: the paper's eight
    python data.py --task parity --out_dir DIR --train_lengths 3 40 --test_lengths 40 256   # other windows
    python data.py --check DIR

Exit status 0, or 2 with one line on stderr for a usage error or a data error (as main.py).
"""
import argparse
import functools
import itertools
import os
import re
import secrets
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from random import Random

LEVEL = 50          # IDSIA's fixed `--level`: the `_50` in the file names, not a length
TRAIN_SIZE = 10000
BIN_SIZE = 2000     # draws per validation bin (before de-duplication for the finite languages)
LEN_INCR = 50       # width of each length bin after Bin0
P_WRAP = 0.5        # Dyck grammar: S -> pair(S) with p, S -> S S with q, S -> empty otherwise
Q_CONCAT = 0.25
SPLIT_NAMES = ("train", "valid", "test")


class DataError(Exception):
    """A data file that cannot be used; the message is one line naming the file (and line) at fault."""


# ------------------------------------------------------------------------------------------------- samplers

# The paper's windows need at most about 15 draws per kept string (the bracket languages reject short draws). A
# window that holds too few strings for a split (e.g. --train_lengths 1 1 for dyck-1) would make the rejection
# loops below run forever, so they give up after this many draws per string wanted.
DRAWS_PER_STRING = 200


def _count_draw(draws, num):
    """draws + 1; DataError once the draws exceed the budget for `num` strings."""
    if draws >= DRAWS_PER_STRING * max(num, 1):
        raise DataError(f"{draws} random draws gave fewer than {num} usable strings: the length window holds too "
                        f"few strings of this language (choose a wider window)")
    return draws + 1

def _parity_string(rng, upper, symbol_prob):
    """Append 0 or 1 (each with `symbol_prob`) until the stop symbol is drawn or the length reaches `upper`."""
    chars = []
    while len(chars) < upper:
        u = rng.random()
        if u < symbol_prob:
            chars.append("0")
        elif u < 2 * symbol_prob:
            chars.append("1")
        else:
            break
    return "".join(chars)


def _parity_list(rng, num, lower, upper):
    """satwik's ParityLanguage.generate_list, quirks included.

    The duplicate check looks at the raw draw, not at the string kept after the parity fix-up, so the list
    can hold repeats (about 14% of a training set).
    """
    mean_length = (lower + upper) // 2
    symbol_prob = mean_length / (2 * (1 + mean_length))   # stop probability 1 / (mean_length + 1)
    kept, seen, draws = [], set(), 0
    while len(kept) < num:
        draws = _count_draw(draws, num)
        raw = _parity_string(rng, upper, symbol_prob)
        if raw in seen or not lower <= len(raw) <= upper:
            continue
        word = raw if raw.count("1") % 2 == 0 else raw + "1"
        if len(word) <= upper:
            kept.append(word)
            seen.add(word)
    return kept


def _repeated_unit(rng, lower, upper, unit):
    """(aa)* and (abab)*: m uniform on [lower, upper], `unit` repeated m // len(unit) times; None if outside."""
    word = unit * (rng.randint(lower, upper) // len(unit))
    return word if lower <= len(word) <= upper else None


def _counter_word(rng, lower, upper, letters):
    """a^n b^n (c^n) with n uniform on [lower, upper]: the window bounds n, not the length."""
    n = rng.randint(lower, upper)
    return "".join(letter * n for letter in letters)


# Work items of the explicit-stack Dyck sampler: a value >= 0 expands S at that current_size; _CONCAT joins the
# two latest results; _WRAP - j wraps the latest result in pair j.
_CONCAT = -1
_WRAP = -2


def _dyck_word(rng, pairs, max_size):
    """One draw of satwik's DyckLanguage.generate(0, max_size) with no depth limit.

    S -> open S close (prob P_WRAP, pair uniform among `pairs`, inner S at current_size + 2) | S S (Q_CONCAT,
    both at the same current_size) | empty; S at current_size >= max_size is empty. A subtree longer than
    max_size collapses to the empty string. The grammar is evaluated with an explicit stack, not recursion, so
    no sample can hit Python's recursion limit; random numbers are drawn in the order of the recursive
    definition (rule, then pair, then the left subtree before the right one).
    """
    random = rng.random
    num_pairs = len(pairs)
    todo = [0]
    results = []
    pop, push = todo.pop, results.append
    while todo:
        item = pop()
        if item >= 0:
            # Descend the leftmost path of a fresh subtree right away; the pending right halves and the
            # combine steps wait on the stack.
            while True:
                u = random()
                if u < P_WRAP:
                    pair_index = int(random() * num_pairs) if num_pairs > 1 else 0
                    if item + 2 >= max_size:
                        push(pairs[pair_index])   # the inner S is empty
                        break
                    todo.append(_WRAP - pair_index)
                    item += 2
                elif u < P_WRAP + Q_CONCAT:
                    todo += (_CONCAT, item)
                else:
                    push("")
                    break
        elif item == _CONCAT:
            right = results.pop()
            word = results.pop() + right
            push(word if len(word) <= max_size else "")
        else:
            pair = pairs[_WRAP - item]
            word = pair[0] + results.pop() + pair[1]
            push(word if len(word) <= max_size else "")
    return results[0]


def _reset_dyck_word(rng, max_size):
    """A random prefix of one Dyck-1 word, the reset symbol 1, then a whole second Dyck-1 word."""
    first = _dyck_word(rng, ("()",), max_size)
    second = _dyck_word(rng, ("()",), max_size)
    return first[:rng.randint(0, len(first))] + "1" + second


def _unique_list(draw, num, lower):
    """satwik's generate_list for the grammar languages: keep new draws of length >= lower until `num` kept."""
    kept, seen, draws = [], set(), 0
    while len(kept) < num:
        draws = _count_draw(draws, num)
        word = draw()
        if len(word) >= lower and word not in seen:
            seen.add(word)
            kept.append(word)
    return kept


def _draws_with_replacement(draw, num):
    """Draws of a finite language, repeats allowed; rejected draws (None) are retried."""
    kept, draws = [], 0
    while len(kept) < num:
        draws = _count_draw(draws, num)
        word = draw()
        if word is not None:
            kept.append(word)
    return kept


def _deduplicated(words):
    """A Python set in a reproducible order: by length, then lexicographically."""
    return sorted(set(words), key=lambda word: (len(word), word))


# -------------------------------------------------------------------------------------------------- targets
# Readable spelling of spec section 4.3: acc/rej for prefix membership, the allowed next symbols for the
# counters, the closing brackets allowed next (or -) for the bracket languages.

def _parity_targets(word):
    tokens, odd = [], False
    for char in word:
        odd ^= char == "1"
        tokens.append("rej" if odd else "acc")
    return tokens


def _block_targets(word, block):
    """(aa)* and (abab)*: a prefix is accepted exactly at block boundaries."""
    return ["acc" if (position + 1) % block == 0 else "rej" for position in range(len(word))]


def _counter_targets(word, letters):
    n = len(word) // len(letters)
    tokens = [f"{letters[0]}/{letters[1]}"] * n
    for index in range(1, len(letters)):
        follower = letters[index + 1] if index + 1 < len(letters) else "END"
        tokens += [letters[index]] * (n - 1) + [follower]
    return tokens


def _closer_targets(word, pairs):
    """Shuffle semantics (Dyck-1 being the one-pair case): closer j may follow while pair j has more openers
    than closers so far; the token lists those closers in pair order, or is - for none."""
    step = {}
    for index, (opener, closer) in enumerate(pairs):
        step[opener] = (index, 1)
        step[closer] = (index, -1)
    depth = [0] * len(pairs)
    tokens = []
    for char in word:
        index, change = step[char]
        depth[index] += change
        tokens.append("".join(closer for (_, closer), open_count in zip(pairs, depth) if open_count > 0) or "-")
    return tokens


def _reset_dyck_targets(word):
    tokens, depth = [], 0
    for char in word:
        depth = 0 if char == "1" else depth + (1 if char == "(" else -1)
        tokens.append(")" if depth > 0 else "-")
    return tokens


# --------------------------------------------------------------------------------------------- group tasks
# An element g of S_n (n <= 10) is the arrangement (g[0], ..., g[n-1]) of 0..n-1, written as one token of n digits.
# Token g turns the state s into s' with s'[i] = s[g[i]]; the state starts at the identity 0..n-1, so after
# g1 ... gt it is the composition g1 o ... o gt (i -> g1[g2[...gt[i]]]).

def _is_even(permutation):
    inversions = sum(a > b for a, b in itertools.combinations(permutation, 2))
    return inversions % 2 == 0


@functools.lru_cache(maxsize=None)
def _group(n, even_only):
    """(tokens, id of each token, product table): the elements of S_n (A_n if even_only) in lexicographic order,
    the identity first; table[s * size + g] is the id of the state after token g in state s."""
    elements = [p for p in itertools.permutations(range(n)) if not even_only or _is_even(p)]
    ids = {element: index for index, element in enumerate(elements)}
    table = [ids[tuple(s[i] for i in g)] for s in elements for g in elements]
    tokens = ["".join(map(str, element)) for element in elements]
    return tokens, {token: index for index, token in enumerate(tokens)}, table


def _group_sampler(n, even_only):
    """Sampler of a group task: `num` words of uniform length in [lower, upper], each a list of uniformly drawn
    element tokens; repeats are kept (see docs/data.md)."""
    def sample(rng, num, lower, upper):
        tokens = _group(n, even_only)[0]
        return [rng.choices(tokens, k=rng.randint(lower, upper)) for _ in range(num)]
    return sample


def _group_targets(n, even_only):
    """Targets of a group task: the state after each token, as its token."""
    def targets(word):
        tokens, ids, table = _group(n, even_only)
        size, state, states = len(tokens), 0, []
        for token in word:
            state = table[state * size + ids[token]]
            states.append(tokens[state])
        return states
    return targets


# ---------------------------------------------------------------------------------------------------- tasks

# The families of the task registry: which table a task's results land in and which tasks a default list holds.
PAPER, GROUP_WORD_PROBLEMS = "paper", "group"


@dataclass(frozen=True)
class Task:
    """One entry of the task registry: how a language is sampled and labelled, and where it belongs.

    family: PAPER (the paper's eight: `--task all`, the scripts' default task list, the main table's columns) or
    GROUP_WORD_PROBLEMS (beyond the paper: the group table's columns).
    mode: "joint" (one unique corpus split into train and valid), "separate" (train and valid drawn apart,
    each unique), "replacement" (draws with repeats; validation bins de-duplicated), "uniform" (train and valid
    drawn apart, repeats kept everywhere: the group tasks).
    sample(rng, num, lower, upper) -> list of words; targets(word) -> list of tokens. A word is a string of
    one-character tokens, or (group tasks) a list of tokens.
    window(k) is Bin k's [lower, upper]: [bin0_lower, LEN_INCR] for k = 0 (train and valid), else
    [k*LEN_INCR + bin_gap, (k+1)*LEN_INCR]. It bounds the length, except for the counters (it bounds n) and the
    grammar languages (upper is the grammar's max_size; reset_dyck strings can reach 2*upper + 1).
    """
    name: str
    family: str
    mode: str
    sample: object
    targets: object
    bin0_lower: int = 2
    bin_gap: int = 1

    def window(self, bin_index):
        if bin_index == 0:
            return self.bin0_lower, LEN_INCR
        return bin_index * LEN_INCR + self.bin_gap, (bin_index + 1) * LEN_INCR


def _finite(draw, **fixed):
    """Sampler of a finite language: `num` draws with repeats."""
    return lambda rng, num, lower, upper: _draws_with_replacement(lambda: draw(rng, lower, upper, **fixed), num)


def _grammar(draw):
    """Sampler of a grammar language: `num` distinct draws of length >= lower, upper bounding the grammar."""
    return lambda rng, num, lower, upper: _unique_list(lambda: draw(rng, upper), num, lower)


# The registry, in table order: adding a task is one entry here (and its sampler and targets above).
TASK_REGISTRY = {task.name: task for task in (
    Task("parity", PAPER, "joint", _parity_list, _parity_targets),
    Task("aa-star", PAPER, "replacement", _finite(_repeated_unit, unit="aa"), lambda w: _block_targets(w, 2)),
    Task("abab-star", PAPER, "replacement", _finite(_repeated_unit, unit="abab"), lambda w: _block_targets(w, 4)),
    Task("counter-2", PAPER, "replacement", _finite(_counter_word, letters="ab"),
         lambda w: _counter_targets(w, "ab"), bin0_lower=1),
    Task("counter-3", PAPER, "replacement", _finite(_counter_word, letters="abc"),
         lambda w: _counter_targets(w, "abc"), bin0_lower=1),
    Task("shuffle-2", PAPER, "separate", _grammar(lambda rng, upper: _dyck_word(rng, ("()", "[]"), upper)),
         lambda w: _closer_targets(w, ("()", "[]")), bin_gap=2),
    Task("dyck-1", PAPER, "separate", _grammar(lambda rng, upper: _dyck_word(rng, ("()",), upper)),
         lambda w: _closer_targets(w, ("()",)), bin_gap=2),
    Task("reset_dyck", PAPER, "joint", _grammar(_reset_dyck_word), _reset_dyck_targets),
    # Group word problems, smallest group first: S3 (6 elements), A4 (12), S4 (24), A5 (60), S5 (120).
    Task("s3", GROUP_WORD_PROBLEMS, "uniform", _group_sampler(3, False), _group_targets(3, False)),
    Task("a4", GROUP_WORD_PROBLEMS, "uniform", _group_sampler(4, True), _group_targets(4, True)),
    Task("s4", GROUP_WORD_PROBLEMS, "uniform", _group_sampler(4, False), _group_targets(4, False)),
    Task("a5", GROUP_WORD_PROBLEMS, "uniform", _group_sampler(5, True), _group_targets(5, True)),
    Task("s5", GROUP_WORD_PROBLEMS, "uniform", _group_sampler(5, False), _group_targets(5, False)),
)}


def task_names(family=None):
    """The registered task names of `family` (all of them for None), in registry order."""
    return tuple(name for name, task in TASK_REGISTRY.items() if family in (None, task.family))


# TASKS: the paper's eight; GROUP_TASKS: the group word problems; ALL_TASKS: everything generate_task can write.
TASKS, GROUP_TASKS, ALL_TASKS = task_names(PAPER), task_names(GROUP_WORD_PROBLEMS), task_names()


def _bin_words(task, rng, bin_index, window=None):
    lower, upper = window or task.window(bin_index)
    words = task.sample(rng, BIN_SIZE, lower, upper)
    return _deduplicated(words) if task.mode == "replacement" else words


def _split_words(task, rng, bins, train_window=None, test_window=None):
    """Words per split, drawn in a fixed order (train, valid, test, bin2, ...) so --bins leaves the first three
    splits unchanged. train_window / test_window replace Bin0's (train and valid) and Bin1's (test) windows."""
    lower, upper = train_window or task.window(0)
    if task.mode == "joint":
        corpus = task.sample(rng, TRAIN_SIZE + BIN_SIZE, lower, upper)
        splits = {"train": corpus[:TRAIN_SIZE], "valid": corpus[TRAIN_SIZE:]}
    else:
        splits = {"train": task.sample(rng, TRAIN_SIZE, lower, upper),
                  "valid": _bin_words(task, rng, 0, train_window)}
    splits["test"] = _bin_words(task, rng, 1, test_window)
    for bin_index in range(2, bins + 1):
        splits[f"bin{bin_index}"] = _bin_words(task, rng, bin_index)
    return splits


def window_error(train_lengths=None, test_lengths=None, bins=1):
    """Why these length windows cannot be used (one line), or None. A window is (lower, upper), 1 <= lower <= upper;
    it replaces Bin0's (train and valid) or Bin1's (test) window and means what the task's bins mean (the string
    length for parity and the group tasks; n for the counters; the grammar bound for the bracket languages)."""
    for flag, window in (("--train_lengths", train_lengths), ("--test_lengths", test_lengths)):
        if window is not None and not (len(window) == 2 and 1 <= window[0] <= window[1]):
            return f"{flag} needs two lengths LOWER UPPER with 1 <= LOWER <= UPPER, got {list(window)}"
    if bins > 1 and (train_lengths or test_lengths):
        return "--bins > 1 cannot be combined with --train_lengths/--test_lengths (bin windows would overlap)"
    return None


def generate_task(task, seed=1, bins=1, train_lengths=None, test_lengths=None):
    """{split: (src_lines, tgt_lines)} for train, valid, test and bin2..bin{bins}; lines are space-joined tokens.

    train_lengths / test_lengths, (lower, upper) or None, replace the default windows (see window_error); with
    neither, the files are those of the paper's setting, byte for byte."""
    if task not in TASK_REGISTRY:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASK_REGISTRY)}")
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    error = window_error(train_lengths, test_lengths, bins)
    if error:
        raise ValueError(error)
    spec = TASK_REGISTRY[task]
    splits = _split_words(spec, Random(seed), bins, train_lengths and tuple(train_lengths),
                          test_lengths and tuple(test_lengths))
    return {name: ([" ".join(word) for word in words], [" ".join(spec.targets(word)) for word in words])
            for name, words in splits.items()}


def needs_generation(path):
    """True when `path` does not exist or is an empty folder (what an interrupted generation of an older version
    left): whoever generates data on demand should write the task there."""
    path = Path(path)
    if not path.exists():
        return True
    return path.is_dir() and not any(path.iterdir())


def write_task(task, out_dir, seed=1, bins=1, train_lengths=None, test_lengths=None):
    """Write out_dir/{train,valid,test}_50.{src,tgt} (and bin{k}_50.*), each line ending in a newline.

    The files are written into a hidden sibling folder first, which then replaces a missing or empty out_dir in one
    rename, so a generation killed halfway leaves no partial dataset. Into an existing non-empty folder each file
    is moved over its old version (also by rename). DataError, one line naming the folder, when it cannot be
    written (read-only, under a file, disk full).
    """
    out_dir = Path(out_dir)
    splits = generate_task(task, seed, bins, train_lengths, test_lengths)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
        staging.mkdir()
        try:
            names = []
            for name, (src_lines, tgt_lines) in splits.items():
                for suffix, lines in (("src", src_lines), ("tgt", tgt_lines)):
                    names.append(f"{name}_{LEVEL}.{suffix}")
                    _write_lines(staging / names[-1], lines)
            try:
                os.rename(staging, out_dir)   # atomic; replaces out_dir when it is missing or empty
                return
            except OSError:
                if not out_dir.is_dir():
                    raise
            for file_name in names:   # out_dir holds other files: replace ours one by one
                os.replace(staging / file_name, out_dir / file_name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as error:
        reason = error.strerror or str(error)
        where = f" ({error.filename})" if error.filename and Path(error.filename) != out_dir else ""
        raise DataError(f"{out_dir}: cannot write the dataset: {reason}{where}") from None


def _write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


# --------------------------------------------------------------------------------------------------- loader

@dataclass
class Split:
    """One split, stored flat so that a line costs its own length, not the split's longest (docs/data.md#loading).

    Line i is src_ids[offsets[i]:offsets[i] + lengths[i]] (tgt_ids alike), in the smallest integer dtype that
    holds the vocabulary and its pad id; batch() pads a batch of lines to its own longest one, as int64."""
    src_ids: "torch.Tensor"
    tgt_ids: "torch.Tensor"
    offsets: "torch.Tensor"
    lengths: "torch.Tensor"
    src_pad: int
    tgt_pad: int

    def __len__(self):
        return self.lengths.shape[0]

    def __getitem__(self, index):
        """(src, tgt, length) of line `index`, unpadded, src and tgt as int64."""
        start, length = int(self.offsets[index]), int(self.lengths[index])
        return (self.src_ids[start:start + length].long(), self.tgt_ids[start:start + length].long(),
                self.lengths[index])

    def batch(self, indices):
        """(src, tgt): int64 (B, L) tensors of the lines `indices` (a tensor on the split's device), L their
        longest length, each line followed by pad ids: what a padded table trimmed to the batch would hold."""
        import torch
        lengths = self.lengths[indices]
        columns = torch.arange(int(lengths.max()), device=lengths.device)
        mask = columns < lengths[:, None]
        positions = (self.offsets[indices, None] + columns)[mask]
        tables = []
        for ids, pad in ((self.src_ids, self.src_pad), (self.tgt_ids, self.tgt_pad)):
            table = torch.full(mask.shape, pad, dtype=torch.long, device=lengths.device)
            table[mask] = ids[positions].long()
            tables.append(table)
        return tuple(tables)


@dataclass
class FormalLanguageData:
    """Vocabularies of the training files (id = position, pad id = vocabulary size) and the encoded splits."""
    src_vocab: list
    tgt_vocab: list
    splits: dict

    @property
    def src_pad(self):
        return len(self.src_vocab)

    @property
    def tgt_pad(self):
        return len(self.tgt_vocab)


def _read_lines(path, missing_hint):
    """Token lists of a data file; the file must exist, be non-empty and have no empty line before its end.

    A UTF-8 byte-order mark at the start of the file (Windows Notepad writes one) is dropped: it marks the encoding
    and is not part of the first token. U+FEFF anywhere else is left in its token."""
    if not path.is_file():
        raise DataError(f"{path}: no such file; {missing_hint}")
    try:
        # Decoded as plain UTF-8 and removed afterwards (not "utf-8-sig"), so that the byte offset of a decoding
        # error still counts from the start of the file.
        text = path.read_text(encoding="utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text (byte {error.start})") from None
    token_lists = [line.split() for line in text.split("\n")]
    while token_lists and not token_lists[-1]:   # the final newline, and blank lines after the last example
        token_lists.pop()
    if not token_lists:
        raise DataError(f"{path}: file is empty")
    for number, tokens in enumerate(token_lists, 1):
        if not tokens:
            raise DataError(f"{path}, line {number}: empty line")
    return token_lists


def _missing_hint(data_dir, level):
    """How to get a missing data file: data.py for level 50; other levels are never generated here."""
    task = data_dir.name if data_dir.name in TASK_REGISTRY else "TASK"
    if level == LEVEL:
        return f"generate it with `python data.py --task {task} --out_dir {data_dir}`"
    return (f"data.py writes only level-{LEVEL} files (*_{LEVEL}.src/.tgt), so level {level} needs its own "
            f"{{train,valid,test}}_{level}.{{src,tgt}} files in {data_dir}")


def _read_pair(data_dir, name, level):
    """Aligned (src, tgt) token lists of `{name}_{level}.{src,tgt}`."""
    src_path = data_dir / f"{name}_{level}.src"
    tgt_path = data_dir / f"{name}_{level}.tgt"
    src_lines = _read_lines(src_path, _missing_hint(data_dir, level))
    tgt_lines = _read_lines(tgt_path, _missing_hint(data_dir, level))
    if len(src_lines) != len(tgt_lines):
        first_unpaired = min(len(src_lines), len(tgt_lines)) + 1
        raise DataError(f"{tgt_path}: {len(tgt_lines)} lines but {src_path.name} has {len(src_lines)} "
                        f"(line {first_unpaired} has no partner)")
    for number, (src, tgt) in enumerate(zip(src_lines, tgt_lines), 1):
        if len(src) != len(tgt):
            raise DataError(f"{tgt_path}, line {number}: {len(tgt)} tokens but {src_path.name} line {number} "
                            f"has {len(src)}")
    return src_lines, tgt_lines


def _encode(token_lists, vocab, path, train_path):
    """Flat ids of all lines in order; every token must be in the training vocabulary."""
    ids = []
    for number, tokens in enumerate(token_lists, 1):
        try:
            ids += [vocab[token] for token in tokens]
        except KeyError as error:
            raise DataError(f"{path}, line {number}: token {error.args[0]!r} does not occur in the training file "
                            f"{train_path.name}") from None
    return ids


def _id_tensor(flat_ids, pad, device):
    """The ids as a 1-D tensor of the smallest integer dtype that holds 0..pad (int64 only per batch)."""
    import torch
    dtype = next(dtype for dtype in (torch.uint8, torch.int16, torch.int32, torch.long)
                 if pad <= torch.iinfo(dtype).max)
    return torch.tensor(flat_ids, dtype=dtype, device=device)


def _split_names(data_dir, level):
    """train, valid, test, then bin2, bin3, ... for every bin{k}_{level}.src or .tgt present."""
    pattern = re.compile(rf"bin(\d+)_{level}\.(src|tgt)")
    bins = {int(match[1]) for path in data_dir.glob(f"bin*_{level}.*") if (match := pattern.fullmatch(path.name))}
    return list(SPLIT_NAMES) + [f"bin{k}" for k in sorted(bins)]


def load_data(data_dir, level=LEVEL, device="cpu"):
    """Load `{train,valid,test}_{level}` (and every `bin{k}_{level}`) from data_dir; DataError if unusable."""
    import torch   # imported here so that generating data does not pay torch's start-up time
    data_dir = Path(data_dir)
    if data_dir.exists() and not data_dir.is_dir():  # else each data file is "missing", with a hint that fails
        raise DataError(f"{data_dir} is a file, not a directory: it must be a folder holding "
                        f"{{train,valid,test}}_{level}.{{src,tgt}}")
    names = _split_names(data_dir, level)
    pairs = {name: _read_pair(data_dir, name, level) for name in names}
    train_src, train_tgt = pairs["train"]
    src_vocab = list(dict.fromkeys(token for tokens in train_src for token in tokens))
    tgt_vocab = list(dict.fromkeys(token for tokens in train_tgt for token in tokens))
    src_ids = {token: index for index, token in enumerate(src_vocab)}
    tgt_ids = {token: index for index, token in enumerate(tgt_vocab)}
    splits = {}
    for name, (src_lines, tgt_lines) in pairs.items():
        lengths = torch.tensor([len(tokens) for tokens in src_lines], dtype=torch.long)
        src_flat = _encode(src_lines, src_ids, data_dir / f"{name}_{level}.src", data_dir / f"train_{level}.src")
        tgt_flat = _encode(tgt_lines, tgt_ids, data_dir / f"{name}_{level}.tgt", data_dir / f"train_{level}.tgt")
        offsets = torch.cumsum(lengths, 0) - lengths
        splits[name] = Split(_id_tensor(src_flat, len(src_vocab), device),
                             _id_tensor(tgt_flat, len(tgt_vocab), device), offsets.to(device), lengths.to(device),
                             len(src_vocab), len(tgt_vocab))
    return FormalLanguageData(src_vocab, tgt_vocab, splits)


# ------------------------------------------------------------------------------------------------------ CLI

def _summary(data):
    """Per split: lines, distinct inputs, length range (the summary printed by --check)."""
    rows = [f"src vocab {data.src_vocab} (pad {data.src_pad}); tgt vocab {data.tgt_vocab} (pad {data.tgt_pad})"]
    for name, split in data.splits.items():
        # A line never holds the pad id, so lines of one split are equal exactly when their bytes are.
        distinct = len({line.numpy().tobytes() for line in split.src_ids.cpu().split(split.lengths.tolist())})
        rows.append(f"{name}: {len(split)} lines, {distinct} distinct, lengths "
                    f"{int(split.lengths.min())}-{int(split.lengths.max())}")
    return "\n".join(rows)


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (no usage block) and exits with status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parse_args(argv):
    parser = _OneLineParser(description="Generate or check the formal-language datasets.")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--task", choices=ALL_TASKS + ("all",),
                        help="task to generate; all writes the paper's eight tasks to OUT_DIR/<task>/")
    action.add_argument("--check", metavar="DIR", help="load DIR like training does and summarise its splits")
    parser.add_argument("--out_dir", help="output folder (with --task)")
    # seed and bins default to None so that --check can tell that they were given; see the defaults below
    parser.add_argument("--seed", type=int, help="random seed (default 1)")
    parser.add_argument("--bins", type=int,
                        help="number of longer bins (default 1): 1 writes valid/test, K > 1 adds bin2..binK")
    parser.add_argument("--train_lengths", type=int, nargs=2, metavar=("LOWER", "UPPER"),
                        help="window of train and valid (Bin0) instead of the paper's, e.g. 3 40 (Grazzi et al.'s "
                             "parity split); for parity and the group tasks the string length, otherwise what the "
                             "task's bins bound")
    parser.add_argument("--test_lengths", type=int, nargs=2, metavar=("LOWER", "UPPER"),
                        help="window of test (Bin1) instead of the paper's, e.g. 40 256; not with --bins > 1")
    args = parser.parse_args(argv)
    if args.check and (args.out_dir or args.seed is not None or args.bins is not None or args.train_lengths
                       or args.test_lengths):
        parser.error("--check takes no other option")
    if args.task and not args.out_dir:
        parser.error("--task needs --out_dir")
    args.seed = 1 if args.seed is None else args.seed
    args.bins = 1 if args.bins is None else args.bins
    if args.bins < 1:
        parser.error(f"--bins must be at least 1, got {args.bins}")
    error = window_error(args.train_lengths, args.test_lengths, args.bins)
    if error:
        parser.error(error)
    return args


def main(argv=None):
    args = _parse_args(argv)
    try:
        if args.check:
            print(_summary(load_data(args.check)))
            return 0
        tasks = TASKS if args.task == "all" else (args.task,)
        for task in tasks:
            out_dir = Path(args.out_dir) / task if args.task == "all" else Path(args.out_dir)
            write_task(task, out_dir, args.seed, args.bins, args.train_lengths, args.test_lengths)
            print(f"{task}: wrote {out_dir}")
    except (DataError, OSError) as error:   # exit status 2, as main.py's for unusable input
        print(f"data.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
