"""The local engine: a simulated fleet on one machine, without Ray (``federation.engine``).

The ServerApp runs unchanged on :class:`LocalGrid`, a ``flwr.serverapp.Grid`` (Flower's public
interface: ``push_messages``, ``pull_messages``, ``send_and_receive``, ``get_node_ids``). The
grid hands each message, with its node's ``Context``, to a :class:`WorkerPool` of processes
that run the same ClientApp Flower's Ray engine runs, on the same Messages.

What it does not do, compared with Flower's simulation engine (``flwr.simulation``):

* no per-message polling of every node: Flower's engine looks up each of the N nodes' pending
  messages every 0.1 s (``vce_api.add_messages_to_queue``), O(N x pending); here a pushed
  message goes straight to a worker, and a reply is taken when its batch finishes;
* no up-front state per node: Flower registers N nodes in its LinkState and makes N
  ``Context`` objects before round 1; here node ``i`` is the id ``FIRST_NODE_ID + i`` and its
  ``Context`` is made the first time a message is sent to it (:class:`Contexts`), so a
  population of 100,000 costs nothing until its devices are sampled;
* no Ray: one machine only. ``federation.engine = "ray"`` is the way out to a cluster.

A node's context is updated when its reply arrives (as Flower's engine does), also for a reply
that came after ``send_and_receive``'s timeout, which is then dropped. A message goes out with
the node's context as it is when pushed: the strategy sends a node one message per exchange.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import threading
from collections.abc import Iterable, Iterator
from uuid import uuid4

from flwr.app import Context, Message, RecordDict
from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, ErrorCode
from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fleetfl.coordinator.grid import gather_replies
from fleetfl.coordinator.worker_pool import Job, WorkerPool, error_reply, split_batches

log = logging.getLogger(__name__)

# Node i of the population is FIRST_NODE_ID + i: never the SuperLink's own id (1), and the
# partition is readable from a node id in a log line.
FIRST_NODE_ID = 1_000_000
PARTITION_ID, NUM_PARTITIONS = "partition-id", "num-partitions"  # Flower's node_config keys


def node_id_of(index: int) -> int:
    """The node id of population member ``index`` (Flower's ``partition-id`` of the node)."""
    return FIRST_NODE_ID + index


def index_of(node_id: int) -> int:
    """The population index of ``node_id``; inverse of :func:`node_id_of`."""
    return node_id - FIRST_NODE_ID


class Contexts:
    """The nodes' ``Context`` objects, made on first use: memory O(nodes messaged so far)."""

    def __init__(self, run_id: int, num_nodes: int) -> None:
        self.run_id, self.num_nodes = run_id, num_nodes
        self._by_node: dict[int, Context] = {}

    def __contains__(self, node_id: object) -> bool:
        return isinstance(node_id, int) and 0 <= index_of(node_id) < self.num_nodes

    def __len__(self) -> int:
        return len(self._by_node)

    def get(self, node_id: int) -> Context:
        """Node ``node_id``'s context (a fresh one, with Flower's node_config, the first time)."""
        ctx = self._by_node.get(node_id)
        if ctx is None:
            ctx = Context(run_id=self.run_id, node_id=node_id, state=RecordDict(), run_config={},
                          node_config={PARTITION_ID: index_of(node_id),
                                       NUM_PARTITIONS: self.num_nodes})
            self._by_node[node_id] = ctx
        return ctx

    def put(self, context: Context) -> None:
        """Keep ``context`` as its node's context after a message."""
        self._by_node[context.node_id] = context


class LocalGrid(Grid):
    """A Grid whose N nodes are virtual clients served by a :class:`WorkerPool`."""

    def __init__(self, pool: WorkerPool, num_nodes: int, run: Run) -> None:
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
        self.pool, self.num_nodes, self._run = pool, num_nodes, run
        self.contexts = Contexts(run.run_id, num_nodes)
        self._lock = threading.Lock()
        self._inflight: dict[cf.Future, list[Message]] = {}
        self._replies: dict[str, Message] = {}  # reply_to message id -> reply
        self._abandoned: set[str] = set()  # timed out: their replies are dropped

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return Run(**vars(self._run))

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return range(node_id_of(0), node_id_of(self.num_nodes))

    @staticmethod
    def node_id_of(index: int) -> int:
        """The node of population member ``index`` (:func:`node_id_of`)."""
        return node_id_of(index)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Dispatch ``messages`` to the workers in batches; their ids (a message to a node
        outside the population is refused, logged, and gets no id: as Flower's LinkState)."""
        jobs: list[Job] = []
        for msg in messages:
            if msg.metadata.dst_node_id not in self.contexts:
                log.warning("no node %d in this simulation; message not sent",
                            msg.metadata.dst_node_id)
                continue
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            jobs.append((msg, self.contexts.get(msg.metadata.dst_node_id)))
        for batch in split_batches(jobs, self.pool.workers):
            future = self.pool.submit(batch)
            with self._lock:
                self._inflight[future] = [m for m, _ in batch]
        return [m.metadata.message_id for m, _ in jobs]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies received so far to ``message_ids`` (each returned once)."""
        self._harvest()
        with self._lock:
            return [self._replies.pop(i) for i in set(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``; the replies received within ``timeout`` seconds (None: all)."""
        pending = set(self.push_messages(messages))
        replies = gather_replies(self.pull_messages, pending, timeout, self._wait)
        if pending:
            log.warning("%d simulated client(s) sent no reply in time", len(pending))
            with self._lock:
                self._abandoned.update(pending)
        return replies

    def _wait(self, pending: set[str], timeout: float | None) -> bool:
        """Block until a batch holding one of ``pending`` finishes (or ``timeout``); False if
        no batch in flight holds any (a reply that answered another message id)."""
        with self._lock:
            futures = [f for f, msgs in self._inflight.items()
                       if any(m.metadata.message_id in pending for m in msgs)]
        if futures:
            cf.wait(futures, timeout=timeout, return_when=cf.FIRST_COMPLETED)
        return bool(futures)

    def _harvest(self) -> None:
        """Move finished batches' replies into the reply box and their contexts back."""
        with self._lock:
            done = [f for f in self._inflight if f.done()]
            batches = [(f, self._inflight.pop(f)) for f in done]
        for future, sent in batches:
            for reply in self._replies_of(future, sent):
                reply.metadata.__dict__["_message_id"] = str(uuid4())
                key = reply.metadata.reply_to_message_id
                with self._lock:
                    if key in self._abandoned:
                        self._abandoned.discard(key)
                    else:
                        self._replies[key] = reply

    def _replies_of(self, future: cf.Future, sent: list[Message]) -> Iterator[Message]:
        try:
            results = future.result()
        except cf.process.BrokenProcessPool:
            self.pool.broken(future)
            for msg in sent:
                yield error_reply(msg, "the simulation worker running this client died "
                                       "(killed, or out of memory)", ErrorCode.UNKNOWN)
            return
        except Exception as err:  # noqa: BLE001 - e.g. a reply that cannot be pickled
            for msg in sent:
                yield error_reply(msg, f"{type(err).__name__}: {err}", ErrorCode.UNKNOWN)
            return
        for reply, context in results:
            self.contexts.put(context)
            yield reply


@contextlib.contextmanager
def local_grid(client_app_ref: str, num_nodes: int, workers: int, threads: int = 1,
               preload: tuple[str, ...] = ()) -> Iterator[LocalGrid]:
    """A :class:`LocalGrid` over ``num_nodes`` virtual clients of ``client_app_ref``
    (``module:attribute``) in ``workers`` processes of ``threads`` torch threads each (started
    at once, importing ``preload``), for a new run; the workers stop when the block exits."""
    run_id = generate_rand_int_from_bytes(RUN_ID_NUM_BYTES)
    run = Run.create_empty(run_id=run_id)
    run.primary_task_id = 1
    # Flower's Message() reads the sender's identity from here (run_simulation does the same).
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
    pool = WorkerPool(client_app_ref, workers, threads, preload)
    pool.warm()
    try:
        yield LocalGrid(pool, num_nodes, run)
    finally:
        pool.close(wait=False)


def run_local(server_app: ServerApp, client_app_ref: str, num_nodes: int, workers: int,
              threads: int = 1, preload: tuple[str, ...] = ()) -> Context:
    """Run ``server_app`` on a :func:`local_grid`; the ServerApp's context when it ends."""
    from flwr.server.run_serverapp import run as run_serverapp

    with local_grid(client_app_ref, num_nodes, workers, threads, preload) as grid:
        context = Context(run_id=grid.run.run_id, node_id=0, node_config={},
                          state=RecordDict(), run_config={})
        return run_serverapp(grid=grid, context=context, server_app_dir="",
                             loaded_server_app=server_app)
