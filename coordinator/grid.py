"""A Grid that collects replies every fraction of a second instead of every 3 s.

Flower's network Grid (``flwr.superlink.grid.http_grid.HttpGrid``, what a ServerApp gets in a
deployment) implements ``send_and_receive`` as push, then pull-and-sleep-3-s until every reply
is in: each exchange ends on average 1.5 s (at worst 3 s) after its last reply arrived, and a
secure round makes four exchanges. :class:`PollingGrid` wraps any Grid and re-implements only
``send_and_receive`` on the Grid's public ``push_messages``/``pull_messages``, pulling every
``poll_s`` seconds (a pull is one local HTTP request to the SuperLink). Everything else is
delegated unchanged. The simulation's in-memory Grid already pulls every 0.1 s and is not
wrapped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fleetfl.object_pulls import SERVERAPP_MODULES, fast_object_pulls

DEFAULT_POLL_S = 0.1  # one local HTTP request to the SuperLink per 0.1 s, while a round waits


class PollingGrid(Grid):
    """``grid`` with a ``send_and_receive`` that pulls replies every ``poll_s`` seconds."""

    def __init__(self, grid: Grid, poll_s: float = DEFAULT_POLL_S) -> None:
        if poll_s <= 0:
            raise ValueError(f"poll_s must be positive, got {poll_s}")
        self.inner = grid
        self.poll_s = poll_s

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``; return the replies received before ``timeout`` seconds.

        As Flower's: ``timeout=None`` waits for every reply; a reply is matched to its
        message by ``reply_to_message_id``.
        """
        pending = set(self.push_messages(messages))
        return gather_replies(self.pull_messages, pending, timeout, self._sleep)

    def _sleep(self, pending: set[str], left: float | None) -> bool:
        time.sleep(self.poll_s)
        return True


def gather_replies(pull: Callable[[set[str]], Iterable[Message]], pending: set[str],
                   timeout: float | None,
                   wait: Callable[[set[str], float | None], bool]) -> list[Message]:
    """``send_and_receive``'s loop: ``pull`` the replies to the message ids ``pending`` (which
    is emptied as they come, by ``reply_to_message_id``) until all are in, ``timeout`` seconds
    have passed (None: no limit), or ``wait(pending, seconds_left)``, called between pulls,
    returns False (nothing more can come). The replies, in the order pulled."""
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    while pending:
        got = list(pull(pending))
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        left = None if deadline is None else deadline - time.monotonic()
        if not pending or (left is not None and left <= 0) or not wait(pending, left):
            break
    return replies


def fast_polling(grid: Grid, poll_s: float = DEFAULT_POLL_S) -> Grid:
    """``grid`` wrapped in :class:`PollingGrid` if it is Flower's network Grid (whose object
    pulls then also retry after 0.25 s, not 1 s: :mod:`fleetfl.object_pulls`), else itself."""
    from flwr.superlink.grid.http_grid import HttpGrid

    if not isinstance(grid, HttpGrid):
        return grid
    fast_object_pulls(*SERVERAPP_MODULES)
    return PollingGrid(grid, poll_s)
