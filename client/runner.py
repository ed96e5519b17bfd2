"""A persistent ClientApp runner: one long-lived process answers every message of a device.

A SuperNode in Flower's default ``--isolation subprocess`` mode starts ``flower-superexec``,
which starts a fresh ``flwr-clientapp`` process for *every* message: each one re-imports
Flower and torch (~2.5 s and ~220 MB here) and re-reads the data. In ``--isolation process``
mode the SuperNode starts nothing; an outside process acquires each task from the SuperNode's
local Runtime API (``AcquireTask``, as ``flower-superexec`` does) and runs it with the task's
token (``PullTaskInput``, ``PullMessages``, ``PushMessages``, ``PushTaskOutput``, as
``flwr-clientapp`` does). :class:`AppRunner` is that process's loop, built on the same public
Runtime API client and functions (``flwr.supernode.runtime.run_clientapp``), with three
differences:

* it never exits between tasks, so torch, the model and the data stay loaded;
* it runs only fleetfl's own ClientApp (no FAB is installed: the FAB a fleetfl coordinator
  sends names ``fleetfl.client.app:app`` and nothing else) and refuses a run of any other app
  or another fleetfl version with an error reply;
* a task's heartbeat never raises SIGINT in this process (Flower's does, which would stop the
  SuperNode sharing it).

The run's per-device state (``context.state``: the error-feedback residual, the secure
aggregation keys of the round in flight) is written to ``state_dir`` after every task and read
back when the SuperNode, after a restart, hands over an empty state for the same run
(:class:`ContextStore`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, context_to_proto
from flwr.proto.message_pb2 import Context as ProtoContext  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    AcquireTaskRequest,
    SendTaskHeartbeatRequest,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
)
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.run import Run
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import (
    pull_task_input,
    push_message,
    push_task_output,
)

from fleetfl import __version__
from fleetfl.client.state_store import write_private
from fleetfl.devices.memory_stats import major_faults

log = logging.getLogger(__name__)

FAB_ID = "fleetfl/fleetfl-run"  # publisher/name of the FAB coordinator/control.py builds
# An idle runner asks the local Runtime API for a task this often; with a wake event (set by
# the SuperNode loop when a message is stored, client/supernode.py) it asks at once.
ACQUIRE_POLL_S = 30.0
HEARTBEAT_S = 10.0  # Flower's task heartbeat cadence is 10-20 s; the SuperNode expires at 60 s


@dataclass(frozen=True)
class ContextStore:
    """The last context of each run, on disk: ``<dir>/context-<run_id>.pb`` (Flower's proto).

    Holds one run at a time (a new run's file replaces older runs' files), so its size is
    one context: a few bytes plus one model-sized error-feedback residual (float32).
    """

    directory: Path

    def path(self, run_id: int) -> Path:
        """Where run ``run_id``'s context is kept."""
        return self.directory / f"context-{run_id}.pb"

    def save(self, context: Context) -> None:
        """Write ``context`` atomically, readable by this user only (it holds the secure
        aggregation secrets of the round in flight), and drop other runs' files."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        target = self.path(context.run_id)
        write_private(target, context_to_proto(context).SerializeToString())
        for old in self.directory.glob("context-*.pb"):
            if old != target:
                old.unlink(missing_ok=True)

    def restore(self, context: Context) -> bool:
        """Fill an empty ``context.state`` from this run's saved context; True if it did."""
        path = self.path(context.run_id)
        if len(context.state) > 0 or not path.is_file():
            return False
        try:
            saved = context_from_proto(ProtoContext.FromString(path.read_bytes()))
        except Exception as err:  # noqa: BLE001 - a torn or foreign file must not stop training
            log.warning("ignoring the saved state %s: %s", path, err)
            return False
        if saved.node_id != context.node_id or len(saved.state) == 0:
            return False
        context.state = saved.state
        return True


def refusal(run: Run) -> str | None:
    """Why this runner cannot run ``run``'s app (``None``: it can)."""
    if run.fab_id != FAB_ID:
        return (f"this device runs only fleetfl's ClientApp ({FAB_ID}); the run's app is "
                f"{run.fab_id!r}")
    if run.fab_version != __version__:
        return (f"the coordinator runs fleetfl {run.fab_version}, this device fleetfl "
                f"{__version__}: install the same version on both")
    return None


class AppRunner:
    """Acquire each ClientApp task from the SuperNode at ``address`` and run ``app`` on it."""

    def __init__(self, address: str, app: ClientApp, store: ContextStore | None = None,
                 poll_s: float = ACQUIRE_POLL_S,
                 warm_up: Callable[[], object] | None = None) -> None:
        self.warm_up = warm_up
        self.address = address
        self.app = app
        self.store = store
        self.poll_s = poll_s
        # message types served once: the first of each reads cold code from disk by design
        self._warm: set[str] = set()

    def _client(self, *interceptors: object, retry: bool = True) -> RuntimeHttpClient:
        return RuntimeHttpClient.from_server_address(
            server_address=self.address, insecure=True, root_certificates=None,
            interceptors=list(interceptors),  # type: ignore[arg-type]
            retry_invoker=make_simple_http_retry_invoker() if retry else None)

    def serve(self, stop: threading.Event, wake: threading.Event | None = None) -> None:
        """Run tasks until ``stop`` is set; errors are logged and the loop goes on.

        Between tasks it waits for ``wake`` (or ``poll_s`` seconds, whichever comes first).
        """
        if self.warm_up is not None:
            self.warm_up()  # while the SuperNode connects, not when the first message waits
        # No retries: this loop is the retry (the Runtime API starts after this thread).
        acquirer = self._client(RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                                retry=False)
        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])
        wake = wake if wake is not None else threading.Event()
        while not stop.is_set():
            try:
                res = acquirer.AcquireTask(request)
                if res.HasField("task") and res.token:
                    self.run_task(res.token)
                    continue
            except Exception as err:  # noqa: BLE001 - the SuperNode may be starting or gone
                log.debug("acquiring a task failed: %s", err)
            wake.wait(self.poll_s)
            wake.clear()

    def run_task(self, token: str) -> None:
        """Run one task: pull its message and context, call the app, push reply and context."""
        client = self._client(RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                              RuntimeTokenHttpInterceptor(token))
        beat = _Heartbeat(client)
        context: Context | None = None
        status, details = SubStatus.FAILED, "ClientApp task failed"
        try:
            started = time.monotonic()
            message, context, run, _fab = pull_task_input(client)
            pulled = time.monotonic()
            faults = _major_faults()
            reply = self._reply(message, context, run)
            answered = time.monotonic()
            kind = message.metadata.message_type
            if kind in self._warm:
                warn_if_paging(_major_faults() - faults, answered - pulled)
            self._warm.add(kind)
            push_message(client, reply, context)
            status, details = SubStatus.COMPLETED, ""
            if self.store is not None:
                self.store.save(context)
            log.info("%s message answered in %.2f s (pull %.2f s, app %.2f s, push %.2f s)",
                     message.metadata.message_type, time.monotonic() - started,
                     pulled - started, answered - pulled, time.monotonic() - answered)
        except Exception as err:  # noqa: BLE001 - one bad task must not stop the device
            log.exception("task failed")
            details = f"{type(err).__name__}: {err}"
        finally:
            beat.stop()
            push_task_output(client=client, context=context, sub_status=status, details=details)
            client.close()

    def _reply(self, message: Message, context: Context, run: Run) -> Message:
        """The app's reply, or an error reply saying why it raised or was refused."""
        reason = refusal(run)
        if reason is not None:
            log.error("%s", reason)
            return Message(Error(code=ErrorCode.LOAD_CLIENT_APP_EXCEPTION, reason=reason),
                           reply_to=message)
        if self.store is not None and self.store.restore(context):
            log.info("restored this run's saved state (run %d)", context.run_id)
        try:
            return self.app(message=message, context=context)
        except Exception as err:  # noqa: BLE001 - reported to the coordinator, as Flower does
            log.exception("the ClientApp raised")
            reason = f"{type(err).__name__}: {err}"
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                           reply_to=message)


