"""main.py end to end on tiny hand-written datasets: run files, resume, errors, NaN handling and wandb."""
import argparse
import dataclasses
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

import pytest
import torch

import data
import digests
import main
from model import MODEL_SLUGS, build_model, count_trainable_params

REPO = Path(__file__).resolve().parent.parent

# A tiny LSTM run: 48 training lines in batches of 8, i.e. 6 batches per epoch.
TINY = ["--model_type", "0", "--num_layer", "1", "--hidden_size", "16", "--emb_size", "8", "--batch_size", "8",
        "--learning_rate", "3e-3", "--report_every", "4", "--num_epoch", "2"]


def parity_lines(rng, count, lower, upper):
    src, tgt = [], []
    for _ in range(count):
        bits = [rng.choice("01") for _ in range(rng.randint(lower, upper))]
        ones = 0
        labels = []
        for bit in bits:
            ones += bit == "1"
            labels.append("rej" if ones % 2 else "acc")
        src.append(" ".join(bits))
        tgt.append(" ".join(labels))
    return src, tgt


def write_tiny_parity(directory, extra_bins=0, seed=0):
    """A six-file parity dataset (plus bin{k}_50 files): train/valid lengths 2..8, test 9..12."""
    rng = random.Random(seed)
    splits = {"train": parity_lines(rng, 48, 2, 8), "valid": parity_lines(rng, 12, 2, 8),
              "test": parity_lines(rng, 12, 9, 12)}
    for k in range(2, 2 + extra_bins):
        splits[f"bin{k}"] = parity_lines(rng, 6, 13, 16)
    directory.mkdir(parents=True, exist_ok=True)
    for name, (src, tgt) in splits.items():
        (directory / f"{name}_50.src").write_text("".join(line + "\n" for line in src))
        (directory / f"{name}_50.tgt").write_text("".join(line + "\n" for line in tgt))
    return directory


@pytest.fixture
def tiny_data(tmp_path):
    return write_tiny_parity(tmp_path / "data" / "tiny")


def run_main(tmp_path, data_dir, *flags, work_dir="runs"):
    """main.main in-process; returns (exit code, run directory or None)."""
    work = tmp_path / work_dir
    before = set(work.iterdir()) if work.exists() else set()
    code = main.main(["--data_dir", str(data_dir), "--work_dir", str(work), *flags])
    created = sorted(set(work.iterdir()) - before) if work.exists() else []
    assert len(created) <= 1
    return code, (created[0] if created else None)


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def without_time(records):
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in records]


def model_weights(path):
    return main.load_checkpoint(path)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# -- a complete run ----------------------------------------------------------------------------------------------

def test_run_writes_every_file(tmp_path, capsys):
    data_dir = write_tiny_parity(tmp_path / "data" / "tiny", extra_bins=1)
    code, run_dir = run_main(tmp_path, data_dir, *TINY)
    assert code == 0
    assert run_dir.name.startswith("lstm-tiny-")
    assert {p.name for p in run_dir.iterdir()} == {"log.txt", "args.json", "metrics.jsonl", "best_model.pt",
                                                   "latest_model.pt", "final.json", main.RUN_LOCK}

    args = json.loads((run_dir / "args.json").read_text())
    assert set(args) == {action.dest for action in main.build_parser()._actions} - {"help"}
    assert args["hidden_size"] == 16 and args["num_epoch"] == 2

    # 6 batches per epoch, report_every 4: after batches 0 and 4 of each epoch (0-based) and at its end.
    metrics = read_metrics(run_dir)
    assert [(m["epoch"], m["step"]) for m in metrics] == [(1, 1), (1, 5), (1, 6), (2, 7), (2, 11), (2, 12)]
    for record in metrics:
        assert set(record) == {"epoch", "step", "batch", "end_of_epoch", "train_loss", "valid_loss", "valid_acc",
                               "valid2_loss", "valid2_acc", "elapsed_s"}
        assert 0 <= record["valid_acc"] <= 100 and 0 <= record["valid2_acc"] <= 100

    final = json.loads((run_dir / "final.json").read_text())
    assert set(final) == {"best_step", "best_epoch", "valid_acc", "valid2_acc", "test_acc", "stopped", "by_length",
                          "operators", "code"}
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    assert final["code"].startswith(f"git {head.strip()}")
    assert final["operators"] == {}  # the LSTM uses no fast-weight operator
    # A rerun reproduces the run only on the same kind of CPU: the log names it.
    assert f"CPU: {main.cpu_description()}; ATen: " in (run_dir / "log.txt").read_text()
    scores = [(m["valid_acc"] + m["valid2_acc"]) / 2 for m in metrics]
    best = metrics[scores.index(max(scores))]
    assert (final["best_step"], final["best_epoch"]) == (best["step"], best["epoch"])
    assert final["valid_acc"] == pytest.approx(best["valid_acc"])
    assert final["valid2_acc"] == pytest.approx(best["valid2_acc"])
    assert final["test_acc"] == final["valid2_acc"]  # test is valid2 (Bin1)
    assert final["stopped"] == ("stop_acc" if max(scores) >= 100 else "num_epoch")

    loaded = data.load_data(str(data_dir))
    assert set(final["by_length"]) == set(loaded.splits) - {"train"}
    for name, counts in final["by_length"].items():
        split = loaded.splits[name]
        assert {int(n): total for n, (_, total) in counts.items()} == \
            {n: split.lengths.tolist().count(n) for n in set(split.lengths.tolist())}
    test_correct = sum(c for c, _ in final["by_length"]["test"].values())
    assert final["test_acc"] == pytest.approx(100 * test_correct / len(loaded.splits["test"]))

    log = (run_dir / "log.txt").read_text()
    out = capsys.readouterr().out
    model = build_model(argparse.Namespace(**args), len(loaded.src_vocab) + 1, len(loaded.tgt_vocab) + 1)
    for text in (log, out):
        assert f"Number of trainable params: {count_trainable_params(model)}" in text
        assert text.count("valid acc: ") == len(metrics) and text.count("valid2 acc: ") == len(metrics)
        assert "The best model so far." in text and "Best validation acc: " in text
        assert f"Code: {final['code']}" in text
        assert f"Final model test acc: {final['test_acc']:.2f} %" in text


