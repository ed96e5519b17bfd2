"""The coordinator's view of the fleet: which node is which device, with how much data.

Clients describe themselves (device profile, example count) in reply to a ``register`` query, so
the coordinator plans work the same way for simulated and real devices. A client may lie: its
profile must be physically possible (``DeviceProfile``'s limits), its example count is capped
at ``federation.max_examples_per_client`` (it weights the client's update), and a registration
that cannot be read refuses that node, logged, and nothing else.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fleetfl import protocol as P
from fleetfl.devices.profiles import DeviceProfile

if TYPE_CHECKING:
    from fleetfl.coordinator.population import Population

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientInfo:
    """A registered client: its Flower node id, fleet index, device and local data size."""

    node_id: int
    index: int
    device: DeviceProfile
    num_examples: int
    # Bytes the device's process holds before training (measured by the device, reported at
    # registration); None: plan with fleet.runtime_memory_mib (simulated clients).
    runtime_bytes: int | None = None


class FleetTooSmall(RuntimeError):
    """Fewer devices than ``federation.min_clients`` registered within the wait."""


RETRY_FIRST_S = 30.0  # a node that failed to register is asked again after this many seconds,
RETRY_MAX_S = 300.0  # doubling each time up to this: a device can be fixed and come back


class FleetRegistry:
    """Registers nodes as they appear. A node that fails to register (an error reply, a reply
    that does not parse, or none in time) is asked again after :data:`RETRY_FIRST_S` seconds,
    then twice as long each time up to :data:`RETRY_MAX_S`: a broken device must not cost a
    query, and a log line, every round or every poll while the coordinator waits for devices.
    """

    def __init__(self, register_config: ConfigRecord, timeout_s: float,
                 max_examples: int = 1_000_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._config = register_config
        self._timeout_s = timeout_s
        self._max_examples = max_examples
        self._clock = clock
        self._clients: dict[int, ClientInfo] = {}
        self._retry: dict[int, tuple[float, float]] = {}  # node -> (ask again at, backoff s)

    @property
    def clients(self) -> list[ClientInfo]:
        """Registered clients, ordered by fleet index."""
        return sorted(self._clients.values(), key=lambda c: c.index)

    @property
    def size(self) -> int:
        """Registered clients."""
        return len(self._clients)

    @property
    def population(self) -> Population:
        """The registered clients as a :class:`Population`, in fleet-index order."""
        from fleetfl.coordinator.population import Population

        return Population.of_clients(self.clients)

    def wait_for(self, grid: Grid, min_clients: int, wait_s: float, poll_s: float = 0.25,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """Refresh until ``min_clients`` nodes are registered, logging every ~10 s while it
        waits; raise :class:`FleetTooSmall` after ``wait_s`` seconds."""
        deadline, said = clock() + wait_s, -math.inf
        self.refresh(grid)
        while len(self._clients) < min_clients:
            now = clock()
            if now >= deadline:
                raise FleetTooSmall(f"{len(self._clients)} of federation.min_clients = "
                                    f"{min_clients} devices registered after {wait_s:g} s "
                                    f"(federation.round_wait_s)")
            if now - said >= 10.0:
                log.warning("waiting for devices: %d of %d registered "
                            "(federation.min_clients), %.0f s left", len(self._clients),
                            min_clients, deadline - now)
                said = now
            time.sleep(poll_s)
            self.refresh(grid)

    def refresh(self, grid: Grid) -> None:
        """Forget nodes that left; query every connected node not yet registered (except
        those whose last attempt failed less than their backoff ago)."""
        connected = set(grid.get_node_ids())
        for node in set(self._clients) - connected:
            log.info("node %d left; it is no longer sampled", node)
            del self._clients[node]
        for node in set(self._retry) - connected:
            del self._retry[node]
        now = self._clock()
        new = sorted(n for n in connected
                     if n not in self._clients and self._retry.get(n, (now, 0.0))[0] <= now)
        if not new:
            return
        cfg = ConfigRecord(dict(self._config))
        cfg[P.OP] = P.OP_REGISTER
        content = RecordDict({P.CONFIG: cfg})
        messages = [Message(content, dst_node_id=n, message_type=MessageType.QUERY) for n in new]
        asked, answered = set(new), set()
        for reply in grid.send_and_receive(messages, timeout=self._timeout_s):
            node = reply.metadata.src_node_id
            if node not in asked or node in answered:
                continue  # not asked, or a second reply: not this node's registration
            answered.add(node)
            if reply.has_error():
                self._failed(node, f"failed to register: {reply.error.reason}")
                continue
            try:
                info = parse_registration(node, reply.content[P.CONFIG])
            except Exception as err:  # noqa: BLE001 - whatever a node sends refuses only it
                self._failed(node, f"refused: invalid registration: {err}")
                continue
            self._retry.pop(node, None)
            if info.num_examples > self._max_examples:
                log.warning("node %d claims %d examples; counted as %d "
                            "(federation.max_examples_per_client)", node, info.num_examples,
                            self._max_examples)
                info = replace(info, num_examples=self._max_examples)
            if info.runtime_bytes is not None:  # a real device (simulated ones report none)
                log.info("node %d registered as client %d: %s, %d examples, %.0f MiB "
                         "resident before training", node, info.index, info.device.name,
                         info.num_examples, info.runtime_bytes / 2**20)
            self._clients[node] = info
        for node in asked - answered:
            self._failed(node, f"sent no registration reply (waited up to {self._timeout_s:g} s)")

    def _failed(self, node: int, why: str) -> None:
        """Log a failed registration and schedule the next attempt (doubling backoff)."""
        backoff = min(RETRY_MAX_S, 2 * self._retry[node][1]) if node in self._retry \
            else RETRY_FIRST_S
        self._retry[node] = (self._clock() + backoff, backoff)
        log.warning("node %d %s; asking it again in %.0f s", node, why, backoff)


MAX_CLIENT_INDEX = 2**31 - 1


def parse_registration(node_id: int, cfg: ConfigRecord) -> ClientInfo:
    """Validate a ``register`` reply into a :class:`ClientInfo` (raises ``ValueError``)."""
    num_examples, index = cfg[P.NUM_EXAMPLES], cfg[P.CLIENT_INDEX]
    for key, value in ((P.NUM_EXAMPLES, num_examples), (P.CLIENT_INDEX, index)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{key} must be an integer, got {value!r}")
    if num_examples <= 0:
        raise ValueError(f"{P.NUM_EXAMPLES} must be positive, got {num_examples}")
    if not 0 <= index <= MAX_CLIENT_INDEX:
        raise ValueError(f"{P.CLIENT_INDEX} must be in [0, {MAX_CLIENT_INDEX}], got {index}")
    device = DeviceProfile.from_dict(json.loads(str(cfg[P.DEVICE])))
    runtime = cfg.get(P.RUNTIME_BYTES)
    if runtime is not None and (not isinstance(runtime, int) or isinstance(runtime, bool)
                                or not 0 < runtime <= device.ram_bytes):
        # A device that under-reports only shrinks its own margin: its own admission check
        # measures again before it trains.
        raise ValueError(f"{P.RUNTIME_BYTES} must be an integer in (0, ram_bytes = "
                         f"{device.ram_bytes}], got {runtime!r}")
    return ClientInfo(node_id, index, device, num_examples, runtime)
