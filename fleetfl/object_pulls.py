"""Pull a message's objects with a 0.25 s first retry instead of Flower's 1 s.

Flower sends a message as its metadata first, then its objects (arrays, records). A receiver
that reads the metadata before the sender has pushed every object finds one "unavailable", and
``flwr.supercore.inflatable.inflatable_utils.pull_objects`` then waits ``PULL_INITIAL_BACKOFF``
(1 s, doubling up to 10 s) before it asks again. On loopback the object arrives a few
milliseconds later, so most of that second is idle: it was the largest wait left in a deployed
round (a device's "Receiving" to "Received successfully" took 1.0-1.2 s instead of 0.1 s in
about half the messages).

:func:`fast_object_pulls` gives the named modules a ``pull_objects`` that starts at 0.25 s
and doubles up to 2 s, with Flower's total limit (``PULL_MAX_TIME``) unchanged (50 ms was
tried: on 2 cores with 10 devices it only added retries to a SuperLink already busy with
them). Two callers in Flower 1.42 import it by name with the default retries: the SuperNode loop
(a device pulling from the coordinator) and the network Grid (the ServerApp pulling replies).
The third, ``inflatable_utils.pull_and_inflate_object_from_tree`` (the device's runner pulling
from its SuperNode), passes its own defaults explicitly: :func:`bounded_runner_pulls` replaces
it in ``run_clientapp``, also bounding its retrying to 20 s. Checked against the pinned Flower
by ``tests/test_flower_patches.py``.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

INITIAL_BACKOFF_S = 0.25
BACKOFF_CAP_S = 2.0
# A device's runner pulls from its own SuperNode, where a message's objects are stored before
# the runner is woken. An object still missing after this long never comes: its task is an
# orphan (Flower creates the task before pulling the objects, and leaves it pending when the
# run stops meanwhile, e.g. a coordinator restart). Flower's PULL_MAX_TIME (2 h) would stall
# the runner, and so the device, for that long.
RUNNER_MAX_TIME_S = 20.0
DEVICE_MODULES = ("flwr.supernode.start_client_internal",)
SERVERAPP_MODULES = ("flwr.superlink.grid.http_grid",)
_RUNNER_MODULE = "flwr.supernode.runtime.run_clientapp"


def fast_object_pulls(*module_names: str) -> None:
    """Replace ``pull_objects`` in each module with the faster-retrying one (idempotent)."""
    from flwr.supercore.inflatable import inflatable_utils

    original = getattr(inflatable_utils.pull_objects, "func", inflatable_utils.pull_objects)
    fast = functools.partial(original, initial_backoff=INITIAL_BACKOFF_S,
                             backoff_cap=BACKOFF_CAP_S)
    for name in module_names:
        module = importlib.import_module(name)
        current: Any = getattr(module, "pull_objects", None)
        if current is None:
            raise AttributeError(f"{name} has no pull_objects: not Flower 1.42?")
        if getattr(current, "func", current) is not original:
            raise AttributeError(f"{name}.pull_objects is not Flower's: not Flower 1.42?")
        module.pull_objects = fast  # type: ignore[attr-defined]


def bounded_runner_pulls(max_time_s: float = RUNNER_MAX_TIME_S) -> None:
    """Give ``run_clientapp`` (the runner's ``pull_task_input``) a
    ``pull_and_inflate_object_from_tree`` with the same fast retries and at most
    ``max_time_s`` of retrying (it passes every retry setting to ``pull_objects`` explicitly,
    so only its own defaults can change them). Idempotent."""
    from flwr.supercore.inflatable import inflatable_utils

    original = inflatable_utils.pull_and_inflate_object_from_tree
    module = importlib.import_module(_RUNNER_MODULE)
    current: Any = getattr(module, "pull_and_inflate_object_from_tree", None)
    if getattr(current, "func", current) is not original:
        raise AttributeError(f"{_RUNNER_MODULE}.pull_and_inflate_object_from_tree is not "
                             "Flower's: not Flower 1.42?")
    module.pull_and_inflate_object_from_tree = functools.partial(  # type: ignore[attr-defined]
        original, max_time=max_time_s, initial_backoff=INITIAL_BACKOFF_S,
        backoff_cap=BACKOFF_CAP_S)
