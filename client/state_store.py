"""A simulated client's state on the workers' disk, not in the coordinator's process.

Flower's simulation engine keeps every virtual node's ``Context`` in the driver process and
ships it to a Ray worker with each message and back with each reply. fleetfl's client state is
model-sized (the error-feedback residual: 4 B a value; the masks; the SecAgg+ secrets of the
round in flight), so the driver would hold N x model size for a population of N (about 4 GB
for a 1M-parameter model at 1,000 clients) and move it twice per message.

With a store, :func:`offloaded` loads a node's state from ``<dir>/<run>/<node>.pb`` (Flower's
``RecordDict`` proto) into ``context.state`` when a message arrives and moves it back to disk
when the handler returns, so what travels and what the driver keeps is an empty state: memory
O(cohort) in the workers, none per client in the coordinator. The workers of one machine (the
local engine's or Ray's) share the directory, which ``fleetfl simulate`` creates per run and
removes at the end (``FLEETFL_CLIENT_STATE_DIR`` names another, e.g. on a shared file system;
``off`` keeps the state in Flower's context). A Ray cluster's nodes keep their own environment:
unset there, the state stays in Flower's context; one directory that every node shares works as
on one machine. One directory per node is wrong: a client's next message may run on another
node, where its SecAgg+ secrets are missing (the round aborts) and its residual is stale. A
real device keeps its context in its own process (and on its disk:
:class:`fleetfl.client.runner.ContextStore`), so this is for simulation only.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from flwr.app import Context, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # pylint: disable=E0611

ENV = "FLEETFL_CLIENT_STATE_DIR"
OFF = "off"  # the state stays in Flower's context (benchmarks compare the two)
log = logging.getLogger(__name__)


def store_dir() -> Path | None:
    """The store of this process (``$FLEETFL_CLIENT_STATE_DIR``), or None: keep the state in
    the context (unset, or ``off``: Flower's own behaviour)."""
    value = os.environ.get(ENV)
    return Path(value) if value and value != OFF else None


def state_path(root: Path, context: Context) -> Path:
    """Where node ``context.node_id``'s state of run ``context.run_id`` is kept."""
    return root / str(context.run_id) / f"{context.node_id}.pb"


@contextlib.contextmanager
def offloaded(context: Context, root: Path | None = None) -> Iterator[None]:
    """Run the body with the node's stored state in ``context.state``; afterwards move it
    to disk and leave ``context.state`` empty. Without a store (``root`` and the environment
    unset) the context is left alone. A handler that raises keeps the state it was given."""
    root = root if root is not None else store_dir()
    if root is None:
        yield
        return
    path = state_path(root, context)
    if len(context.state) == 0:
        context.state = _read(path)
    yield
    _write(path, context.state)
    context.state = RecordDict()


def _read(path: Path) -> RecordDict:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return RecordDict()
    try:
        return recorddict_from_proto(ProtoRecordDict.FromString(data))
    except Exception as err:  # noqa: BLE001 - a torn file costs this client its state, no more
        log.warning("ignoring the client state %s: %s", path, err)
        return RecordDict()


def _write(path: Path, state: RecordDict) -> None:
    """Write atomically (a reader never sees half a file), readable by this user only: the
    state holds the SecAgg+ secrets of the round in flight."""
    if len(state) == 0:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_private(path, recorddict_to_proto(state).SerializeToString())


def write_private(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically (through a temporary file of this process in
    the same directory), created 0600: client state holds secrets."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    os.replace(tmp, path)