def test_original_command_line_parses():
    """The flags of the original README's training script, verbatim, with its blanks filled in."""
    argv = ("--data_dir data/parity --level 50 --model_type 7 --num_layer 1 --hidden_size 32 --n_head 4 "
            "--ff_factor 4 --dropout 0.0 --batch_size 32 --learning_rate 1e-3 --seed 1 --grad_cummulate 1 "
            "--num_epoch 300 --report_every 50 --project_name 2023--formal-lang --remove_pos_enc").split()
    args = main.build_parser().parse_args(argv)
    assert (args.model_type, args.num_layer, args.num_epoch, args.project_name) == (7, 1, 300, "2023--formal-lang")
    assert args.remove_pos_enc and not args.use_wandb and args.resume is None
    main.check_flags(args)


def test_stops_at_stop_acc(tmp_path, tiny_data):
    """The evaluation after the first batch reaches 0 %: the epoch is left, and still evaluated at its end."""
    code, run_dir = run_main(tmp_path, tiny_data, *TINY, "--stop_acc", "0")
    assert code == 0
    assert [(m["step"], m["batch"], m["end_of_epoch"]) for m in read_metrics(run_dir)] == [(1, 0, False),
                                                                                           (1, 0, True)]
    assert json.loads((run_dir / "final.json").read_text())["stopped"] == "stop_acc"
    log = (run_dir / "log.txt").read_text()
    assert "epoch 1 / step 0 =============" in log and "End epoch 1 =============" in log


def test_stop_acc_is_measured_on_the_selection_score_not_on_valid_alone(tmp_path, tiny_data, monkeypatch):
    """Valid (Bin0) at 100 %, valid2 (Bin1, the test split) at 0 %: their mean, 50 %, is below --stop_acc 60, so the
    run goes on to --num_epoch; a run that stopped on valid alone would end at its first evaluation."""
    real_evaluate = main.evaluate

    def valid_perfect_valid2_wrong(model, split, pad, batch_size):
        result = real_evaluate(model, split, pad, batch_size)
        is_valid2 = split.lengths.min() > 8  # tiny_data: valid lines have 2..8 tokens, test (valid2) lines 9..12
        return dataclasses.replace(result, acc=0.0 if is_valid2 else 100.0)

    monkeypatch.setattr(main, "evaluate", valid_perfect_valid2_wrong)
    code, run_dir = run_main(tmp_path, tiny_data, *TINY, "--stop_acc", "60")
    assert code == 0
    assert json.loads((run_dir / "final.json").read_text())["stopped"] == "num_epoch"
    assert [m["valid_acc"] for m in read_metrics(run_dir)] == [100.0] * 6  # 2 epochs: batches 0 and 4, and the end


# A learning rate too small to change any prediction: every evaluation scores the same, so the best stays the
# first evaluation that scored above 0 (or none), and --patience ends the run a known number of epochs later.
FROZEN = TINY + ["--learning_rate", "1e-12", "--stop_acc", "101"]


def epoch_of_best(metrics):
    """main.py's best evaluation's epoch: the first with the highest score, if that is above 0; else 0."""
    scores = [(m["valid_acc"] + m["valid2_acc"]) / 2 for m in metrics]
    return metrics[scores.index(max(scores))]["epoch"] if max(scores) > 0 else 0


def test_patience_stops_the_run_and_changes_nothing_before(tmp_path, tiny_data):
    code, plain = run_main(tmp_path, tiny_data, *FROZEN, "--num_epoch", "6", work_dir="plain")
    assert code == 0
    code, run_dir = run_main(tmp_path, tiny_data, *FROZEN, "--num_epoch", "6", "--patience", "2")
    assert code == 0
    final = json.loads((run_dir / "final.json").read_text())
    assert final["stopped"] == "patience"
    stop_epoch = epoch_of_best(read_metrics(plain)) + 2
    assert stop_epoch < 6 and read_metrics(run_dir)[-1]["epoch"] == stop_epoch
    # Until it stops, the run is the run without the rule.
    assert without_time(read_metrics(run_dir)) == without_time(read_metrics(plain))[:len(read_metrics(run_dir))]
    plain_final = json.loads((plain / "final.json").read_text())
    assert {k: v for k, v in final.items() if k != "stopped"} == {k: v for k, v in plain_final.items()
                                                                  if k != "stopped"}


def as_before_patience(run_dir):
    """Makes run_dir's args.json one written before main.py had --patience."""
    args_path = run_dir / "args.json"
    old_args = json.loads(args_path.read_text())
    del old_args["patience"]
    args_path.write_text(json.dumps(old_args))


def test_patience_on_a_resume_extends_a_finished_run_as_if_it_had_it_from_the_start(tmp_path, tiny_data):
    """The paper-budget runs extend finished ones: a run's args.json from before --patience existed resumes with
    the rule added, and ends as a run that had it from its first epoch."""
    code, straight = run_main(tmp_path, tiny_data, *RESUMABLE, "--num_epoch", "8", "--patience", "2",
                              work_dir="straight")
    assert code == 0 and json.loads((straight / "final.json").read_text())["stopped"] == "patience"
    code, run_dir = run_main(tmp_path, tiny_data, *RESUMABLE, "--num_epoch", "1")
    assert code == 0
    as_before_patience(run_dir)
    assert main.main(["--resume", str(run_dir), "--num_epoch", "8", "--patience", "2"]) == 0
    assert_same_run(run_dir, straight)


