"""The persistent ClientApp runner's pure parts: the saved context and which runs it refuses.

The runner itself serves every message of the service end-to-end test
(``test_service_e2e.py``), against a real SuperNode and SuperLink.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict

from fleetfl import __version__
from fleetfl.client.runner import FAB_ID, PAGING_FAULTS, ContextStore, refusal, warn_if_paging
from fleetfl.devices.memory_stats import major_faults


def _context(node_id: int = 7, run_id: int = 3, state: RecordDict | None = None) -> Context:
    return Context(run_id=run_id, node_id=node_id, node_config={"data-path": "/d.npz"},
                   state=state if state is not None else RecordDict(), run_config={})


def _state() -> RecordDict:
    residual = ArrayRecord.from_array_dict(
        {"w": Array(np.arange(6, dtype=np.float32).reshape(2, 3))})
    return RecordDict({"ef": residual, "secagg": ConfigRecord({"round": 4})})


def test_a_restarted_device_gets_its_runs_state_back(tmp_path: Path) -> None:
    store = ContextStore(tmp_path)
    store.save(_context(state=_state()))
    fresh = _context()  # what a restarted SuperNode hands over: the same run, no state
    assert store.restore(fresh)
    residual = fresh.state.array_records["ef"]["w"].numpy()
    assert np.array_equal(residual, np.arange(6, dtype=np.float32).reshape(2, 3))
    assert fresh.state["secagg"]["round"] == 4  # type: ignore[index]
    assert store.path(3).stat().st_mode & 0o077 == 0  # secure aggregation secrets inside


def test_the_store_keeps_one_run_and_restores_only_its_own(tmp_path: Path) -> None:
    store = ContextStore(tmp_path)
    store.save(_context(run_id=1, state=_state()))
    store.save(_context(run_id=2, state=_state()))
    assert [p.name for p in tmp_path.glob("context-*.pb")] == ["context-2.pb"]
    assert not store.restore(_context(run_id=1))  # an older run's state is gone
    assert not store.restore(_context(run_id=2, node_id=8))  # another node's
    store.save(_context(run_id=2))  # a state still empty (after registering) restores nothing
    assert not store.restore(_context(run_id=2))
    store.save(_context(run_id=2, state=_state()))
    live = _context(run_id=2, state=RecordDict({"x": ConfigRecord({"a": 1})}))
    assert not store.restore(live) and list(live.state) == ["x"]  # live state wins


def test_a_torn_state_file_is_ignored(tmp_path: Path) -> None:
    store = ContextStore(tmp_path)
    store.path(3).write_bytes(b"\x0a\xff\xff not a proto")
    context = _context()
    assert not store.restore(context) and len(context.state) == 0


def test_the_runner_runs_only_the_same_fleetfl() -> None:
    class Run:
        fab_id, fab_version = FAB_ID, __version__

    assert refusal(Run()) is None  # type: ignore[arg-type]
    Run.fab_version = "0.0.1"
    assert "coordinator runs fleetfl 0.0.1" in str(refusal(Run()))  # type: ignore[arg-type]
    Run.fab_id, Run.fab_version = "someone/else", __version__
    assert "only fleetfl's ClientApp" in str(refusal(Run()))  # type: ignore[arg-type]


def test_reading_pages_back_from_disk_counts_as_major_faults(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(8 << 20))
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())
        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # out of the page cache
        before = major_faults()
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as pages:
            total = sum(pages[i] for i in range(0, len(pages), mmap.PAGESIZE))
    assert total >= 0 and major_faults() > before


def test_a_task_that_pages_is_warned_about(caplog) -> None:
    assert warn_if_paging(PAGING_FAULTS - 1, 2.0) is None
    said = warn_if_paging(PAGING_FAULTS * 5, 3.2)
    assert said is not None and "short of memory" in said and "short of memory" in caplog.text
