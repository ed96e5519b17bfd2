"""The places fleetfl changes how Flower waits, checked against the pinned Flower.

* :mod:`fleetfl.coordinator.grid`: the ServerApp pulls replies every 0.1 s, not every 3 s.
* :mod:`fleetfl.client.supernode`: a device's SuperNode heartbeats every 10 s, not 30 s, and
  polls every 0.5 s when idle, not 3 s.

The service end-to-end test (``test_service_e2e.py``) runs both for real.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
import time
from collections.abc import Iterable

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fleetfl.coordinator.grid import PollingGrid, fast_polling


def _fresh_python(code: str) -> str:
    """``code``'s stdout (stripped) from a fresh interpreter, so the patches it applies stay
    out of this test process."""
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                          text=True, timeout=120).stdout.strip()


class _SlowRepliesGrid(Grid):
    """Each pushed message's reply becomes pullable ``delay_s`` after the push (or never)."""

    def __init__(self, delay_s: dict[int, float | None]) -> None:
        self.delay_s, self.ready, self.pulls = delay_s, {}, 0
        self.sent: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:  # pragma: no cover - not used
        raise NotImplementedError

    @property
    def run(self) -> Run:  # pragma: no cover - not used
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id=dst_node_id, message_type=message_type)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.delay_s)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{i}"
            self.sent[f"m{i}"] = msg
            delay = self.delay_s[msg.metadata.dst_node_id]
            if delay is not None:
                self.ready[f"m{i}"] = time.monotonic() + delay
            ids.append(f"m{i}")
        return ids

    def send_and_receive(self, messages, *, timeout=None):  # pragma: no cover - not used
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.pulls += 1
        now, out = time.monotonic(), []
        for mid in list(message_ids):
            if mid in self.ready and self.ready[mid] <= now:
                del self.ready[mid]
                out.append(Message(RecordDict({"c": ConfigRecord({"ok": 1})}),
                                   reply_to=self.sent[mid]))
        return out


def _messages(nodes: Iterable[int]) -> list[Message]:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    return [Message(RecordDict(), dst_node_id=n, message_type="query") for n in nodes]


def test_polling_grid_returns_soon_after_the_last_reply() -> None:
    inner = _SlowRepliesGrid({1: 0.1, 2: 0.6})
    start = time.monotonic()
    replies = list(PollingGrid(inner, poll_s=0.05).send_and_receive(_messages([1, 2]),
                                                                    timeout=30))
    elapsed = time.monotonic() - start
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1"]
    assert 0.6 <= elapsed < 2.0  # Flower's own loop would sleep 3 s after the first pull
    assert inner.pulls >= 3


def test_polling_grid_gives_up_at_the_timeout_with_what_it_has() -> None:
    inner = _SlowRepliesGrid({1: 0.0, 2: None})  # node 2 never answers
    start = time.monotonic()
    replies = list(PollingGrid(inner, poll_s=0.05).send_and_receive(_messages([1, 2]),
                                                                    timeout=0.5))
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert 0.5 <= time.monotonic() - start < 2.0


def test_only_flowers_network_grid_is_wrapped() -> None:
    inner = _SlowRepliesGrid({})
    assert fast_polling(inner) is inner
    with pytest.raises(ValueError, match="poll_s"):
        PollingGrid(inner, poll_s=0)


def test_supernode_heartbeat_interval_reaches_flowers_requests() -> None:
    """The globals we set are the ones Flower 1.42's SuperNode sends and paces by."""
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection

    assert "heartbeat_interval=HEARTBEAT_DEFAULT_INTERVAL" in inspect.getsource(
        fleet_http_connection)
    assert "HEARTBEAT_DEFAULT_INTERVAL - HEARTBEAT_CALL_TIMEOUT" in inspect.getsource(heartbeat)
    # In a fresh process, so this test process keeps Flower's defaults.
    code = ("from fleetfl.client.supernode import set_heartbeat_interval as s; s(); "
            "import flwr.supernode.fleet_http_connection as c, flwr.supercore.heartbeat as h; "
            "print(c.HEARTBEAT_DEFAULT_INTERVAL, h.HEARTBEAT_DEFAULT_INTERVAL)")
    assert _fresh_python(code).split() == ["10.0", "10.0"]


def test_supernode_heartbeat_retries_back_off_at_most_4_s() -> None:
    """Flower 1.42 backs off up to 20 s; ours stays inside the SuperLink's 20 s patience."""
    from flwr.supercore import heartbeat

    assert "exponential(max_delay=20)" in inspect.getsource(heartbeat.HeartbeatSender)
    code = ("from fleetfl.client.supernode import bound_heartbeat_retries as b; b(); b(); "
            "from flwr.supercore.heartbeat import HeartbeatSender; import itertools; "
            "gen = HeartbeatSender(lambda: True)._retry_invoker.wait_gen_factory(); "
            "print(max(itertools.islice(gen, 30)))")
    assert float(_fresh_python(code)) == 4.0


