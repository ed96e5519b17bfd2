"""A task whose inputs are integer token ids (not float32 features) runs every capability.

``TokenTask`` is a user's text-like task: sequences of uint8 ids, an ``nn.Embedding`` and an
``nn.LSTM``, the label a function of the last token. Through the real round loop it trains
with the LSTM's weights pruned, int8 updates and secure aggregation; the start-up traces (FLOPs,
training memory) are fed ids of the task's dtype; a device's ``.npz`` of ids is read as ids.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from loopback import LoopbackGrid
from torch import nn

import fleetfl
from fleetfl.coordinator.config import load_config
from fleetfl.coordinator.server_app import RunOutcome, run_rounds
from fleetfl.devices.memory_stats import training_memory_stats
from fleetfl.tasks.char_lstm import CharLSTM
from fleetfl.tasks.data_format import DataFormatError, save_npz
from fleetfl.tasks.models import forward_flops_per_sample

VOCAB, SEQ, CLASSES = 16, 10, 4


class TokenTask(fleetfl.Task):
    """Label = last token mod 4; ids uint8 in [0, 16)."""

    input_shape = (SEQ,)
    num_classes = CLASSES
    input_dtype = "uint8"

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return CharLSTM(VOCAB, embed=8, hidden=16, layers=1, classes=CLASSES)

    def federated_data(self, num_clients: int, seed: int) -> fleetfl.FederatedDataset:
        rng = np.random.default_rng(seed)

        def split(labels: np.ndarray) -> fleetfl.Split:
            x = rng.integers(0, VOCAB, (len(labels), SEQ)).astype(np.uint8)
            x[:, -1] = labels + CLASSES * rng.integers(0, VOCAB // CLASSES, len(labels))
            return fleetfl.Split(x=x, y=labels.astype(np.int64))

        clients = tuple((split(rng.choice(CLASSES, 80, p=rng.dirichlet([0.5] * CLASSES))),
                         split(rng.integers(0, CLASSES, 20))) for _ in range(num_clients))
        return fleetfl.FederatedDataset(name="tokens", clients=clients,
                                        test=split(rng.integers(0, CLASSES, 400)),
                                        input_shape=(SEQ,), num_classes=CLASSES)


def test_a_token_task_learns_with_pruned_lstm_int8_and_secure_aggregation() -> None:
    cfg = load_config(None, [
        "task.name=test_token_task:TokenTask", "federation.num_clients=6",
        "federation.clients_per_round=6", "federation.rounds=10", "federation.local_epochs=3",
        "federation.lr=0.5", "fleet.mix={rpi4=1}", "compression.update_bits=8",
        "compression.prune_final_sparsity=0.5", "compression.prune_end_round=6",
        "secagg.enabled=true", "federation.evaluate_every=10"])
    outcome = RunOutcome()
    run_rounds(LoopbackGrid(cfg.federation.num_clients), cfg, outcome)
    first, last = outcome.initial, outcome.rows[-1]
    assert last["accuracy"] > max(0.8, first["accuracy"] + 0.4), (first, last)
    assert last["fed_clients"] == last["selected"] >= 4 and last["fed_accuracy"] > 0.7
    assert all(r["secagg_aborted"] == 0 and r["aggregated"] == r["selected"] for r in outcome.rows)
    names = ["embed.weight", "lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.bias_ih_l0",
             "lstm.bias_hh_l0", "head.weight", "head.bias"]
    arrays = dict(zip(names, outcome.final_arrays.to_numpy_ndarrays(), strict=True))
    prunable = [arrays[k] for k in ("lstm.weight_ih_l0", "lstm.weight_hh_l0", "head.weight")]
    zeros = sum(int((a == 0).sum()) for a in prunable) / sum(a.size for a in prunable)
    assert zeros == pytest.approx(0.5, abs=0.01)  # global magnitude pruning, LSTM included
    assert all((a == 0).any() for a in prunable)
    assert (arrays["embed.weight"] != 0).all()  # embeddings stay dense


def test_lstm_flops_are_counted_from_the_operators() -> None:
    model = CharLSTM(80, embed=8, hidden=256, layers=2)
    # Per step and layer: 4 gates x hidden x (input + hidden) MACs; 2 FLOPs per MAC.
    per_step = 4 * 256 * (8 + 256) + 4 * 256 * (256 + 256)
    expected = 2 * (80 * per_step + 256 * 80)
    assert forward_flops_per_sample(model, (80,), "uint8") == expected


def test_training_memory_is_traced_on_ids_of_the_tasks_dtype() -> None:
    model = TokenTask().build_model(0)
    stats = training_memory_stats(model, (SEQ,), input_dtype="uint8")
    assert stats.plain.saved_per_sample > 0  # the LSTM keeps its gates for backward


def test_a_devices_ids_are_read_as_ids_and_floats_are_refused(tmp_path) -> None:
    task = TokenTask()
    ids = np.arange(2 * SEQ, dtype=np.int32).reshape(2, SEQ) % VOCAB
    path = save_npz(tmp_path / "ids.npz", ids, np.array([0, 1]), ids, np.array([1, 0]))
    assert task.load_local(path).x.dtype == np.uint8
    assert np.array_equal(task.load_local_test(path).x, ids)
    save_npz(tmp_path / "big.npz", ids + 300, np.array([0, 1]))
    with pytest.raises(DataFormatError, match="ids in \\[300, 315\\]"):
        task.load_local(tmp_path / "big.npz")
    save_npz(tmp_path / "floats.npz", ids.astype(np.float32) + 0.5, np.array([0, 1]))
    with pytest.raises(DataFormatError, match="integer ids"):
        task.load_local(tmp_path / "floats.npz")
    # A float task still reads integer features (pixel counts, say) as float32.
    assert fleetfl.Task().load_local(path).x.dtype == np.float32


def test_a_token_model_exports_to_onnx_with_id_inputs(tmp_path) -> None:
    from fleetfl.client.runtime import load_runtime
    from fleetfl.compression.export_onnx import export_onnx

    task = TokenTask()
    model, data = task.build_model(0), task.federated_data(2, seed=0)
    x = data.test.x
    for int8 in (False, True):
        path = export_onnx(model, tmp_path / f"m{int8}.onnx", input_shape=(SEQ,), int8=int8,
                           calibration=x[:64], input_dtype="uint8")
        runtime = load_runtime(path)
        assert runtime.input_dtype == "uint8"
        with torch.no_grad():
            expected = model(torch.from_numpy(x)).numpy()
        got = runtime.predict(x)
        assert (got.argmax(1) == expected.argmax(1)).mean() > (0.95 if int8 else 0.999)
