"""FleetRegistry: who registers, and how often a node that fails to is asked again."""

from __future__ import annotations

from flwr.app import ConfigRecord, Message
from loopback import PLAIN, LoopbackGrid

from fleetfl import protocol as P
from fleetfl.coordinator import registry as R
from fleetfl.coordinator.config import load_config
from fleetfl.coordinator.server_app import message_config


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _lie(reply: Message) -> Message:
    reply.content[P.CONFIG] = ConfigRecord({P.NUM_EXAMPLES: -5, P.CLIENT_INDEX: 0,
                                            P.DEVICE: "{}"})
    return reply


def _registry(grid: LoopbackGrid, clock: Clock) -> R.FleetRegistry:
    cfg = load_config(None, [*PLAIN, "federation.num_clients=3", "federation.clients_per_round=3"])
    return R.FleetRegistry(message_config(cfg), timeout_s=30, clock=clock)


def _asked(grid: LoopbackGrid, node: int) -> int:
    return sum(m.metadata.dst_node_id == node for m in grid.sent)


def test_a_node_that_fails_to_register_is_asked_again_with_a_doubling_backoff(caplog) -> None:
    grid, clock = LoopbackGrid(3, tamper_query={1: _lie}), Clock()
    registry = _registry(grid, clock)
    registry.refresh(grid)
    assert registry.size == 2 and _asked(grid, 1001) == 1
    assert "node 1001 refused: invalid registration" in caplog.text
    assert "asking it again in 30 s" in caplog.text
    for clock.now in (1.0, 10.0, 29.0):  # every poll and round inside the backoff: no query
        registry.refresh(grid)
    assert _asked(grid, 1001) == 1 and _asked(grid, 1000) == 1
    clock.now = 30.0
    registry.refresh(grid)
    assert _asked(grid, 1001) == 2 and "asking it again in 60 s" in caplog.text
    clock.now = 89.0
    registry.refresh(grid)
    assert _asked(grid, 1001) == 2
    clock.now = 90.0
    registry.refresh(grid)
    assert _asked(grid, 1001) == 3
    for _ in range(6):  # keep failing: the wait doubles, then stays at RETRY_MAX_S
        clock.now += R.RETRY_MAX_S
        registry.refresh(grid)
    waits = [float(line.rsplit(" in ", 1)[1].split()[0]) for line in caplog.messages
             if "node 1001" in line]
    assert waits == [30, 60, 120, 240, 300, 300, 300, 300, 300]


def test_a_fixed_node_registers_at_its_next_attempt() -> None:
    grid, clock = LoopbackGrid(2, tamper_query={0: _lie}), Clock()
    registry = _registry(grid, clock)
    registry.refresh(grid)
    assert registry.size == 1
    grid.tamper_query.clear()  # the device was fixed
    clock.now = 30.0
    registry.refresh(grid)
    assert registry.size == 2 and [c.node_id for c in registry.clients] == [1000, 1001]


def test_a_node_that_leaves_and_returns_is_asked_at_once() -> None:
    grid, clock = LoopbackGrid(2, tamper_query={0: _lie}), Clock()
    registry = _registry(grid, clock)
    registry.refresh(grid)
    gone = grid.nodes.pop(1000)
    registry.refresh(grid)
    grid.nodes[1000] = gone
    grid.tamper_query.clear()
    clock.now = 1.0  # well inside the old backoff: its record went when it left
    registry.refresh(grid)
    assert registry.size == 2
