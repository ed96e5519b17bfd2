"""Round state: atomic commits in order, resume from the last one, one writer, same config."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np
import pytest

from fleetfl.coordinator.state import (
    STATE_ENV,
    RoundState,
    RoundStore,
    StateError,
    config_changes,
    read_metrics,
)

TASK = {"dataset": "digits", "model": "logreg", "input_shape": [1, 8, 8], "num_classes": 10,
        "num_clients": 3, "seed": 0}
CONFIG = {"task": {"dataset": "digits"}, "federation": {"rounds": 5, "lr": 0.1},
          "output": {"dir": "a"}}


def _state(server_round: int, value: float = 0.0) -> RoundState:
    return RoundState(
        server_round=server_round,
        arrays={"linear.weight": np.full((10, 64), value, np.float32),
                "linear.bias": np.zeros(10, np.float32)},
        task=TASK,
        strategy={"simulated_time_s": 1.5 * server_round},
        pruning={"mask_id": 123, "sparsity": 0.5},
        quantization={"clip": 0.04},
        masks={"linear.weight": np.ones((10, 64), bool)},
        history=[{"round": r, "accuracy": 0.1 * r} for r in range(1, server_round + 1)],
        config=CONFIG,
    )


def test_commit_then_resume_round_trips_everything(tmp_path: Path) -> None:
    store = RoundStore(tmp_path)
    store.acquire()
    store.commit(_state(1, 0.5))
    store.commit(_state(2, 0.7))
    got = RoundStore(tmp_path).resume(CONFIG)
    assert got is not None and got.server_round == 2
    assert list(got.arrays) == ["linear.weight", "linear.bias"]
    np.testing.assert_array_equal(got.arrays["linear.weight"], np.full((10, 64), 0.7, np.float32))
    assert got.strategy == {"simulated_time_s": 3.0}
    assert got.pruning == {"mask_id": 123, "sparsity": 0.5} and got.quantization == {"clip": 0.04}
    assert got.masks is not None and got.masks["linear.weight"].dtype == bool
    assert [r["round"] for r in got.history] == [1, 2]
    assert [r["round"] for r in read_metrics(tmp_path)] == [1, 2]
    assert not list(tmp_path.glob(".*tmp"))  # no temporary files left behind


def test_nothing_committed_means_fresh_start(tmp_path: Path) -> None:
    assert RoundStore(tmp_path).resume(CONFIG) is None
    assert read_metrics(tmp_path) == []


def test_rounds_are_committed_once_and_in_order(tmp_path: Path) -> None:
    store = RoundStore(tmp_path)
    store.acquire()
    store.commit(_state(3))  # a first commit may start anywhere (e.g. an imported model)
    for bad in (3, 2, 5):
        with pytest.raises(StateError, match="cannot follow committed round 3"):
            store.commit(_state(bad))
    store.commit(_state(4))
    assert store.last_round() == 4


def test_commit_needs_the_writer_lock(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="without acquire"):
        RoundStore(tmp_path).commit(_state(1))


def _try_acquire(directory: str, out: multiprocessing.Queue) -> None:
    try:
        RoundStore(directory).acquire()
        out.put("acquired")
    except StateError as err:
        out.put(str(err))


def test_a_second_process_cannot_write(tmp_path: Path) -> None:
    store = RoundStore(tmp_path)
    store.acquire()
    out: multiprocessing.Queue = multiprocessing.get_context("fork").Queue()
    proc = multiprocessing.get_context("fork").Process(target=_try_acquire,
                                                        args=(str(tmp_path), out))
    proc.start()
    proc.join(30)
    assert "in use by another fleetfl ServerApp" in out.get(timeout=5)
    store.release()
    proc = multiprocessing.get_context("fork").Process(target=_try_acquire,
                                                        args=(str(tmp_path), out))
    proc.start()
    proc.join(30)
    assert out.get(timeout=5) == "acquired"


def test_resume_refuses_a_changed_config_but_allows_more_rounds(tmp_path: Path) -> None:
    store = RoundStore(tmp_path)
    store.acquire()
    store.commit(_state(1))
    more_rounds = {**CONFIG, "federation": {"rounds": 9, "lr": 0.1}, "output": {"dir": "b"}}
    assert store.resume(more_rounds) is not None
    other_lr = {**CONFIG, "federation": {"rounds": 5, "lr": 0.2}}
    with pytest.raises(StateError, match=r"different configuration \(federation.lr\)"):
        store.resume(other_lr)
    assert config_changes(CONFIG, other_lr) == ["federation.lr"]


def test_a_key_an_older_fleetfl_did_not_save_counts_as_its_default() -> None:
    from fleetfl.coordinator.config import from_dict

    saved = from_dict({}).to_dict()
    del saved["federation"]["data_partitions"]  # a state written before the key existed
    assert config_changes(saved, from_dict({}).to_dict()) == []
    grown = from_dict({"federation": {"num_clients": 40, "data_partitions": 20}}).to_dict()
    assert config_changes(saved, grown) == ["federation.data_partitions",
                                            "federation.num_clients"]
    # Which engine runs the simulation does not change what it computes.
    ray = from_dict({"federation": {"engine": "ray", "workers": 3}}).to_dict()
    assert config_changes(saved, ray) == []


def test_a_crash_mid_write_keeps_the_previous_commit(tmp_path: Path) -> None:
    store = RoundStore(tmp_path)
    store.acquire()
    store.commit(_state(1, 0.25))
    # What a crash between writing and renaming leaves: a partial temporary file.
    (tmp_path / ".checkpoint.pt.tmp").write_bytes(b"\x80partial")
    got = RoundStore(tmp_path).load()
    assert got is not None and got.server_round == 1
    assert float(got.arrays["linear.weight"][0, 0]) == 0.25


def test_an_unreadable_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(StateError, match="move the file away"):
        RoundStore(tmp_path).load()


def test_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(STATE_ENV, raising=False)
    assert RoundStore.from_env() is None
    monkeypatch.setenv(STATE_ENV, str(tmp_path))
    store = RoundStore.from_env()
    assert store is not None and store.directory == tmp_path / "rounds"


def test_an_empty_checkpoint_is_the_same_clear_error_as_a_truncated_one(tmp_path: Path) -> None:
    store = RoundStore(tmp_path)
    store.acquire()
    store.commit(_state(1))
    whole = (tmp_path / "checkpoint.pt").read_bytes()
    for broken in (b"", whole[: len(whole) // 2]):
        (tmp_path / "checkpoint.pt").write_bytes(broken)
        with pytest.raises(StateError, match=f"truncated, corrupt .*\\({len(broken)} bytes"):
            RoundStore(tmp_path).load()


def test_a_checkpoint_that_is_not_the_committed_one_is_refused(tmp_path: Path) -> None:
    store = RoundStore(tmp_path)
    store.acquire()
    store.commit(_state(1, 0.5))
    store.commit(_state(2, 0.7))
    two = (tmp_path / "checkpoint.pt").read_bytes()
    other = tmp_path / "other"
    other_store = RoundStore(other)
    other_store.acquire()
    other_store.commit(_state(1, 9.0))
    (tmp_path / "checkpoint.pt").write_bytes((other / "checkpoint.pt").read_bytes())
    with pytest.raises(StateError, match="not the checkpoint committed for round 2"):
        RoundStore(tmp_path).load()
    # A crash after the checkpoint of round 3 replaced round 2's, before commit.json: kept.
    (tmp_path / "checkpoint.pt").write_bytes(two)
    import json
    (tmp_path / "commit.json").write_text(json.dumps({"round": 1, "sha256": "0" * 64}))
    got = RoundStore(tmp_path).load()
    assert got is not None and got.server_round == 2


def test_a_corrupted_metrics_file_is_rebuilt_at_resume(tmp_path: Path) -> None:
    store = RoundStore(tmp_path)
    store.acquire()
    store.commit(_state(2))
    (tmp_path / "metrics.jsonl").write_bytes(b'{"round": 1}\n\x00\xffnot json\n{"rou')
    assert read_metrics(tmp_path) == [{"round": 1}]  # readable lines only; no exception
    RoundStore(tmp_path).resume(CONFIG)
    assert [r["round"] for r in read_metrics(tmp_path)] == [1, 2]


def test_a_full_disk_names_the_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from fleetfl.coordinator import checkpoint

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    store = RoundStore(tmp_path)
    store.acquire()
    monkeypatch.setattr(checkpoint, "save_checkpoint", full)
    with pytest.raises(StateError, match=f"the disk holding {tmp_path} is full"):
        store.commit(_state(1))