def test_resume_of_a_run_from_before_patience_keeps_training_without_it(tmp_path, tiny_data, uninterrupted):
    code, run_dir = run_main(tmp_path, tiny_data, *RESUMABLE, "--num_epoch", "1")
    assert code == 0
    as_before_patience(run_dir)
    assert main.main(["--resume", str(run_dir), "--num_epoch", "3"]) == 0
    assert_same_run(run_dir, uninterrupted)
    assert json.loads((run_dir / "args.json").read_text())["patience"] == 0


def original_evaluation_points(num_batches, report_every, num_epoch):
    """(epoch, 0-based batch index, end of epoch) of every evaluation of the original loop (training.md)."""
    points = []
    for epoch in range(1, num_epoch + 1):
        points += [(epoch, idx, False) for idx in range(num_batches) if report_every > 0 and idx % report_every == 0]
        points.append((epoch, num_batches - 1, True))
    return points


@pytest.mark.parametrize("batch_size,report_every", [(8, 4), (1, 25), (7, 3), (8, 0), (16, 1)])
def test_evaluation_points_follow_the_original(tmp_path, tiny_data, batch_size, report_every):
    code, run_dir = run_main(tmp_path, tiny_data, *TINY, "--batch_size", str(batch_size), "--report_every",
                             str(report_every), "--stop_acc", "101")
    assert code == 0
    num_batches = -(-48 // batch_size)
    metrics = read_metrics(run_dir)
    assert [(m["epoch"], m["batch"], m["end_of_epoch"]) for m in metrics] == \
        original_evaluation_points(num_batches, report_every, 2)
    assert [m["step"] for m in metrics] == [(m["epoch"] - 1) * num_batches + m["batch"] + 1 for m in metrics]


def original_batches(seed, num_lines, batch_size, report_every, num_epoch, num_eval_lines=12):
    """The batches of the original loop (training.md): after its re-seed, a shuffling DataLoader over the training
    set; every evaluation iterates the valid and valid2 DataLoaders, whose iterators also draw from the RNG."""
    torch.manual_seed(seed)
    train_loader = torch.utils.data.DataLoader(range(num_lines), batch_size=batch_size, shuffle=True)
    eval_loader = torch.utils.data.DataLoader(range(num_eval_lines), batch_size=batch_size)

    def evaluate_valid_and_valid2():
        for _ in range(2):
            list(eval_loader)

    batches = []
    for _ in range(num_epoch):
        for idx, batch in enumerate(train_loader):
            batches.append(batch.tolist())
            if report_every > 0 and idx % report_every == 0:
                evaluate_valid_and_valid2()
        evaluate_valid_and_valid2()
    return batches


def test_data_order_is_the_original_dataloader_order(tmp_path, tiny_data, monkeypatch):
    """Every epoch trains on the batches of the original's DataLoader after its re-seed: the model's
    initialisation draws do not matter, the evaluations' draws do."""
    trained, real_train_batch = [], main.Run.train_batch

    def spy(self, split, indices, optimizer_step):
        trained.append(indices.tolist())
        return real_train_batch(self, split, indices, optimizer_step)

    monkeypatch.setattr(main.Run, "train_batch", spy)
    code, _ = run_main(tmp_path, tiny_data, *TINY, "--num_epoch", "3", "--seed", "7", "--stop_acc", "101")
    assert code == 0
    assert trained == original_batches(seed=7, num_lines=48, batch_size=8, report_every=4, num_epoch=3)


@pytest.fixture
def tasks_generated(monkeypatch):
    """Replaces data.write_task by a tiny parity writer (the real generators take too long for the default
    suite); the list of the tasks it was asked for."""
    written = []

    def tiny_writer(task, out_dir, seed=1, bins=1):
        written.append(task)
        write_tiny_parity(Path(out_dir))

    monkeypatch.setattr(main.data, "write_task", tiny_writer)
    return written


@pytest.mark.parametrize("task", ["parity", "s5"])  # a paper task and a group task (beyond the paper)
def test_missing_task_directory_is_generated(tmp_path, tasks_generated, capsys, task):
    code, _ = run_main(tmp_path, tmp_path / "data" / task, *TINY, "--num_epoch", "1")
    assert code == 0 and tasks_generated == [task]
    assert capsys.readouterr().out.count("generating") == 1


def test_generation_of_a_missing_task_writes_the_recorded_bytes(tmp_path):
    """main.py's own generation (the real data.write_task, with the seed main.py gives it) writes the files the
    committed results used: any change of that seed would silently train other runs on other data."""
    data_root = tmp_path / "data"
    code, _ = run_main(tmp_path, data_root / "aa-star", *TINY, "--num_epoch", "1", "--stop_acc", "-1")
    assert code == 0
    written = digests.written(data_root)
    recorded = digests.recorded(digests.DATA_SHA256)
    assert written == {name: digest for name, digest in recorded.items() if name in written}
    assert set(written) == {f"aa-star/{split}_50.{ext}" for split in ("train", "valid", "test") for ext in ("src", "tgt")}


# -- resume ------------------------------------------------------------------------------------------------------

RESUMABLE = TINY + ["--num_epoch", "3", "--dropout", "0.2", "--grad_cummulate", "3", "--stop_acc", "101"]


@pytest.fixture
def uninterrupted(tmp_path, tiny_data):
    code, run_dir = run_main(tmp_path, tiny_data, *RESUMABLE, work_dir="straight")
    assert code == 0
    return run_dir


def assert_same_run(run_dir, reference_dir):
    assert without_time(read_metrics(run_dir)) == without_time(read_metrics(reference_dir))
    assert json.loads((run_dir / "final.json").read_text()) == json.loads((reference_dir / "final.json").read_text())
    assert (run_dir / "best_model.pt").exists() == (reference_dir / "best_model.pt").exists()
    if (reference_dir / "best_model.pt").exists():  # absent when no evaluation scored above 0 %
        assert_same_weights(model_weights(run_dir / "best_model.pt"), model_weights(reference_dir / "best_model.pt"))
    assert_same_weights(model_weights(run_dir / "latest_model.pt"), model_weights(reference_dir / "latest_model.pt"))


def test_resume_with_more_epochs_matches_uninterrupted_run(tmp_path, tiny_data, uninterrupted):
    code, run_dir = run_main(tmp_path, tiny_data, *RESUMABLE, "--num_epoch", "1")
    assert code == 0 and (run_dir / "final.json").exists()
    assert main.main(["--resume", str(run_dir), "--num_epoch", "3"]) == 0
    assert_same_run(run_dir, uninterrupted)
    assert json.loads((run_dir / "args.json").read_text())["num_epoch"] == 3
    assert (run_dir / "log.txt").read_text().count("Start training") == 2  # appended, not replaced


@pytest.mark.parametrize("batches_before_kill,steps_logged", [
    (10, [1, 5, 6, 7]),  # within epoch 2: three batches after the checkpoint at batch 0, mid-accumulation
    (6, [1, 5, 6]),  # between epochs: right after the end-of-epoch checkpoint
])
def test_resume_after_a_kill_matches_uninterrupted_run(tmp_path, tiny_data, uninterrupted, monkeypatch,
                                                       batches_before_kill, steps_logged):
    """The resumed run redoes the batches since latest_model.pt and ends bit-identical to the uninterrupted one."""
    real_train_batch = main.Run.train_batch
    calls = []

    def killed(self, *args):
        if len(calls) == batches_before_kill:
            raise KeyboardInterrupt
        calls.append(1)
        return real_train_batch(self, *args)

    monkeypatch.setattr(main.Run, "train_batch", killed)
    code, run_dir = run_main(tmp_path, tiny_data, *RESUMABLE)
    assert code == 128 + signal.SIGINT
    assert not (run_dir / "final.json").exists()
    assert [m["step"] for m in read_metrics(run_dir)] == steps_logged
    monkeypatch.setattr(main.Run, "train_batch", real_train_batch)

    assert main.main(["--resume", str(run_dir)]) == 0
    assert_same_run(run_dir, uninterrupted)


def test_resume_between_a_mid_epoch_stop_and_the_end_of_epoch_evaluation(tmp_path, tiny_data, monkeypatch):
    code, straight = run_main(tmp_path, tiny_data, *TINY, "--stop_acc", "0", work_dir="straight")
    assert code == 0
    real_evaluate = main.Run.evaluate_and_checkpoint

    def killed_at_epoch_end(self, end_of_epoch):
        if end_of_epoch:
            raise KeyboardInterrupt
        return real_evaluate(self, end_of_epoch)

    monkeypatch.setattr(main.Run, "evaluate_and_checkpoint", killed_at_epoch_end)
    code, run_dir = run_main(tmp_path, tiny_data, *TINY, "--stop_acc", "0")
    assert code == 128 + signal.SIGINT and len(read_metrics(run_dir)) == 1
    monkeypatch.setattr(main.Run, "evaluate_and_checkpoint", real_evaluate)
    assert main.main(["--resume", str(run_dir)]) == 0
    assert_same_run(run_dir, straight)


def test_resume_refuses_finished_runs_and_changed_flags(tmp_path, tiny_data, capsys):
    code, run_dir = run_main(tmp_path, tiny_data, *TINY, "--num_epoch", "1")
    assert code == 0
    capsys.readouterr()
    assert main.main(["--resume", str(run_dir)]) == main.EXIT_USAGE
    assert "already finished" in capsys.readouterr().err
    assert main.main(["--resume", str(run_dir), "--hidden_size", "32"]) == main.EXIT_USAGE
    assert "--hidden_size cannot be changed" in capsys.readouterr().err
    assert main.main(["--resume", str(tmp_path)]) == main.EXIT_USAGE


# -- divergence --------------------------------------------------------------------------------------------------

def test_non_finite_loss_stops_and_reports_the_best_checkpoint(tmp_path, tiny_data, monkeypatch, capsys):
    real_loss = main.sequence_loss
    calls = []

    def nan_from_batch_nine(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) >= 9 else loss

    monkeypatch.setattr(main, "sequence_loss", nan_from_batch_nine)
    code, run_dir = run_main(tmp_path, tiny_data, *TINY, "--stop_acc", "101")
    assert code == main.EXIT_DIVERGED
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 5, 6, 7]
    stop_lines = [line for line in capsys.readouterr().out.splitlines() if "nan" in line]
    assert len(stop_lines) == 1 and "step 9" in stop_lines[0]
    best = main.load_checkpoint(run_dir / "best_model.pt")
    assert all(torch.isfinite(t).all() for t in best["model"].values())
    final = json.loads((run_dir / "final.json").read_text())
    assert final["stopped"] == "non_finite_loss"
    best_record = next(m for m in metrics if m["step"] == best["best"]["step"])
    assert final["best_step"] == best_record["step"]
    assert final["valid_acc"] == pytest.approx(best_record["valid_acc"])
    assert final["test_acc"] == pytest.approx(best_record["valid2_acc"])


