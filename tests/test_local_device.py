"""A real device's local task: data from node_config["data-path"], device from ["device"]."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fleetfl.client.local import (
    TaskSettings,
    default_index,
    load_local_task,
    resolve_device,
    write_profile,
)
from fleetfl.devices.profiles import get_profile
from fleetfl.tasks.data_format import DataFormatError, save_npz

SETTINGS = TaskSettings(name="digits", params='{"model": "cnn"}', seed=0, num_clients=3,
                        fleet_mix='{"rpi4": 1}', fleet_seed=0)


@pytest.mark.parametrize("name", ["digits", "synthetic"])
def test_builtin_task_shapes_match_their_data(name: str) -> None:
    """A device checks its data against these without generating the dataset."""
    from fleetfl.tasks.registry import resolve_task

    task = resolve_task(name)
    data = task.federated_data(2, 0)
    assert (task.input_shape, task.num_classes) == (data.input_shape, data.num_classes)


def _shard(tmp_path: Path, n: int = 12) -> Path:
    rng = np.random.default_rng(1)
    return save_npz(tmp_path / "shard.npz", rng.random((n, 1, 8, 8)), rng.integers(0, 10, n))


def test_device_task_reads_data_path_device_and_index(tmp_path: Path) -> None:
    profile = write_profile(tmp_path / "dev.json", get_profile("rpi5"))
    node = {"data-path": str(_shard(tmp_path)), "device": str(profile), "client-index": 7}
    local = load_local_task(SETTINGS, node)
    assert local.index == 7 and local.num_examples == 12
    assert local.device == get_profile("rpi5")
    assert local.input_shape == (1, 8, 8) and local.task.num_classes == 10
    assert tuple(local.x_train.shape) == (12, 1, 8, 8)
    model = local.fresh_model()
    assert model(local.x_train[:2]).shape == (2, 10)


def test_default_index_is_stable_and_non_negative(tmp_path: Path) -> None:
    node = {"data-path": str(_shard(tmp_path)), "device": "rpi4"}
    first = load_local_task(SETTINGS, node).index
    assert first == load_local_task(SETTINGS, node).index == default_index(node["data-path"])
    assert 0 <= first < 2**31


def test_wrong_data_for_the_task_is_a_clear_error(tmp_path: Path) -> None:
    path = save_npz(tmp_path / "flat.npz", np.zeros((4, 64)), np.zeros(4))
    with pytest.raises(DataFormatError, match="the task needs"):
        load_local_task(SETTINGS, {"data-path": str(path), "device": "rpi4"})


def test_no_data_at_all_names_both_keys() -> None:
    with pytest.raises(ValueError, match="neither 'data-path'.*nor 'partition-id'"):
        load_local_task(SETTINGS, {})


def test_resolve_device_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_device("rpi3") == get_profile("rpi3")
    inline = json.dumps(get_profile("phone-low").to_dict())
    assert resolve_device(inline) == get_profile("phone-low")
    with pytest.raises(ValueError, match="unknown device profile"):
        resolve_device("toaster")
    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "x"}')
    with pytest.raises(ValueError, match="not a valid device profile.*missing"):
        resolve_device(str(bad))
    cache = write_profile(tmp_path / "cache.json", get_profile("jetson-nano"))
    monkeypatch.setenv("FLEETFL_DEVICE_CACHE", str(cache))
    assert resolve_device("auto") == get_profile("jetson-nano")  # cached: no benchmark


def test_register_path_imports_neither_torch_nor_sklearn(tmp_path: Path) -> None:
    """A fresh ClientApp process answers `register` with numpy only (import cost, issue 6)."""
    profile = write_profile(tmp_path / "dev.json", get_profile("rpi4"))
    code = (
        "import sys\n"
        "from fleetfl.client.local import load_local_task, TaskSettings\n"
        f"s = TaskSettings(**{SETTINGS.__dict__!r})\n"
        f"t = load_local_task(s, {{'data-path': {str(_shard(tmp_path))!r}, "
        f"'device': {str(profile)!r}}})\n"
        "print(t.num_examples, 'torch' in sys.modules, 'sklearn' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    assert out == ["12", "False", "False"]
