"""Peak-memory-optimal operator orders: SERENITY (Ahn et al., MLSys 2020) on an :class:`OpGraph`.

Memory model (the paper's): running node ``u`` needs every live activation plus ``u``'s outputs;
afterwards a tensor is freed once all its readers have run, unless it is a model output. The
peak of an order is the largest such sum, in bytes; constants are not counted.

The search is dynamic programming over partial schedules keyed by their signature, the set of
scheduled nodes (a bitmask; the zero-indegree frontier follows from it), keeping the lowest
partial peak per signature; that is exact because what is live after a set of nodes depends
only on the set. On top of it:

* divide and conquer: a node every other node is an ancestor or a descendant of splits every
  order into "before" and "after", so each piece is scheduled on its own;
* a dominance rule: a ready node that frees at least what it allocates and whose transient stays
  under the partial peak can run first without loss (moving it earlier never raises memory);
* a deferral rule: a node that only passes memory on (``Problem.deferrable``: unary chains,
  ``x * w``, relu...) runs only when it completes a successor's inputs (moving it later never
  raises memory), which removes most orderings of independent chains;
* adaptive soft budgeting: states above a budget ``tau`` are pruned; a search that finishes under
  ``tau`` is optimal, one that finds nothing proves the optimum exceeds ``tau`` (a better lower
  bound), one that blows the state limit makes ``tau`` come down;
* a bounded beam fallback when exact search does not finish, reporting its gap to the best
  lower bound.

Pure Python integers and dicts: no torch, no numpy needed.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Sequence
from dataclasses import dataclass

from fleetfl.devices.graph import OpGraph
from fleetfl.devices.segments import Problem, segment_problems

_SOLVED, _NO_SOLUTION, _TOO_MANY = "solved", "no-solution", "too-many"


@dataclass(frozen=True)
class Schedule:
    """An operator order and what is known about it; sizes in bytes, time in seconds."""

    order: tuple[int, ...]  # node indices in execution order
    peak_bytes: int
    lower_bound_bytes: int  # proven: no order of the graph peaks lower
    optimal: bool  # True when the search proved peak_bytes minimal
    method: str  # "dp" when every piece was solved exactly, else "beam"
    segments: int  # pieces after divide and conquer
    states: int  # partial schedules expanded
    seconds: float

    @property
    def gap(self) -> float:
        """Relative distance to the lower bound, ``peak / lower_bound - 1`` (0 when optimal)."""
        return 0.0 if self.optimal else self.peak_bytes / max(self.lower_bound_bytes, 1) - 1.0


def memory_profile(graph: OpGraph, order: Sequence[int]) -> list[int]:
    """Bytes live while each node of ``order`` runs (its inputs, its outputs, everything kept).

    Raises:
        ValueError: ``order`` is not a topological order of ``graph``.
    """
    if not graph.is_topological(order):
        raise ValueError("order is not a topological order of the graph")
    remaining = [len(c) for c in graph.consumers()]
    kept = set(graph.outputs)
    live = sum(graph.tensor_bytes[t] for t in set(graph.inputs))
    profile = []
    for u in order:
        outs = set(graph.node_outputs[u])
        live += sum(graph.tensor_bytes[t] for t in outs)
        profile.append(live)
        for t in graph.node_inputs[u]:
            remaining[t] -= 1
        for t in outs | set(graph.node_inputs[u]):
            if remaining[t] == 0 and t not in kept:
                live -= graph.tensor_bytes[t]
    return profile


def peak_memory(graph: OpGraph, order: Sequence[int] | None = None) -> int:
    """Peak bytes of running ``graph`` in ``order`` (default: the exporter's order)."""
    profile = memory_profile(graph, range(graph.num_nodes) if order is None else order)
    return max(profile, default=sum(graph.tensor_bytes[t] for t in set(graph.inputs)))


def lower_bound(graph: OpGraph) -> int:
    """Bytes every order needs: the most any single node holds (its inputs plus outputs), or
    what is live where a piece starts or ends, plus what passes through it."""
    return max((p.lower_bound() + p.offset for p in segment_problems(graph)), default=0)


def optimal_schedule(
    graph: OpGraph,
    *,
    budget_bytes: int | None = None,
    max_states: int = 400_000,
    beam_width: int = 2_000,
    time_limit_s: float = 60.0,
) -> Schedule:
    """The order of ``graph`` with the lowest peak memory, or the best beam order if exact
    search exceeds ``max_states`` stored partial schedules or ``time_limit_s``.

    Pieces are solved from the most to the least memory-hungry; a piece that cannot raise the
    peak above what is already proven unavoidable keeps its quick order. ``budget_bytes`` is
    the first soft budget tried; whether the result fits it is the caller's comparison.
    """
    started = time.perf_counter()
    deadline = started + time_limit_s
    problems = segment_problems(graph)
    if not problems:  # a graph without operators
        empty = peak_memory(graph, [])
        return Schedule((), empty, empty, True, "dp", 0, 0, time.perf_counter() - started)
    starts = [_quick(p) for p in problems]
    floor = max(start.lower + p.offset for p, start in zip(problems, starts, strict=True))
    results: dict[int, _Solved] = {}
    exact = True
    for i in sorted(range(len(problems)), key=lambda i: -starts[i].peak - problems[i].offset):
        p = problems[i]
        budget = None if budget_bytes is None else budget_bytes - p.offset
        results[i] = _solve(p, starts[i], floor - p.offset, budget, max_states, beam_width,
                            deadline)
        floor = max(floor, results[i].lower + p.offset)  # still a proven lower bound
        exact = exact and results[i].exact
    order = [p.nodes[u] for i, p in enumerate(problems) for u in results[i].order]
    peak = max(results[i].peak + p.offset for i, p in enumerate(problems))
    assert peak == peak_memory(graph, order), "piece accounting disagrees with the model"
    states = sum(r.states for r in results.values()) + sum(s.states for s in starts)
    return Schedule(tuple(order), peak, floor, peak <= floor, "dp" if exact else "beam",
                    len(problems), states, time.perf_counter() - started)


def beam_schedule(graph: OpGraph, width: int = 64) -> Schedule:
    """A fast order from a beam of ``width`` partial schedules per step (width 1: greedy)."""
    started = time.perf_counter()
    order: list[int] = []
    peak = lower = states = 0
    problems = segment_problems(graph)
    for problem in problems:
        found = _search(problem, float("inf"), None, width, None)
        assert found.status == _SOLVED
        order.extend(problem.nodes[u] for u in found.order)
        peak = max(peak, found.peak + problem.offset)
        lower = max(lower, problem.lower_bound() + problem.offset)
        states += found.states
    if not problems:
        peak = lower = peak_memory(graph, [])
    return Schedule(tuple(order), peak, lower, peak == lower, "beam", len(problems), states,
                    time.perf_counter() - started)


# --- one piece --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Solved:
    order: list[int]
    peak: int
    lower: int  # proven lower bound of this piece's optimum
    exact: bool  # False when the order came from the beam fallback
    states: int


@dataclass(frozen=True)
class _Found:
    status: str
    order: list[int]
    peak: int
    states: int


def _quick(p: Problem) -> _Solved:
    """The better of the exporter's order and a narrow beam, with the static lower bound."""
    given = list(range(p.n))
    beam = _search(p, float("inf"), None, 32, None)
    order, peak = (beam.order, beam.peak) if beam.peak < p.peak(given) else (given, p.peak(given))
    return _Solved(order, peak, p.lower_bound(), peak <= p.lower_bound(), beam.states)


def _solve(
    p: Problem,
    start: _Solved,
    enough: int,
    budget: int | None,
    max_states: int,
    width: int,
    deadline: float,
) -> _Solved:
    """Adaptive soft budgeting around the exact search, from the quick order ``start``; an
    order peaking at most ``enough`` bytes is as good as any. Beam search if it cannot finish.
    """
    ub_order, ub, lo, states = start.order, start.peak, start.lower, 0
    if ub <= max(lo, enough):
        return _Solved(ub_order, ub, lo, True, states)
    # The hard budget is ub - 1: a search under it either beats ub, optimally, or proves ub
    # optimal. First try a cheaper soft budget (what is good enough, or the caller's budget);
    # when a budget holds too many states, come down towards the lower bound.
    cap, shrunk = ub - 1, False
    tau = next((b for b in (enough, budget) if b is not None and lo <= b < cap), cap)
    while lo <= cap and time.perf_counter() < deadline:
        found = _search(p, tau, max_states, None, deadline)
        states += found.states
        if found.status == _SOLVED:
            return _Solved(found.order, found.peak, found.peak, True, states)
        if found.status == _NO_SOLUTION:
            lo = tau + 1  # every order peaks above tau
            tau = (lo + cap + 1) // 2 if shrunk else cap
        else:
            cap, shrunk = tau - 1, True
            tau = (lo + cap) // 2
    if lo >= ub:  # every order below ub was ruled out
        return _Solved(ub_order, ub, ub, True, states)
    beam = _search(p, float("inf"), None, width, None)
    states += beam.states
    best_order, best = (beam.order, beam.peak) if beam.peak < ub else (ub_order, ub)
    return _Solved(best_order, best, min(lo, best), False, states)


def _search(
    p: Problem, budget: float, max_states: int | None, width: int | None, deadline: float | None
) -> _Found:
    """Dynamic programming over scheduled-node bitmasks, one level per node scheduled.

    States whose partial peak exceeds ``budget`` are pruned. ``width`` keeps only the best
    states of each level (beam search); otherwise more than ``max_states`` stored states, or
    the ``deadline``, ends the search with ``too-many``. A deferrable node
    (``Problem.deferrable``) runs only when it completes a successor's inputs but for other
    ready deferrable nodes: anywhere earlier it would only hold memory longer.
    """
    alloc, frees, preds, succs = p.alloc, p.frees, p.pred_mask, p.succ
    defer = p.deferrable
    defer_mask = sum(1 << u for u in range(p.n) if defer[u])
    ready0 = sum(1 << u for u in range(p.n) if preds[u] == 0)
    level: dict[int, tuple[int, int, int]] = {0: (p.live0, p.live0, ready0)}
    parents: list[dict[int, int]] = []
    stored = expanded = 0
    for _depth in range(p.n):
        nxt: dict[int, tuple[int, int, int]] = {}
        back: dict[int, int] = {}
        for s, (peak, live, ready) in level.items():
            moves = []
            forced = False
            r = ready
            while r:
                low = r & -r
                r ^= low
                u = low.bit_length() - 1
                s2 = s | low
                mem = live + alloc[u]
                after = mem
                for size, readers in frees[u]:
                    if readers & s2 == readers:
                        after -= size
                if after <= live and mem <= peak:  # dominance: run u now, nothing else
                    moves = [(u, low, s2, mem, after)]
                    forced = True
                    break
                moves.append((u, low, s2, mem, after))
            for u, low, s2, mem, after in moves:
                new_peak = peak if peak >= mem else mem
                if new_peak > budget:
                    continue
                old = nxt.get(s2)
                if old is not None:
                    if new_peak < old[0]:
                        nxt[s2] = (new_peak, old[1], old[2])
                        back[s2] = u
                    continue
                ready2 = ready ^ low
                for v in succs[u]:
                    if preds[v] & s2 == preds[v]:
                        ready2 |= 1 << v
                if defer[u] and not forced:
                    waiting = ready2 & defer_mask  # may complete a successor's inputs with u
                    if not any(preds[c] & ~s2 & ~waiting == 0 for c in succs[u]):
                        continue
                nxt[s2] = (new_peak, after, ready2)
                back[s2] = u
        expanded += len(level)
        if not nxt:
            return _Found(_NO_SOLUTION, [], 0, expanded)
        if width is not None and len(nxt) > width:
            nxt = dict(heapq.nsmallest(width, nxt.items(), key=lambda kv: kv[1][:2]))
            back = {s: back[s] for s in nxt}
        stored += len(nxt)
        too_late = deadline is not None and time.perf_counter() > deadline
        if max_states is not None and (stored > max_states or too_late):
            return _Found(_TOO_MANY, [], 0, expanded)
        parents.append(back)
        level = nxt
    ((full, (peak, _, _)),) = level.items()
    order = []
    for back in reversed(parents):
        u = back[full]
        order.append(u)
        full ^= 1 << u
    order.reverse()
    return _Found(_SOLVED, order, peak, expanded)
