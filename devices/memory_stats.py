"""Measure a model's :class:`TrainingMemoryStats` by tracing training steps, and read the
process's resident memory. torch is imported inside the functions.

The trace runs a training step (forward, cross-entropy, backward) on a copy of the model, on
torch's meta device (the same allocations, no arithmetic), under a ``TorchDispatchMode`` that
records every tensor storage created and, through a weak reference, when it is freed: the
running sum is the bytes of live tensors, exactly, at every operator. ``saved_tensors_hooks``
marks the tensors autograd keeps for backward. Two probe batch sizes give the fixed and
per-sample parts (both are linear in the batch). Checked alternatives:
``torch.profiler(profile_memory=True)`` loses allocation events on CPU (its running sum went
negative here), and tracemalloc does not see torch's allocator.

Process RSS follows live tensors only if freed memory returns to the system; glibc keeps
freed blocks below its mmap threshold in the heap, where they fragment, and raises that
threshold as large blocks are freed. ``pin_mmap_threshold`` fixes it low (16 KiB), as a device
client should at start-up; the prediction then counts each tensor in whole pages.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleetfl.devices.memory_planner import ActivationCost, TrainingMemoryStats

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD = 16 * 1024  # bytes: blocks this large or larger are mmap'ed, returned
PAGE = 4096  # bytes; most ARM and x86 Linux kernels (the Pi 5's default kernel uses 16 KiB)
# What glibc adds to an mmap'ed block: its chunk header plus the 64-byte alignment torch's CPU
# allocator asks for (posix_memalign), before rounding up to whole pages.
MMAP_OVERHEAD = 16 + 64


def resident_bytes(nbytes: int, threshold: int = MMAP_THRESHOLD) -> int:
    """Resident bytes of one tensor allocation under a pinned mmap threshold: whole pages for
    a mmap'ed block, the size itself for a small heap block."""
    if nbytes < threshold:
        return nbytes
    return -(-(nbytes + MMAP_OVERHEAD) // PAGE) * PAGE


@dataclass(frozen=True)
class StepTrace:
    """Bytes live at the peak of one traced training step (weights excluded)."""

    peak: int
    saved: int  # of which tensors autograd keeps for backward
    grads: int  # of which parameter gradients


def training_memory_stats(
    model: Any,
    input_shape: tuple[int, ...],
    *,
    optimizer_copies: int = 1,
    probe_batches: tuple[int, int] = (8, 16),
    input_dtype: str = "float32",
) -> TrainingMemoryStats:
    """Stats of training ``model`` on samples of ``input_shape`` (numpy dtype ``input_dtype``)
    with cross-entropy.

    ``optimizer_copies`` is the optimizer state in copies of the trainable weights: 1 for the
    FedProx solver (its anchor w^t), 0 for plain SGD, 2 for Adam. The parameter update's
    temporaries are one copy (the solver's ``w - w^t``). A model with a
    ``set_checkpointing(bool)`` method is traced with it on as well.
    """
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    can_checkpoint = callable(getattr(model, "set_checkpointing", None))
    return TrainingMemoryStats(
        weight_bytes=weights,
        grad_bytes=trainable,
        optimizer_state_bytes=optimizer_copies * trainable,
        update_workspace_bytes=trainable,
        plain=_fit(model, input_shape, input_dtype, probe_batches, checkpointing=False),
        checkpointed=(_fit(model, input_shape, input_dtype, probe_batches, checkpointing=True)
                      if can_checkpoint else None),
    )


def _fit(
    model: Any, input_shape: tuple[int, ...], input_dtype: str, batches: tuple[int, int], *,
    checkpointing: bool
) -> ActivationCost:
    """Fixed and per-sample bytes from traces at two batch sizes."""
    lo, hi = (trace_training_step(model, input_shape, b, checkpointing=checkpointing,
                                  input_dtype=input_dtype)
              for b in batches)
    span = batches[1] - batches[0]
    saved_slope = (hi.saved - lo.saved) / span
    rest_lo, rest_hi = lo.peak - lo.saved - lo.grads, hi.peak - hi.saved - hi.grads
    work_slope = (rest_hi - rest_lo) / span
    return ActivationCost(
        saved_fixed=lo.saved - saved_slope * batches[0],
        saved_per_sample=saved_slope,
        workspace_fixed=rest_lo - work_slope * batches[0],
        workspace_per_sample=work_slope,
        grads_at_peak=max(lo.grads, hi.grads),
    )


def trace_training_step(
    model: Any, input_shape: tuple[int, ...], batch: int, *, checkpointing: bool = False,
    input_dtype: str = "float32",
) -> StepTrace:
    """Trace one forward/backward pass of a copy of ``model`` on a random batch (zeros for an
    integer ``input_dtype``); sizes are resident bytes (``resident_bytes``) of the storages
    created.

    The copy runs on torch's meta device (shapes without data: the same allocations, no
    arithmetic), or on the CPU for a model whose operators have no meta kernel.
    """
    try:
        return _trace(model, input_shape, input_dtype, batch, checkpointing, "meta")
    except (NotImplementedError, RuntimeError):
        return _trace(model, input_shape, input_dtype, batch, checkpointing, "cpu")


def _trace(
    model: Any, input_shape: tuple[int, ...], input_dtype: str, batch: int, checkpointing: bool,
    device: str
) -> StepTrace:
    import torch
    import torch.nn.functional as F

    work = copy.deepcopy(model).to(device).train()
    if checkpointing:
        work.set_checkpointing(True)
    for p in work.parameters():
        p.grad = None
    tracker = _tracker()
    saved: set[int] = set()  # allocation numbers of tensors kept for backward

    def pack(t: torch.Tensor) -> torch.Tensor:
        entry = tracker.live.get(_key(t.untyped_storage()))
        if entry is not None:  # None: a weight, created before the trace
            saved.add(entry[1])
        return t

    with tracker:
        dtype = getattr(torch, input_dtype)
        x = (torch.randn((batch, *input_shape), device=device, dtype=dtype)
             if dtype.is_floating_point else
             torch.zeros((batch, *input_shape), device=device, dtype=dtype))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = work(x)
        loss = F.cross_entropy(logits, torch.zeros(batch, dtype=torch.long, device=device))
        del x, logits
        loss.backward()
        del loss
    grads = {tracker.live[_key(p.grad.untyped_storage())][1]
             for p in work.parameters() if p.grad is not None}
    at_peak = tracker.at_peak()
    return StepTrace(
        peak=tracker.peak,
        saved=sum(n for serial, n in at_peak.items() if serial in saved),
        grads=sum(n for serial, n in at_peak.items() if serial in grads),
    )


def _key(storage: Any) -> int:
    """Identity of a live storage: its address, or the object for data-less (meta) ones."""
    return storage.data_ptr() or id(storage)


def _tracker() -> Any:
    """A dispatch mode summing the bytes of live storages created while it is active. Each
    allocation gets a serial number, since addresses and ids are reused once freed."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Tracker(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.live: dict[int, tuple[int, int]] = {}  # key -> (bytes, serial)
            self.freed: list[tuple[int, int, int]] = []  # (serial, bytes, serial count then)
            self.total = self.peak = self.serial = self.peak_serial = 0

        def _freed(self, key: int) -> None:
            size, serial = self.live.pop(key)
            self.total -= size
            self.freed.append((serial, size, self.serial))

        def at_peak(self) -> dict[int, int]:
            """Bytes of each allocation live at the peak, by serial number."""
            live = {s: n for n, s in self.live.values() if s <= self.peak_serial}
            live.update((s, n) for s, n, died in self.freed if s <= self.peak_serial < died)
            return live

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if not hasattr(t, "untyped_storage"):
                    continue
                storage = t.untyped_storage()
                key = _key(storage)
                if key in self.live:  # a view, or an in-place result
                    continue
                self.serial += 1
                size = resident_bytes(storage.nbytes())
                self.live[key] = (size, self.serial)
                self.total += size
                weakref.finalize(storage, self._freed, key)
                if self.total > self.peak:
                    self.peak, self.peak_serial = self.total, self.serial
            return out

    return Tracker()


# --- the process's resident memory (Linux /proc) -------------------------------------------


def pin_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Make glibc mmap every block of ``threshold`` bytes or more, so that freeing a tensor
    returns its pages at once and RSS tracks live tensors. False where glibc is absent."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False


def _status_bytes(field: str, pid: int | str = "self") -> int:
    path = Path(f"/proc/{pid}/status")
    for line in path.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"{path} has no {field}")


def major_faults(pid: int | str = "self") -> int:
    """Major page faults of process ``pid`` so far (``/proc/PID/stat`` field 12): pages that had
    to be read from disk, e.g. library code the kernel dropped under memory pressure."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[9])  # fields after "(comm)" start at field 3


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size (VmRSS) of process ``pid`` now, bytes (default: this process)."""
    return _status_bytes("VmRSS", pid)


def release_free_memory() -> None:
    """Collect garbage and hand the allocator's free pages back (glibc ``malloc_trim``), so
    that a measurement that follows starts from memory actually in use."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_rss_delta(fn: Callable[[], Any]) -> int:
    """Bytes by which the resident set's high-water mark rose above its level on entry while
    ``fn()`` ran: writing 5 to /proc/self/clear_refs resets VmHWM to the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")
    start = rss_bytes()
    fn()
    return _status_bytes("VmHWM") - start
