"""An in-process Grid for tests: delivers each message to the real fleetfl ClientApp.

This stands in for Flower's transport only (which has its own tests and is exercised by the
end-to-end runs); the ServerApp, strategy and ClientApp code under test are the real ones.
``tamper`` lets a test corrupt one client's training reply, as a faulty or malicious device
would; ``tamper_query`` its replies to queries (``register``, secure-aggregation stages).
``sent`` and ``received`` record every message the coordinator sent and every reply it got back
(after tampering, as the coordinator saw it), so a test can check what crossed the wire.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fleetfl.client.app import app as client_app
from fleetfl.coordinator.config import PLAIN_OVERRIDES

Tamper = Callable[[Message], Message]

# A test of one path starts from the plain one (float32 both ways, no pruning, no SecAgg+) and
# turns on what it tests.
PLAIN = list(PLAIN_OVERRIDES)


class LoopbackGrid:
    """Nodes ``1000 + i`` are simulated clients with ``partition-id`` i."""

    def __init__(self, num_clients: int, tamper: dict[int, Tamper] | None = None,
                 crash: Iterable[int] = (),
                 silent: Callable[[Message], bool] | None = None,
                 tamper_query: dict[int, Tamper] | None = None,
                 errors_as_replies: bool = False) -> None:
        self.nodes = {1000 + i: i for i in range(num_clients)}
        self.tamper = tamper or {}
        self.tamper_query = tamper_query or {}
        # As Flower's runtime does: a ClientApp that raises answers with an error reply.
        # Off by default, so that a test sees a client's exception.
        self.errors_as_replies = errors_as_replies
        self.crash = set(crash)
        self.silent = silent  # True for a message whose node never answers (it vanished)
        self.sent: list[Message] = []
        self.received: list[Message] = []  # every reply returned to the coordinator, in order
        # Flower keeps one Context per node across rounds (context.state is the client's memory).
        self.contexts = {node: Context(run_id=1, node_id=node, node_config={"partition-id": i},
                                       state=RecordDict(), run_config={})
                         for node, i in self.nodes.items()}
        # Flower's runtime sets the running task's identity before a ServerApp builds messages.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> list[Message]:
        replies = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{len(self.sent)}-{i}"
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            index = self.nodes[node]
            if self.silent is not None and self.silent(msg):
                continue
            if index in self.crash and msg.metadata.message_type == "train":
                replies.append(Message(Error(code=1, reason="device crashed"), reply_to=msg))
                continue
            try:
                reply = client_app(msg, self.contexts[node])
            except Exception as err:  # noqa: BLE001 - see errors_as_replies
                if not self.errors_as_replies:
                    raise
                replies.append(Message(Error(code=0, reason=repr(err)), reply_to=msg))
                continue
            if index in self.tamper and msg.metadata.message_type == "train":
                reply = self.tamper[index](reply)
            if index in self.tamper_query and msg.metadata.message_type == "query":
                reply = self.tamper_query[index](reply)
            replies.append(reply)
        self.received.extend(replies)
        return replies