def test_huge_learning_rate_is_caught(tmp_path, tiny_data):
    code, run_dir = run_main(tmp_path, tiny_data, "--model_type", "8", "--num_layer", "1", "--hidden_size", "8",
                             "--n_head", "2", "--batch_size", "8", "--learning_rate", "1e30", "--num_epoch", "3",
                             "--report_every", "0", "--remove_pos_enc")
    assert code == main.EXIT_DIVERGED
    final = json.loads((run_dir / "final.json").read_text())
    assert final["stopped"] == "non_finite_loss"


# -- bad flags: one line on stderr, non-zero exit, no traceback, no run directory --------------------------------

def bad_data_dirs(root):
    unknown_token = write_tiny_parity(root / "unknown_token")
    with open(unknown_token / "valid_50.src", "a") as f:
        f.write("0 2 1\n")
    with open(unknown_token / "valid_50.tgt", "a") as f:
        f.write("acc acc rej\n")
    mismatch = write_tiny_parity(root / "mismatch")
    (mismatch / "test_50.tgt").write_text("acc\n" * 12)
    a_file = root / "a_file"
    a_file.write_text("not a directory\n")
    return {"missing": root / "no_such_dir", "unknown_token": unknown_token, "mismatch": mismatch,
            "a_file": a_file}