class _Heartbeat:
    """Task heartbeats every ``HEARTBEAT_S`` on a thread, until :meth:`stop`."""

    def __init__(self, client: RuntimeHttpClient) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(client,), daemon=True,
                                        name="fleetfl-task-heartbeat")
        self._thread.start()

    def _beat(self, client: RuntimeHttpClient) -> None:
        request = SendTaskHeartbeatRequest()
        while not self._stop.wait(HEARTBEAT_S):
            try:
                client.SendTaskHeartbeat(request)
            except Exception as err:  # noqa: BLE001 - a missed beat is retried next time
                log.debug("task heartbeat failed: %s", err)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)


def start_runner(address: str, app: ClientApp, state_dir: Path | None,
                 wake: threading.Event | None = None,
                 warm_up: Callable[[], object] | None = None) -> threading.Event:
    """Start an :class:`AppRunner` on a daemon thread (``wake``: see :meth:`AppRunner.serve`;
    ``warm_up`` runs first, e.g. the imports training needs); set the returned event to stop
    it."""
    stop = threading.Event()
    runner = AppRunner(address, app, ContextStore(state_dir) if state_dir else None,
                       warm_up=warm_up)
    threading.Thread(target=runner.serve, args=(stop, wake), daemon=True,
                     name="fleetfl-clientapp-runner").start()
    return stop


# Major faults in one task that mean "short of memory": 40 warm training steps of the digits CNN
# made 0 with room to spare, 289 under a 300 MiB cgroup (6.6x slower) and 2,074 under 290 MiB
# (46x slower): benchmarks/results/device_memory_faults.json.
PAGING_FAULTS = 200


def warn_if_paging(faults: int, seconds: float) -> str | None:
    """Warn (and return the text) when a task made ``faults`` major page faults: the device is
    short of memory and re-reads library code from disk, so it trains many times slower long
    before the kernel would kill it (BENCHMARKS.md, "Memory limits and the Pi Zero 2 W")."""
    if faults < PAGING_FAULTS:
        return None
    text = (f"this device had to read memory back from disk {faults} times during a "
            f"{seconds:.1f} s task (major page faults): it is short of memory, which slows "
            "training many times; give it more memory or stop other programs")
    log.warning("%s", text)
    return text


def _major_faults() -> int:
    try:
        return major_faults()
    except (OSError, ValueError, IndexError):  # no /proc: nothing to say
        return 0
