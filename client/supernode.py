"""``flower-supernode`` tuned for a device: one process, a fast poll, a 10-second heartbeat.

``python -m fleetfl.client.supernode [--state-dir DIR] [--poll-s S] [flower-supernode args]``
runs the unmodified ``flower-supernode`` entry point after these changes, each isolated here
and checked against the pinned Flower by ``tests/test_flower_patches.py``:

* **One process.** With ``--isolation process`` among Flower's arguments, a
  :class:`~fleetfl.client.runner.AppRunner` thread in this same process answers every message
  (Flower would start ``flower-superexec`` plus one ``flwr-clientapp`` process per message:
  ~730 MB and ~2.5 s of imports each time; see ``client/runner.py``).
* **Objects pulled with a 0.25 s first retry** (:mod:`fleetfl.object_pulls`), not 1 s.
* **The runner wakes when a message is in** (:func:`notify_on_message`), not on a timer.
* **A faster idle poll.** Flower's SuperNode loop sleeps a hard-coded 3 s when the SuperLink
  has no message for it, and 0.5 s between checks for its ClientApp's reply
  (``flwr/supernode/start_client_internal.py``); no flag sets either. :func:`set_poll_interval`
  gives that module a ``time`` whose ``sleep(3)`` sleeps ``poll_s`` (default 0.5 s: one small
  HTTPS request per device per 0.5 s while idle; 0.2 s for 10 s after a message came in, when
  the round's next message is due) and ``sleep(0.5)`` sleeps 0.05 s.
* **A 10-second heartbeat**, so a dead device is noticed within 20 s. A SuperNode promises the
  SuperLink a heartbeat every ``HEARTBEAT_DEFAULT_INTERVAL`` seconds (30 in Flower 1.42) and
  the SuperLink declares the node offline after ``HEARTBEAT_PATIENCE`` (2) intervals without
  one; only then does it answer the node's pending messages with "node unavailable". Flower has
  no flag for the interval, so :func:`set_heartbeat_interval` sets the two module globals that
  carry it: ``flwr.supernode.fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL`` (the promise)
  and ``flwr.supercore.heartbeat.HEARTBEAT_DEFAULT_INTERVAL`` (the sender's cadence, every
  (interval − 5 s) × 0.7–0.9, i.e. ~4 s at 10 s). 10 s is the smallest interval the SuperLink
  accepts (``HEARTBEAT_MIN_INTERVAL``).
* **Heartbeat retries at most 4 s apart.** Flower retries a failed heartbeat with exponential
  backoff up to 20 s (``flwr.supercore.heartbeat.HeartbeatSender``). While the coordinator
  restarts, the backoff grows; once it is back, the next try could come 20 s later, and with a
  10 s promise the SuperLink then declares the node offline (seen in the service test: a device
  dropped from the first round after a coordinator restart). :func:`bound_heartbeat_retries`
  caps the backoff at ``HEARTBEAT_RETRY_MAX_S``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import threading
import time
import types
from pathlib import Path

from fleetfl.logs import log_to_stderr
from fleetfl.object_pulls import DEVICE_MODULES, bounded_runner_pulls, fast_object_pulls

HEARTBEAT_INTERVAL_S = 10.0
HEARTBEAT_RETRY_MAX_S = 4.0  # well inside the SuperLink's patience of 2 x 10 s
IDLE_POLL_S = 0.5
BUSY_POLL_S = 0.2
BUSY_WINDOW_S = 10.0  # seconds after a message during which the SuperNode polls faster
REPLY_POLL_S = 0.05
_FLOWER_IDLE_SLEEP_S = 3  # the literals in flwr/supernode/start_client_internal.py
_FLOWER_REPLY_SLEEP_S = 0.5
_LOOP_MODULE = "flwr.supernode.start_client_internal"
_MODULES = ("flwr.supernode.fleet_http_connection", "flwr.supercore.heartbeat")


def set_heartbeat_interval(seconds: float = HEARTBEAT_INTERVAL_S) -> None:
    """Make this process's SuperNode promise (and send) a heartbeat every ``seconds``.

    Raises ``ValueError`` outside the range the SuperLink accepts, ``AttributeError`` if the
    installed Flower no longer has the globals (the pin in pyproject.toml prevents that).
    """
    from flwr.common import constant

    if not constant.HEARTBEAT_MIN_INTERVAL <= seconds <= constant.HEARTBEAT_MAX_INTERVAL:
        raise ValueError(f"heartbeat interval {seconds} s is outside the SuperLink's range "
                         f"[{constant.HEARTBEAT_MIN_INTERVAL}, {constant.HEARTBEAT_MAX_INTERVAL}]")
    for name in _MODULES:
        module = importlib.import_module(name)
        if not hasattr(module, "HEARTBEAT_DEFAULT_INTERVAL"):
            raise AttributeError(f"{name} has no HEARTBEAT_DEFAULT_INTERVAL: not Flower 1.42?")
        module.HEARTBEAT_DEFAULT_INTERVAL = seconds  # type: ignore[attr-defined]


def bound_heartbeat_retries(max_delay_s: float = HEARTBEAT_RETRY_MAX_S) -> None:
    """Cap the backoff between this process's heartbeat retries at ``max_delay_s`` seconds
    (Flower: 20 s), for every ``HeartbeatSender`` created from now on."""
    from flwr.supercore import heartbeat
    from flwr.supercore.retry import exponential

    sender = heartbeat.HeartbeatSender
    if getattr(sender.__init__, "_fleetfl_bounded", False):
        return
    original = sender.__init__

    def __init__(self: heartbeat.HeartbeatSender, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)
        self._retry_invoker.wait_gen_factory = lambda: exponential(max_delay=max_delay_s)

    __init__._fleetfl_bounded = True  # type: ignore[attr-defined]
    sender.__init__ = __init__  # type: ignore[method-assign]


def set_poll_interval(idle_s: float = IDLE_POLL_S, reply_s: float = REPLY_POLL_S,
                      busy_s: float = BUSY_POLL_S) -> None:
    """Make this process's SuperNode loop sleep ``idle_s`` (not 3 s) when the SuperLink had no
    message, ``busy_s`` instead within ``BUSY_WINDOW_S`` of the last message it received (a
    round's next message, e.g. a secure aggregation stage, comes within seconds), and
    ``reply_s`` (not 0.5 s) between checks for a reply. Other sleeps unchanged."""
    if not 0 < reply_s <= idle_s <= _FLOWER_IDLE_SLEEP_S or not 0 < busy_s <= idle_s:
        raise ValueError(f"poll intervals must satisfy 0 < {reply_s} <= {idle_s} <= "
                         f"{_FLOWER_IDLE_SLEEP_S} s and 0 < {busy_s} <= {idle_s}")
    module = importlib.import_module(_LOOP_MODULE)
    if getattr(module, "time", None) is not time and not isinstance(module.time, _Clock):
        raise AttributeError(f"{_LOOP_MODULE} no longer imports time: not Flower 1.42?")
    module.time = _Clock({_FLOWER_IDLE_SLEEP_S: idle_s, _FLOWER_REPLY_SLEEP_S: reply_s},
                         busy_s)


class _Clock(types.SimpleNamespace):
    """The ``time`` module with ``sleep`` durations remapped (``sleep(3)`` -> ``sleep(0.5)``,
    or ``busy_s`` shortly after a message came in, as :func:`notify_on_message` records)."""

    def __init__(self, remap: dict[float, float], busy_s: float) -> None:
        super().__init__(**{k: getattr(time, k) for k in dir(time)
                            if not k.startswith("_") and k != "sleep"})
        self.remap, self.busy_s = remap, busy_s

    def sleep(self, seconds: float) -> None:
        mapped = self.remap.get(seconds, seconds)
        if seconds == _FLOWER_IDLE_SLEEP_S and time.monotonic() - _last_message[0] < BUSY_WINDOW_S:
            mapped = min(mapped, self.busy_s)
        time.sleep(mapped)


_last_message = [float("-inf")]  # time.monotonic() when the SuperNode last stored a message


def notify_on_message(event: threading.Event) -> None:
    """Set ``event`` each time this process's SuperNode has stored a whole message.

    Wraps ``_pull_and_store_message`` of Flower's SuperNode loop (it returns the run id once
    the message and all its objects are stored, None when nothing came), so the runner acquires
    the task only when its message can be read: a task acquired earlier (Flower creates it
    before pulling the message's objects) waits about a second in ``PullMessages``.
    """
    module = importlib.import_module(_LOOP_MODULE)
    pull = module._pull_and_store_message
    if getattr(pull, "_fleetfl_notifies", False):
        return

    def pull_and_notify(*args: object, **kwargs: object) -> int | None:
        run_id = pull(*args, **kwargs)
        if run_id is not None:
            _last_message[0] = time.monotonic()
            event.set()
        return run_id

    pull_and_notify._fleetfl_notifies = True  # type: ignore[attr-defined]
    module._pull_and_store_message = pull_and_notify


def _our_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Split our flags from Flower's."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--state-dir", type=Path, default=None)
    parser.add_argument("--poll-s", type=float, default=IDLE_POLL_S)
    return parser.parse_known_args(argv)


def _runtime_address(flower_argv: list[str]) -> str | None:
    """``127.0.0.1:PORT`` of the Runtime API if Flower runs ``--isolation process``, else None."""
    from flwr.supercore.constant import SUPERNODE_UVICORN_DEFAULT_PORT

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--isolation", default="subprocess")
    parser.add_argument("--port", type=int, default=SUPERNODE_UVICORN_DEFAULT_PORT)
    args, _ = parser.parse_known_args(flower_argv)
    return f"127.0.0.1:{args.port}" if args.isolation == "process" else None


def main() -> None:
    """Run Flower's SuperNode with this module's heartbeat, poll and (optional) runner."""
    ours, flower_argv = _our_args(sys.argv[1:])
    log_to_stderr()
    set_heartbeat_interval()
    bound_heartbeat_retries()
    set_poll_interval(ours.poll_s, min(REPLY_POLL_S, ours.poll_s), min(BUSY_POLL_S, ours.poll_s))
    fast_object_pulls(*DEVICE_MODULES)
    bounded_runner_pulls()
    address = _runtime_address(flower_argv)
    if address is not None:
        from fleetfl.client.app import app
        from fleetfl.client.runner import start_runner

        wake = threading.Event()
        notify_on_message(wake)
        # torch (~2.5 s here, much more on a small board) loads while the SuperNode connects,
        # so the registration query, which reports the memory held ready to train, is quick.
        start_runner(address, app, ours.state_dir, wake,
                     warm_up=lambda: importlib.import_module("fleetfl.client.training"))
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *flower_argv]
    sys.exit(flower_supernode())


if __name__ == "__main__":
    main()