BAD_FLAGS = {
    "heads_do_not_divide": ["--model_type", "2", "--hidden_size", "30", "--n_head", "4"],
    "srwm_with_pos_enc": ["--model_type", "12", "--hidden_size", "16", "--n_head", "4"],
    "srwm_head_dim_3": ["--model_type", "12", "--hidden_size", "12", "--n_head", "4", "--remove_pos_enc"],
    "unknown_model_type": ["--model_type", "3"],
    "not_a_number": ["--hidden_size", "big"],
    "cuda_without_gpu": ["--device", "cuda"],
    "data_missing": ["--data_dir", "{missing}"],
    "data_unknown_token": ["--data_dir", "{unknown_token}"],
    "data_length_mismatch": ["--data_dir", "{mismatch}"],
    "n_head_0": ["--model_type", "2", "--n_head", "0"],
    "n_head_negative": ["--model_type", "2", "--hidden_size", "16", "--n_head", "-4"],
    "learning_rate_nan": ["--learning_rate", "nan"],
    "learning_rate_negative": ["--learning_rate", "-1"],
    "learning_rate_negative_exponent": ["--learning_rate", "-1e-3"],
    "data_dir_is_a_file": ["--data_dir", "{a_file}"],
    "dropout_above_1": ["--dropout", "1.5"],
    "emb_size_0": ["--emb_size", "0"],
    "hidden_size_0": ["--hidden_size", "0"],
    "num_layer_0": ["--model_type", "2", "--num_layer", "0"],
    "ff_factor_0": ["--model_type", "8", "--ff_factor", "0"],
    "clip_negative": ["--clip", "-1"],
    "stop_acc_inf": ["--stop_acc", "inf"],
    "work_dir_is_a_file": ["--work_dir", "{a_file}"],
    "work_dir_below_a_file": ["--work_dir", "{a_file}/runs"],
    "generated_data_below_a_file": ["--data_dir", "{a_file}/parity"],
}


# What the error line of some cases must say: the real problem, not what argparse or a missing file made of it.
BAD_FLAG_ERRORS = {
    "learning_rate_negative_exponent": "--learning_rate must be a positive finite number, got -0.001",
    "data_dir_is_a_file": "a_file is a file, not a directory",
}


@pytest.fixture(scope="module")
def bad_flag_dirs(tmp_path_factory):
    """The folders the cases' flags name ({missing}, {a_file}, ...) and a good data folder the cases override."""
    root = tmp_path_factory.mktemp("bad")
    dirs = {name: str(path) for name, path in bad_data_dirs(root).items()}
    return dirs, str(write_tiny_parity(root / "good"))


def bad_flag_argv(case, bad_flag_dirs, work):
    dirs, good_data = bad_flag_dirs  # the case's flags come last, so they override these
    return ["--data_dir", good_data, "--work_dir", str(work), "--num_epoch", "1",
            *(flag.format(**dirs) for flag in BAD_FLAGS[case])]


def assert_one_error_line(code, out, err, work):
    assert code == main.EXIT_USAGE
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert all("generating" in line for line in out.splitlines()), out  # stdout: at most the generation note
    assert "Traceback" not in out + err
    assert not work.exists() or not any(work.iterdir())


@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_bad_flag_fails_with_one_line(case, bad_flag_dirs, tmp_path, capsys):
    if case == "cuda_without_gpu" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    work = tmp_path / "work"
    code = main.main(bad_flag_argv(case, bad_flag_dirs, work))  # an exception here is the traceback a user would see
    out, err = capsys.readouterr()
    assert_one_error_line(code, out, err, work)
    assert BAD_FLAG_ERRORS.get(case, "") in err


# One case of each kind (the parser, a flag check, the data, the run directory) as a shell sees it: the process's
# exit status and its stderr. The rest run in-process above, since each process pays seconds for importing torch.
AS_A_PROCESS = ["not_a_number", "srwm_head_dim_3", "data_unknown_token", "work_dir_below_a_file"]


def test_bad_flags_as_processes(bad_flag_dirs, tmp_path):
    procs = {case: subprocess.Popen([sys.executable, "main.py", *bad_flag_argv(case, bad_flag_dirs, tmp_path / case)],
                                    cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for case in AS_A_PROCESS}
    for case, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert_one_error_line(proc.returncode, out, err, tmp_path / case)



# -- out of memory -----------------------------------------------------------------------------------------------

CPU_ALLOCATOR_FAILURE = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                         "you tried to allocate 6553600000 bytes. Error code 12 (Cannot allocate memory)")
ALLOCATION_FAILURES = {  # what torch's CPU allocator, torch's CUDA allocator and Python raise
    "cpu": (RuntimeError(CPU_ALLOCATOR_FAILURE), "CPU", "6553600000 bytes"),
    "cuda": (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity "
                                    "of 79.1 GiB"), "GPU", "20.00 MiB"),
    "python": (MemoryError(), "CPU", None),
}


def failing_from_call(count, error, real):
    """`real`, except that its `count`-th call and every later one raise `error`."""
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) >= count:
            raise error
        return real(*args, **kwargs)
    return wrapper


