"""Worker processes that run a ClientApp on Flower Messages, many virtual clients each.

Each worker is a process started once per simulation (``spawn``: nothing of the driver's
threads or locks is inherited). It imports the ClientApp named by ``module:attribute`` once and
then serves batches of ``(Message, Context)`` pairs, so torch, the task's data and the model
code are loaded once per worker and not once per client or message. A batch is one pickle over
a pipe each way: for B messages of a cohort the fixed cost of a dispatch is paid once, not B
times (:func:`split_batches`).

What comes back for each message is the ClientApp's reply, or an error reply (Flower's
``Error`` with ``CLIENT_APP_RAISED_EXCEPTION``) when the app raised: the coordinator sees a
failing client exactly as on Flower's Ray engine. If a worker process dies (a segfault, the
kernel's OOM killer), the pool breaks: every message in flight at that moment gets an error
reply, the pool is rebuilt for the next dispatch, and the round goes on with the replies it
has.

Stdlib only (``concurrent.futures.ProcessPoolExecutor``): checked against Ray (what Flower's
engine uses; a scheduler, an object store and ~1 s of per-run start-up a single machine does
not need) and ``multiprocessing.Pool`` (no recovery from a dead worker).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import importlib
import logging
import math
import multiprocessing
import os
import signal
import sys
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

log = logging.getLogger(__name__)

Job = tuple[Message, Context]
MAX_BATCH = 16  # messages per dispatch: bounds a batch's pickles (16 x a model) in flight

_app: ClientApp | None = None  # the worker process's ClientApp (set by _start_worker)


def load_app(ref: str) -> ClientApp:
    """The ``ClientApp`` at ``module:attribute`` (``ValueError`` for anything else)."""
    module, _, attr = ref.partition(":")
    if not module or not attr:
        raise ValueError(f"a ClientApp reference is 'module:attribute', got {ref!r}")
    app = getattr(importlib.import_module(module), attr, None)
    if not isinstance(app, ClientApp):
        raise ValueError(f"{ref} is not a flwr ClientApp (got {type(app).__name__})")
    return app


def _start_worker(ref: str, threads: int, preload: tuple[str, ...] = ()) -> None:
    """Worker initializer: one torch/BLAS thread count, then import the app (and ``preload``:
    modules its handlers import on first use) once. Ctrl-C is the driver's to handle: it
    stops the pool (a worker interrupted mid-batch would only print a traceback)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from fleetfl.client.daemon import THREAD_VARS

    for var in THREAD_VARS:
        os.environ[var] = str(threads)
    global _app
    _app = load_app(ref)
    for module in preload:
        importlib.import_module(module)
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:  # a ClientApp without torch
        pass


def run_batch(jobs: Sequence[Job]) -> list[tuple[Message, Context]]:
    """In a worker: the reply to each message and the node's context afterwards, in order."""
    assert _app is not None, "the worker was not initialized"
    out = []
    for message, context in jobs:
        try:
            reply = _app(message, context)
        except Exception as err:  # noqa: BLE001 - one client's failure is its error reply
            reply = error_reply(message, f"{type(err).__name__}: {err}")
        out.append((reply, context))
    return out


def error_reply(message: Message, reason: str,
                code: int = ErrorCode.CLIENT_APP_RAISED_EXCEPTION) -> Message:
    """The error reply Flower's engine sends for a ClientApp that raised."""
    return Message(Error(code=code, reason=reason), reply_to=message)


def split_batches(jobs: Sequence[Job], workers: int,
                  max_batch: int = MAX_BATCH) -> list[list[Job]]:
    """``jobs`` cut into consecutive batches: about four per worker (so that a fast worker
    takes more of the cohort) and at most ``max_batch`` messages each."""
    if not jobs:
        return []
    size = max(1, min(max_batch, math.ceil(len(jobs) / (4 * max(1, workers)))))
    return [list(jobs[i:i + size]) for i in range(0, len(jobs), size)]


@contextlib.contextmanager
def _main_not_inherited() -> Iterator[None]:
    """While workers start: hide the caller's main script from ``multiprocessing``, which would
    otherwise run it again in every worker (as ``__mp_main__``): a script calling
    ``fleetfl.simulate(...)`` at top level, without an ``if __name__ == "__main__":`` guard,
    would start a simulation in each worker. The workers need nothing from it: they import the
    ClientApp by name."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__dict__["__spec__"] = None
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


def _ready() -> None:
    """A no-op task: submitting one per worker makes the pool start them all."""


class WorkerPool:
    """``workers`` processes running the ClientApp ``app_ref`` (``module:attribute``), each
    with ``threads`` torch/BLAS threads and the modules ``preload`` imported at start."""

    def __init__(self, app_ref: str, workers: int, threads: int = 1,
                 preload: tuple[str, ...] = ()) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        load_app(app_ref)  # a wrong reference fails here, in the driver, with its reason
        self.app_ref, self.workers, self.threads, self.preload = app_ref, workers, threads, preload
        self._executor: cf.ProcessPoolExecutor | None = None
        self._current: weakref.WeakSet[cf.Future] = weakref.WeakSet()  # the pool's futures

    def _pool(self) -> cf.ProcessPoolExecutor:
        if self._executor is None:
            self._executor = cf.ProcessPoolExecutor(
                max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker, initargs=(self.app_ref, self.threads, self.preload))
        return self._executor

    def warm(self) -> None:
        """Start every worker now, without waiting: their start-up (imports) then overlaps
        the coordinator's own (data, model, first evaluation) instead of round 1."""
        for _ in range(self.workers):
            self._submit(_ready)

    def submit(self, batch: Sequence[Job]) -> cf.Future:
        """Run ``batch`` on a worker; the future's result is :func:`run_batch`'s."""
        try:
            future = self._submit(run_batch, list(batch))
        except cf.process.BrokenProcessPool:
            self.close(wait=False)
            future = self._submit(run_batch, list(batch))
        self._current.add(future)
        return future

    def _submit(self, fn: Callable[..., Any], *args: Any) -> cf.Future:
        # The pool starts its workers inside submit(), in this thread.
        with _main_not_inherited():
            return self._pool().submit(fn, *args)

    def broken(self, future: cf.Future) -> None:
        """``future`` failed because a worker died: if its pool is the current one, drop it,
        and the next :meth:`submit` starts fresh workers. (A dead worker breaks the whole
        pool: every batch in flight then fails, each reporting it once.)"""
        if future in self._current:
            log.warning("a simulation worker process died; starting a new pool")
            self.close(wait=False)

    def close(self, wait: bool = True) -> None:
        """Stop the workers (``wait``: let running batches finish first)."""
        if self._executor is not None:
            self._executor.shutdown(wait=wait, cancel_futures=True)
            self._executor = None
            self._current = weakref.WeakSet()
