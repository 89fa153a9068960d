"""scripts/bench_train.py: its FLOP count and one short run of the whole benchmark (nothing here is timed)."""
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import data
import main as train_main
from model import build_model
from utils import sequence_loss

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import bench_train  # noqa: E402


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    directory = tmp_path_factory.mktemp("data") / "parity"
    data.write_task("parity", directory)
    return directory


def lstm_model(dataset, hidden, layers):
    flags = train_main.build_parser().parse_args(
        ["--model_type", "0", "--num_layer", str(layers), "--hidden_size", str(hidden), "--emb_size", "32"])
    torch.manual_seed(0)
    return build_model(flags, len(dataset.src_vocab) + 1, len(dataset.tgt_vocab) + 1)


@pytest.mark.parametrize("hidden, layers", [(16, 1), (24, 2)])
def test_the_lstm_gate_products_are_added_to_what_the_counter_sees(parity, hidden, layers):
    dataset = data.load_data(parity)
    train = dataset.splits["train"]
    indices = torch.arange(8)
    model = lstm_model(dataset, hidden, layers)
    src, tgt = train.batch(indices)
    counter = FlopCounterMode(display=False)
    with counter:
        sequence_loss(model(src), tgt, dataset.tgt_pad).backward()
    lstm = next(m for m in model.modules() if isinstance(m, torch.nn.LSTM))
    widths = [lstm.input_size] + [hidden] * (layers - 1)
    # forward 2 * 4H * (input + H) per token and layer, backward twice that
    gates = sum(3 * 2 * 4 * hidden * (width + hidden) * src.numel() for width in widths)

    assert bench_train.step_flops(model, train, indices, dataset.tgt_pad) == counter.get_total_flops() + gates
    assert all(p.grad is None for p in model.parameters())


def test_one_run_prints_a_row_per_model_with_its_ratios_to_the_lstm(parity, capsys):
    bench_train.main(["--data_dir", str(parity), "--models", "0", "8", "--steps", "1"])
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in capsys.readouterr().out.splitlines()
            if line.startswith("| LSTM (0)") or line.startswith("| Linear Transformer (8)")}
    assert set(rows) == {"LSTM (0)", "Linear Transformer (8)"}
    assert rows["LSTM (0)"][5] == "1.00x" and rows["LSTM (0)"][7] == "1.00x"
    # hparams.csv: two layers of width 64 with a 4x feed-forward block against one LSTM layer of 64 units on
    # 128-wide embeddings, which the README's table reports as twice the products
    assert float(rows["Linear Transformer (8)"][7].rstrip("x")) == pytest.approx(2.0, abs=0.1)