def out_of_memory_line(code, capsys):
    """The one error line of an out-of-memory exit."""
    assert code == main.EXIT_OUT_OF_MEMORY
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: out of "), lines
    assert "Traceback" not in out + err
    return lines[0]


@pytest.mark.parametrize("kind", sorted(ALLOCATION_FAILURES))
def test_out_of_memory_in_the_first_training_step_leaves_no_run_directory(tmp_path, tiny_data, monkeypatch, capsys,
                                                                          kind):
    error, memory, size = ALLOCATION_FAILURES[kind]
    monkeypatch.setattr(main, "sequence_loss", failing_from_call(1, error, main.sequence_loss))
    code, run_dir = run_main(tmp_path, tiny_data, *TINY)
    line = out_of_memory_line(code, capsys)
    assert line.startswith(f"error: out of {memory} memory in a training step") and "--batch_size" in line
    assert (size in line) if size else "allocating" not in line
    assert run_dir is None


def test_out_of_memory_after_a_checkpoint_keeps_it_for_resume(tmp_path, tiny_data, monkeypatch, capsys):
    real_loss = main.sequence_loss
    monkeypatch.setattr(main, "sequence_loss", failing_from_call(3, MemoryError(), real_loss))  # step 1 checkpoints
    code, run_dir = run_main(tmp_path, tiny_data, *TINY)
    assert f"--resume {run_dir}" in out_of_memory_line(code, capsys)
    assert (run_dir / "latest_model.pt").exists() and not (run_dir / "final.json").exists()
    monkeypatch.setattr(main, "sequence_loss", failing_from_call(1, MemoryError(), real_loss))
    assert "in a training step" in out_of_memory_line(main.main(["--resume", str(run_dir)]), capsys)
    assert (run_dir / "latest_model.pt").exists()  # a resumed run keeps its checkpoint
    monkeypatch.setattr(main, "sequence_loss", real_loss)
    assert main.main(["--resume", str(run_dir)]) == 0 and (run_dir / "final.json").exists()


def test_out_of_memory_during_evaluation(tmp_path, tiny_data, monkeypatch, capsys):
    monkeypatch.setattr(main, "evaluate", failing_from_call(1, RuntimeError(CPU_ALLOCATOR_FAILURE), main.evaluate))
    code, run_dir = run_main(tmp_path, tiny_data, *TINY)
    assert out_of_memory_line(code, capsys).startswith("error: out of CPU memory during evaluation")
    assert run_dir is None


def test_another_runtime_error_is_not_called_out_of_memory(tmp_path, tiny_data, monkeypatch):
    monkeypatch.setattr(main, "sequence_loss", failing_from_call(1, RuntimeError("shape mismatch"), main.sequence_loss))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_main(tmp_path, tiny_data, *TINY)


def test_out_of_memory_while_loading_frees_what_the_loader_held(tmp_path, tiny_data, monkeypatch, capsys):
    """The exception's traceback holds the loader's frames; the error is reported once they are gone."""
    held = []

    def loader_runs_out(*args):
        ids = torch.zeros(1000)  # stands for the loader's big tensors and lists
        held.append(weakref.ref(ids))
        raise MemoryError

    class Stderr:  # notes whether the loader's memory is still held when the error line is written
        def write(self, text):
            freed.append(held[0]() is None)
            return real_stderr.write(text)

        def flush(self):
            real_stderr.flush()

    freed, real_stderr = [], sys.stderr
    monkeypatch.setattr(data, "_id_tensor", loader_runs_out)
    monkeypatch.setattr(sys, "stderr", Stderr())
    code, run_dir = run_main(tmp_path, tiny_data, *TINY)
    monkeypatch.setattr(sys, "stderr", real_stderr)
    assert out_of_memory_line(code, capsys).startswith("error: out of CPU memory while loading data")
    assert run_dir is None and freed and all(freed)


def test_real_out_of_memory_in_a_process(tmp_path):
    """The real allocators under an address-space limit: a 100000-token line in a batch of a wide LSTM needs
    gigabytes (the data itself only about a megabyte)."""
    data_dir = write_tiny_parity(tmp_path / "data" / "tiny")
    with open(data_dir / "train_50.src", "a") as src, open(data_dir / "train_50.tgt", "a") as tgt:
        src.write("0 " * 99999 + "0\n")
        tgt.write("acc " * 99999 + "acc\n")
    limit = 2 << 30
    proc = subprocess.run(
        [sys.executable, "-c", "import resource, sys, main\n"
         f"resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))\nsys.exit(main.main(sys.argv[1:]))",
         "--data_dir", str(data_dir), "--work_dir", str(tmp_path / "runs"), *TINY, "--hidden_size", "512",
         "--batch_size", "64"], cwd=REPO, capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == main.EXIT_OUT_OF_MEMORY, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: out of CPU memory in a training step"), lines
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())

# -- wandb -------------------------------------------------------------------------------------------------------

def test_wandb_offline(tmp_path, tiny_data, monkeypatch):
    import wandb
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged, real_log = [], wandb.Run.log

    def spy_log(self, record, *args, **kwargs):
        logged.append(dict(record))
        return real_log(self, record, *args, **kwargs)

    monkeypatch.setattr(wandb.Run, "log", spy_log)
    code, run_dir = run_main(tmp_path, tiny_data, *TINY, "--num_epoch", "1", "--use_wandb",
                             "--project_name", "test-project", "--job_name", "test-job")
    assert code == 0
    assert logged == read_metrics(run_dir)
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    event_files = list(offline_runs[0].glob("*.wandb"))
    assert len(event_files) == 1
    # The wandb service process may still be flushing the event file after finish(); its protobuf records hold
    # the names and metric keys verbatim.
    expected = (b"test-project", b"test-job", b"valid2_acc", b"test_acc")
    deadline = time.time() + 30
    while not all(text in event_files[0].read_bytes() for text in expected) and time.time() < deadline:
        time.sleep(0.5)
    events = event_files[0].read_bytes()
    for text in expected:
        assert text in events, text


