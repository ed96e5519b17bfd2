"""The coordinator's view of the fleet: which node is which device, with how much data.

Clients describe themselves (device profile, example count) in reply to a ``register`` query, so
the coordinator plans work the same way for simulated and real devices.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fleetfl import protocol as P
from fleetfl.devices.profiles import DeviceProfile

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientInfo:
    """A registered client: its Flower node id, fleet index, device and local data size."""

    node_id: int
    index: int
    device: DeviceProfile
    num_examples: int


class FleetRegistry:
    """Registers nodes as they appear; a node that fails to register is retried next time."""

    def __init__(self, register_config: ConfigRecord, timeout_s: float) -> None:
        self._config = register_config
        self._timeout_s = timeout_s
        self._clients: dict[int, ClientInfo] = {}

    @property
    def clients(self) -> list[ClientInfo]:
        """Registered clients, ordered by fleet index."""
        return sorted(self._clients.values(), key=lambda c: c.index)

    def refresh(self, grid: Grid) -> None:
        """Forget nodes that left; query every connected node not yet registered."""
        connected = list(grid.get_node_ids())
        gone = set(self._clients) - set(connected)
        for node in gone:
            log.info("node %d left; it is no longer sampled", node)
            del self._clients[node]
        new = [n for n in connected if n not in self._clients]
        if not new:
            return
        cfg = ConfigRecord(dict(self._config))
        cfg[P.OP] = P.OP_REGISTER
        content = RecordDict({P.CONFIG: cfg})
        messages = [Message(content, dst_node_id=n, message_type=MessageType.QUERY) for n in new]
        for reply in grid.send_and_receive(messages, timeout=self._timeout_s):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("node %d failed to register: %s", node, reply.error.reason)
                continue
            try:
                self._clients[node] = parse_registration(node, reply.content[P.CONFIG])
            except (KeyError, TypeError, ValueError) as err:
                log.warning("node %d sent an invalid registration: %s", node, err)


def parse_registration(node_id: int, cfg: ConfigRecord) -> ClientInfo:
    """Validate a ``register`` reply into a :class:`ClientInfo` (raises ``ValueError``)."""
    num_examples = int(cfg[P.NUM_EXAMPLES])
    if num_examples <= 0:
        raise ValueError(f"{P.NUM_EXAMPLES} must be positive, got {num_examples}")
    device = DeviceProfile.from_dict(json.loads(str(cfg[P.DEVICE])))
    return ClientInfo(node_id, int(cfg[P.CLIENT_INDEX]), device, num_examples)