def test_supernode_heartbeat_interval_outside_flowers_range_is_refused() -> None:
    from fleetfl.client.supernode import set_heartbeat_interval

    with pytest.raises(ValueError, match="outside"):
        set_heartbeat_interval(5.0)


def test_supernode_idle_poll_is_the_sleep_we_remap() -> None:
    """Flower 1.42's SuperNode loop sleeps 3 s when idle and 0.5 s waiting for a reply."""
    from flwr.supernode import start_client_internal as loop

    source = inspect.getsource(loop)
    assert "import time" in source
    assert source.count("time.sleep(3)") == 1  # nothing was pulled: wait before pulling again
    assert "time.sleep(0.5)" in inspect.getsource(loop._push_messages)


def test_supernode_idle_poll_remaps_only_flowers_two_sleeps() -> None:
    code = ("import threading, time; slept = []; time.sleep = slept.append\n"
            "import fleetfl.client.supernode as sn; sn.set_poll_interval(0.25, 0.02, 0.1)\n"
            "import flwr.supernode.start_client_internal as m\n"
            "m.time.sleep(3); m.time.sleep(0.5); m.time.sleep(1.5)\n"
            "m._pull_and_store_message = lambda *a, **k: 5\n"  # a message came in...
            "sn.notify_on_message(threading.Event()); m._pull_and_store_message()\n"
            "m.time.sleep(3)\n"  # ...so the next idle poll is the busy one
            "print(slept, m.time.monotonic() > 0)")
    assert _fresh_python(code) == "[0.25, 0.02, 1.5, 0.1] True"


def test_supernode_poll_outside_range_is_refused() -> None:
    from fleetfl.client.supernode import set_poll_interval

    for idle, reply, busy in ((0.0, 0.0, 0.1), (5.0, 0.05, 0.1), (0.1, 0.2, 0.1),
                              (0.5, 0.05, 1.0)):
        with pytest.raises(ValueError, match="poll intervals"):
            set_poll_interval(idle, reply, busy)


def test_supernode_launcher_splits_its_flags_from_flowers() -> None:
    from fleetfl.client.supernode import _our_args, _runtime_address

    ours, rest = _our_args(["--state-dir", "/w/state", "--poll-s", "0.3", "--superlink",
                            "h:1", "--isolation", "process", "--port", "9111"])
    assert (str(ours.state_dir), ours.poll_s) == ("/w/state", 0.3)
    assert rest == ["--superlink", "h:1", "--isolation", "process", "--port", "9111"]
    assert _runtime_address(rest) == "127.0.0.1:9111"
    assert _runtime_address(["--superlink", "h:1"]) is None  # Flower's own subprocess mode


def test_object_pulls_are_the_three_callers_of_flowers_pull_objects() -> None:
    """Every module of Flower 1.42 that calls pull_objects imports it by name (so the swap
    reaches it), and the swap keeps Flower's function with a 0.25 s first retry."""
    code = ("from fleetfl.object_pulls import DEVICE_MODULES, "
            "SERVERAPP_MODULES, fast_object_pulls as f, bounded_runner_pulls as b\n"
            "import importlib\n"
            "mods = DEVICE_MODULES + SERVERAPP_MODULES\n"
            "f(*mods); f(*mods); b(); b()\n"  # idempotent
            "r = importlib.import_module('flwr.supernode.runtime.run_clientapp')\n"
            "k = r.pull_and_inflate_object_from_tree.keywords\n"
            "assert (k['max_time'], k['initial_backoff']) == (20.0, 0.25), k\n"
            "from flwr.supercore.inflatable import inflatable_utils as u\n"
            "print(sorted({(importlib.import_module(m).pull_objects.keywords['initial_backoff'],"
            " importlib.import_module(m).pull_objects.func.__module__) for m in mods}))")
    assert _fresh_python(code) == "[(0.25, 'flwr.supercore.inflatable.inflatable_utils')]"
    import pathlib

    import flwr

    callers = sorted(str(p.relative_to(pathlib.Path(flwr.__file__).parent))
                     for p in pathlib.Path(flwr.__file__).parent.rglob("*.py")
                     if "pull_objects(" in p.read_text() and "tests" not in p.parts
                     and not p.name.endswith("_test.py"))
    assert callers == ["supercore/inflatable/inflatable_utils.py", "superlink/grid/http_grid.py",
                       "supernode/start_client_internal.py"]


def test_the_runner_is_woken_when_the_supernode_stored_a_message() -> None:
    from flwr.supernode import start_client_internal as loop

    assert "run_id = _pull_and_store_message(" in inspect.getsource(loop.start_client_internal)
    code = ("import threading\n"
            "import flwr.supernode.start_client_internal as m\n"
            "answers = iter([None, 7])\n"
            "m._pull_and_store_message = lambda *a, **k: next(answers)\n"
            "from fleetfl.client.supernode import notify_on_message\n"
            "e = threading.Event(); notify_on_message(e); notify_on_message(e)\n"
            "first = m._pull_and_store_message(); woke_first = e.is_set()\n"
            "second = m._pull_and_store_message()\n"
            "print(first, woke_first, second, e.is_set())")
    assert _fresh_python(code) == "None False 7 True"