def test_a_resumed_offline_wandb_run_names_every_folder_of_the_run(tmp_path, tiny_data, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    code, run_dir = run_main(tmp_path, tiny_data, *TINY, "--num_epoch", "1", "--use_wandb")
    time.sleep(1.1)  # wandb names the folder after the second it starts in (and the id): the resume's is another
    assert code == 0 and main.main(["--resume", str(run_dir), "--num_epoch", "2"]) == 0
    folders = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 2  # wandb writes one per start
    last_line = [line for line in (run_dir / "log.txt").read_text().splitlines() if "wandb sync" in line][-1]
    assert "2 folder(s)" in last_line and all(str(folder) in last_line for folder in folders), last_line


def test_wandb_that_cannot_start_is_one_error_line(tmp_path, tiny_data, monkeypatch, capsys):
    import wandb

    def no_login(*args, **kwargs):
        raise wandb.errors.UsageError("No API key configured.\nMore details here.")

    monkeypatch.setattr(wandb, "init", no_login)
    code, run_dir = run_main(tmp_path, tiny_data, *TINY, "--use_wandb")
    assert code == main.EXIT_USAGE and run_dir is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No API key configured." in err[0] and "WANDB_MODE=offline" in err[0]


# -- the slow check: the LSTM learns parity ----------------------------------------------------------------------

@pytest.mark.slow
def test_lstm_learns_generated_parity(tmp_path):
    data_dir = tmp_path / "parity"
    data.write_task("parity", data_dir)
    code, run_dir = run_main(tmp_path, data_dir, "--model_type", "0", "--num_layer", "1", "--hidden_size", "32",
                             "--emb_size", "16", "--batch_size", "64", "--learning_rate", "3e-3", "--num_epoch", "10",
                             "--report_every", "50")
    assert code == 0
    final = json.loads((run_dir / "final.json").read_text())
    assert final["valid_acc"] == 100.0 and final["valid2_acc"] == 100.0
    assert final["stopped"] == "stop_acc"


# -- signals: SIGTERM and SIGINT stop at the end of a batch with a resumable checkpoint ---------------------------

def test_sigint_mid_epoch_checkpoints_that_batch_and_resumes_exactly(tmp_path, tiny_data, uninterrupted, monkeypatch,
                                                                     capsys):
    """Ctrl-C during batch 9 (epoch 2, batch 2: between evaluations, inside a 3-batch accumulation)."""
    real_train_batch = main.Run.train_batch
    calls = []

    def interrupted_during_batch_nine(self, *args):
        calls.append(1)
        if len(calls) == 9:
            os.kill(os.getpid(), signal.SIGINT)
        return real_train_batch(self, *args)

    monkeypatch.setattr(main.Run, "train_batch", interrupted_during_batch_nine)
    code, run_dir = run_main(tmp_path, tiny_data, *RESUMABLE)
    assert code == 130
    progress = main.load_checkpoint(run_dir / "latest_model.pt")["progress"]
    assert (progress["step"], progress["epoch"], progress["batch"]) == (9, 1, 3)
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 5, 6, 7]
    out = capsys.readouterr().out
    assert "Stopped by SIGINT after step 9" in out and f"python main.py --resume {run_dir}" in out
    monkeypatch.setattr(main.Run, "train_batch", real_train_batch)
    assert main.main(["--resume", str(run_dir)]) == 0
    assert_same_run(run_dir, uninterrupted)


def test_signal_before_the_first_batch_leaves_nothing_to_resume(tmp_path, tiny_data, monkeypatch, capsys):
    real_header = main.Run.log_header

    def header_then_sigterm(self, *args):
        real_header(self, *args)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(main.Run, "log_header", header_then_sigterm)
    code, run_dir = run_main(tmp_path, tiny_data, *TINY)
    assert code == 128 + signal.SIGTERM
    assert run_dir is None  # the empty run directory is removed
    out = capsys.readouterr().out
    assert "nothing to resume" in out and f"Start again with: python main.py --data_dir {tiny_data}" in out
    assert "Stopped by SIGTERM before the first training step" in out and "step 0" not in out


@pytest.mark.parametrize("moment", ["while the stop is logged", "while the empty run directory is removed"])
def test_a_further_signal_while_a_stop_is_handled_ends_the_run_with_no_traceback(tmp_path, tiny_data, monkeypatch,
                                                                                 moment):
    """A group-wide SIGTERM (timeout, SLURM) reaches main.py, then its sweep sends one more: the second lands in the
    first one's clean-up. It stops at once, with the first signal's status, and raises nothing."""
    real_header = main.Run.log_header
    monkeypatch.setattr(main.Run, "log_header",
                        lambda self, *args: (real_header(self, *args), os.kill(os.getpid(), signal.SIGTERM)))
    if moment == "while the stop is logged":
        real_message = main.stop_message
        monkeypatch.setattr(main, "stop_message",
                            lambda *args: (os.kill(os.getpid(), signal.SIGINT), real_message(*args))[1])
    else:
        real_rmtree = main.shutil.rmtree
        monkeypatch.setattr(main.shutil, "rmtree",
                            lambda *args, **kwargs: (os.kill(os.getpid(), signal.SIGINT), real_rmtree(*args, **kwargs)))
    code, _ = run_main(tmp_path, tiny_data, *TINY)
    assert code == 128 + signal.SIGTERM


