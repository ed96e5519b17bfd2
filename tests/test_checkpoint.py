"""Checkpoints: atomic writes, weights_only loading, validation, model rebuilding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fleetfl.coordinator.checkpoint import (
    FORMAT,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from fleetfl.tasks.models import build_model

TASK = {"dataset": "digits", "model": "cnn", "alpha": 1.0, "beta": 1.0, "iid": False,
        "partition_alpha": 0.5, "seed": 0, "num_clients": 20, "input_shape": [1, 8, 8],
        "num_classes": 10}


def _save(path: Path, **overrides: object) -> Path:
    model = build_model("cnn", (1, 8, 8), 10, seed=3)
    kwargs: dict = {"state_dict": model.state_dict(), "task": TASK, "server_round": 7,
                    "quantization": {"qat": True, "weight_bits": 8}}
    kwargs.update(overrides)
    return save_checkpoint(path, **kwargs)


def test_round_trip(tmp_path: Path) -> None:
    model = build_model("cnn", (1, 8, 8), 10, seed=3)
    mask = np.ones((64, 512), dtype=bool)
    mask[:, ::2] = False
    state = {"momentum": np.arange(6, dtype=np.float32).reshape(2, 3), "step": np.int64(4),
             "history": [0.5, (1, "a")], "name": None}
    path = _save(tmp_path / "run" / "model.pt", masks={"classifier.1.weight": mask},
                 strategy_state=state)
    ckpt = load_checkpoint(path)
    assert ckpt.server_round == 7
    assert ckpt.task == TASK
    assert ckpt.quantization == {"qat": True, "weight_bits": 8}
    assert all(torch.equal(ckpt.state_dict[k], v) for k, v in model.state_dict().items())
    assert ckpt.masks is not None and ckpt.masks["classifier.1.weight"].dtype == bool
    assert np.array_equal(ckpt.masks["classifier.1.weight"], mask)
    assert ckpt.strategy_state is not None
    assert np.array_equal(ckpt.strategy_state["momentum"], state["momentum"])
    assert ckpt.strategy_state["step"] == 4
    assert ckpt.strategy_state["history"] == [0.5, (1, "a")]
    assert ckpt.input_shape == (1, 8, 8)


def test_build_model_applies_masks(tmp_path: Path) -> None:
    mask = np.zeros((64, 512), dtype=bool)
    mask[:3] = True
    model = load_checkpoint(_save(tmp_path / "m.pt", masks={"classifier.1.weight": mask}))
    model = model.build_model()
    weight = model.classifier[1].weight.detach().numpy()
    assert np.count_nonzero(weight) == np.count_nonzero(weight[:3]) > 0
    assert not model.training
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_bad_masks_are_named(tmp_path: Path) -> None:
    bad_shape = load_checkpoint(_save(tmp_path / "a.pt", masks={"classifier.1.weight":
                                                              np.ones((2, 2), bool)}))
    with pytest.raises(CheckpointError, match="classifier.1.weight.*shape"):
        bad_shape.build_model()
    unknown = load_checkpoint(_save(tmp_path / "b.pt", masks={"nope": np.ones(3, bool)}))
    with pytest.raises(CheckpointError, match="nope"):
        unknown.build_model()


def test_write_is_atomic_and_overwrites(tmp_path: Path) -> None:
    path = _save(tmp_path / "model.pt", server_round=1)
    _save(path, server_round=2)
    assert load_checkpoint(path).server_round == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temporary left


def test_failed_write_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    path = _save(tmp_path / "model.pt", server_round=1)
    with pytest.raises(TypeError, match=r"strategy_state\.opt"):
        _save(path, server_round=2, strategy_state={"opt": object()})
    assert load_checkpoint(path).server_round == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_task_must_describe_the_model(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_classes"):
        _save(tmp_path / "m.pt", task={"dataset": "digits", "model": "cnn",
                                       "input_shape": [1, 8, 8]})


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "absent.pt")


def test_foreign_files_are_rejected(tmp_path: Path) -> None:
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="not a fleetfl checkpoint"):
        load_checkpoint(text)
    other = tmp_path / "other.pt"
    torch.save({"model": {}}, other)
    with pytest.raises(CheckpointError, match="format field"):
        load_checkpoint(other)


class _Evil:
    def __reduce__(self) -> tuple:
        return (print, ("pwned",))


def test_pickled_code_is_not_executed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    evil = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "version": 1, "payload": _Evil()}, evil)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(evil)
    assert "pwned" not in capsys.readouterr().out


def test_unsupported_version(tmp_path: Path) -> None:
    path = tmp_path / "future.pt"
    torch.save({"format": FORMAT, "version": 99, "state_dict": {}, "task": TASK,
                "server_round": 0}, path)
    with pytest.raises(CheckpointError, match="version 99 is not supported"):
        load_checkpoint(path)


def test_weights_that_do_not_fit_the_model(tmp_path: Path) -> None:
    logreg = build_model("logreg", (1, 8, 8), 10).state_dict()
    ckpt = load_checkpoint(_save(tmp_path / "m.pt", state_dict=logreg))
    with pytest.raises(CheckpointError, match="do not fit the model of task 'digits'"):
        ckpt.build_model()
