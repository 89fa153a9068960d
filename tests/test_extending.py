"""docs/extending.md's three walk-throughs, each as it is written there: a task is one entry of data.TASK_REGISTRY,
an operator with only a reference loop goes through kernel_loader.run_fused like the others (no build attempted, no
warning, the run log says "reference"), and a model is one entry of model.MODELS; main.py then generates the task and
trains the model on it for two steps."""
import json
import warnings

import torch

import data
import kernel_loader
import main
import model


# 1. A task: its sampler and targets, and one registry entry.
def toy_words(rng, num, lower, upper):
    return [rng.choices("ab", k=rng.randint(lower, upper)) for _ in range(num)]


def toy_targets(word):
    """The number of a's so far is odd (o) or even (e)."""
    states, odd = [], False
    for token in word:
        odd ^= token == "a"
        states.append("o" if odd else "e")
    return states


TOY_TASK = data.Task("toy-parity", "toy", "uniform", toy_words, toy_targets)


# 2. An operator with a reference loop only: W_t = W_{t-1} / 2 + outer(k_t, v_t), out_t = q_t @ W_t.
def halving_sum_reference(q, k, v, W0):
    W, outs = W0, []
    for t in range(q.shape[2]):
        W = 0.5 * W + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append(torch.einsum("bhe,bhem->bhm", q[:, :, t], W))
    return torch.stack(outs, dim=2)


def halving_sum(q, k, v, W0):
    return kernel_loader.run_fused("toy_ops", "halving_sum", halving_sum_reference, 3, q, k, v, W0,
                                   num_sequences=3, kernel_devices=())


# 3. A model: its block, and one registry entry.
class HalvingSumBlock(model.ProjectedFastWeightBlock):
    def head_slices(self, head_dim):
        return (head_dim, head_dim, head_dim)

    def fast_weight(self, q, k, v):
        return halving_sum(q, k, v, self.zero_fast_weights(q))


TOY_MODEL = model.ModelSpec(99, "Halving Sum", "halving-sum", model.FastWeightBuilder(HalvingSumBlock),
                            operator="halving_sum", in_paper=False)


def register(monkeypatch):
    """What adding the entries in data.py and model.py does (the views of MODELS are built from it at import)."""
    monkeypatch.setitem(data.TASK_REGISTRY, TOY_TASK.name, TOY_TASK)
    monkeypatch.setitem(model.MODELS, TOY_MODEL.id, TOY_MODEL)
    monkeypatch.setitem(model.MODEL_NAMES, TOY_MODEL.id, TOY_MODEL.name)
    monkeypatch.setitem(model.MODEL_SLUGS, TOY_MODEL.id, TOY_MODEL.slug)


def test_a_new_task_operator_and_model_train_through_main(tmp_path, monkeypatch):
    register(monkeypatch)
    monkeypatch.delenv(kernel_loader.FORCE_REFERENCE_ENV, raising=False)
    data_dir = tmp_path / "data" / TOY_TASK.name  # missing and named after the task: main.py generates it
    argv = ["--data_dir", str(data_dir), "--model_type", str(TOY_MODEL.id), "--num_layer", "1", "--hidden_size", "8",
            "--n_head", "2", "--batch_size", "5000", "--num_epoch", "1", "--learning_rate", "1e-2",
            "--remove_pos_enc", "--work_dir", str(tmp_path / "runs"), "--device", "cpu"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "could not build" for an operator without kernels
        assert main.main(argv) == 0
    assert (data_dir / "train_50.tgt").read_text().split("\n")[0] == " ".join(
        toy_targets((data_dir / "train_50.src").read_text().split("\n")[0].split(" ")))
    [run_dir] = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith(f"{TOY_MODEL.slug}-{TOY_TASK.name}-")
    final = json.loads((run_dir / "final.json").read_text())
    assert final["operators"] == {"halving_sum": "PyTorch reference (no CPU kernel)"}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 2 and records[-1]["end_of_epoch"]  # 10000 lines in batches of 5000
    assert "Operator halving_sum: PyTorch reference (no CPU kernel)" in (run_dir / "log.txt").read_text()