def test_sigterm_to_a_real_process_then_resume_matches_uninterrupted_run(tmp_path, tiny_data):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    flags = ["main.py", "--data_dir", str(tiny_data), *TINY, "--num_epoch", "40", "--dropout", "0.2",
             "--stop_acc", "101"]
    # The uninterrupted run trains on the other core meanwhile; its output goes to a file, which no full pipe blocks.
    straight_log = tmp_path / "straight.log"
    with open(straight_log, "w") as log:
        straight = subprocess.Popen([sys.executable, *flags, "--work_dir", str(tmp_path / "straight")], cwd=REPO,
                                    env=env, stdout=log, stderr=subprocess.STDOUT)
    work = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, *flags, "--work_dir", str(work)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        metrics = list(work.glob("*/metrics.jsonl"))
        if metrics and len(metrics[0].read_text().splitlines()) >= 4:  # into epoch 2
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    run_dir = next(work.iterdir())
    step = main.load_checkpoint(run_dir / "latest_model.pt")["progress"]["step"]
    assert f"Stopped by SIGTERM after step {step}" in out and f"python main.py --resume {run_dir}" in out
    assert not (run_dir / "final.json").exists()
    resumed = subprocess.run([sys.executable, "main.py", "--resume", str(run_dir)], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert straight.wait(timeout=600) == 0, straight_log.read_text()
    assert_same_run(run_dir, next((tmp_path / "straight").iterdir()))


def test_elapsed_time_leaves_out_kernel_builds(tmp_path, tiny_data, monkeypatch):
    """A build that takes a second during the first batch is not counted in elapsed_s."""
    built = [0.0]
    monkeypatch.setattr(main.kernel_loader, "build_seconds", lambda: built[0])
    real_train_batch = main.Run.train_batch

    def first_batch_builds(self, *args):
        if built[0] == 0.0:
            time.sleep(1.0)
            built[0] = 1.0
        return real_train_batch(self, *args)

    monkeypatch.setattr(main.Run, "train_batch", first_batch_builds)
    code, run_dir = run_main(tmp_path, tiny_data, *TINY, "--num_epoch", "1")
    assert code == 0
    assert read_metrics(run_dir)[0]["elapsed_s"] < 0.5


def test_log_and_final_json_say_which_path_computed_each_operator(tmp_path, tiny_data, monkeypatch):
    monkeypatch.setenv("FWP_FORCE_REFERENCE", "1")
    code, run_dir = run_main(tmp_path, tiny_data, "--model_type", "2", "--num_layer", "1", "--hidden_size", "8",
                             "--n_head", "2", "--batch_size", "16", "--num_epoch", "1", "--remove_pos_enc")
    assert code == 0
    path = "PyTorch reference (FWP_FORCE_REFERENCE=1)"
    assert json.loads((run_dir / "final.json").read_text())["operators"] == {"delta_net": path}
    assert (run_dir / "log.txt").read_text().count(f"Operator delta_net: {path}") == 1


def test_empty_data_folder_named_after_a_task_is_generated(tmp_path, tasks_generated):
    """An empty folder (left by an older, non-atomic generation) counts as missing."""
    (tmp_path / "data" / "parity").mkdir(parents=True)
    code, _ = run_main(tmp_path, tmp_path / "data" / "parity", *TINY, "--num_epoch", "1")
    assert code == 0 and tasks_generated == ["parity"]


def test_sigint_closes_wandb_with_the_exit_code(tmp_path, tiny_data, monkeypatch):
    import wandb
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    finished, real_finish = [], wandb.Run.finish

    def spy_finish(self, *args, **kwargs):
        finished.append(kwargs.get("exit_code", args[0] if args else None))
        return real_finish(self, *args, **kwargs)

    monkeypatch.setattr(wandb.Run, "finish", spy_finish)
    real_train_batch = main.Run.train_batch

    def interrupted_at_batch_three(self, *args):
        if self.progress.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real_train_batch(self, *args)

    monkeypatch.setattr(main.Run, "train_batch", interrupted_at_batch_three)
    code, run_dir = run_main(tmp_path, tiny_data, *TINY, "--use_wandb")
    assert code == 130 and finished == [130]
    assert main.load_checkpoint(run_dir / "latest_model.pt")["progress"]["step"] == 3


def test_a_second_signal_while_setting_up_leaves_no_run_directory(tmp_path, tiny_data, monkeypatch, capsys):
    def build_interrupted_twice(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # noted
        os.kill(os.getpid(), signal.SIGINT)  # stops at once
        raise AssertionError("not reached")

    monkeypatch.setattr(main, "build_model", build_interrupted_twice)
    code, run_dir = run_main(tmp_path, tiny_data, *TINY)
    assert code == 130 and run_dir is None
    assert "nothing to resume" in capsys.readouterr().err


def test_code_version_ignores_changes_under_results(tmp_path):
    """Runs write into results/ while they train; that is not a change of the code."""
    (tmp_path / "results").mkdir()
    for path in ("main.py", "results/metrics.jsonl"):
        (tmp_path / path).write_text("1\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    for command in (["init", "-q"], ["add", "."], ["commit", "-qm", "c"]):
        subprocess.run(git + command, check=True)
    head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    (tmp_path / "results" / "metrics.jsonl").write_text("2\n")
    assert main.code_version(str(tmp_path)) == f"git {head}"
    (tmp_path / "main.py").write_text("2\n")
    assert main.code_version(str(tmp_path)) == f"git {head} with uncommitted changes"
    outside = tempfile.mkdtemp()  # /tmp: not inside a git checkout
    assert main.code_version(outside) == "unknown (not a git checkout)"


def test_the_docs_name_the_run_directory_of_every_model():
    text = " ".join((REPO / "docs" / "training.md").read_text().split())
    start = text.index("where `<model>` is one of")
    named = set(re.findall(r"`([a-z0-9-]+)`", text[start:text.index("`<task>`", start)]))
    assert named == set(MODEL_SLUGS.values())
