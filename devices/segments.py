"""Divide and conquer for the scheduler: cut an :class:`OpGraph` into independent pieces.

A node that every other node is an ancestor or a descendant of (a *cut*: the graph narrows to
it, as between RandWire stages) is scheduled after all of its ancestors and before all of its
descendants in every order, so the pieces between cuts can be ordered on their own. Each piece
becomes a :class:`Problem` with local node numbers, the activations live when it starts, and a
constant ``offset`` for activations that merely pass through it. All sizes are bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fleetfl.devices.graph import OpGraph, topological_order


@dataclass(frozen=True)
class Problem:
    """One piece, compiled for the search: local node ``i`` is ``nodes[i]`` of the graph.

    ``alloc[u]``: bytes node ``u`` writes. ``frees[u]``: ``(bytes, readers)`` of each tensor
    ``u`` touches that may die, freed once the local bitmask ``readers`` is all scheduled.
    ``pred_mask[u]``: local predecessors; ``succ_mask[u]``: local successors. Moving a
    ``deferrable[u]`` node to just before its first successor never raises memory: its lasting
    outputs cover its inputs, which it may now keep alive longer (so nothing in between grows),
    and its inputs plus its at-once-dead outputs fit in what any successor allocates (so its
    own transient stays under that successor's). The search therefore only runs it there.
    ``live0``: bytes live at the start that this piece touches; ``offset``: bytes live
    throughout that it does not touch. ``in_bytes[u]``: bytes of ``u``'s activation inputs.
    """

    nodes: tuple[int, ...]
    alloc: tuple[int, ...]
    frees: tuple[tuple[tuple[int, int], ...], ...]
    pred_mask: tuple[int, ...]
    succ: tuple[tuple[int, ...], ...]
    succ_mask: tuple[int, ...]
    deferrable: tuple[bool, ...]
    in_bytes: tuple[int, ...]
    live0: int
    final_live: int
    offset: int

    @property
    def n(self) -> int:
        return len(self.nodes)

    def peak(self, order: Sequence[int]) -> int:
        """Peak bytes of this piece (without ``offset``) in the local ``order``."""
        scheduled, live, peak = 0, self.live0, self.live0
        for u in order:
            scheduled |= 1 << u
            mem = live + self.alloc[u]
            peak = max(peak, mem)
            live = mem - sum(size for size, r in self.frees[u] if r & scheduled == r)
        return peak

    def lower_bound(self) -> int:
        """Bytes any order of this piece needs (without ``offset``): each node holds its inputs
        and outputs; the first node adds to what is live at the start; the last leaves what is
        kept."""
        first = min((self.alloc[u] for u in range(self.n) if self.pred_mask[u] == 0), default=0)
        per_node = max((i + a for i, a in zip(self.in_bytes, self.alloc, strict=True)), default=0)
        return max(per_node, self.live0 + first, self.final_live)


def cut_nodes(graph: OpGraph, order: Sequence[int]) -> list[int]:
    """Nodes comparable with every other node, in ``order`` (a topological order)."""
    preds = graph.predecessors()
    succs = graph.successors()
    anc = [0] * graph.num_nodes
    desc = [0] * graph.num_nodes
    for u in order:
        for p in preds[u]:
            anc[u] |= anc[p] | (1 << p)
    for u in reversed(order):
        for s in succs[u]:
            desc[u] |= desc[s] | (1 << s)
    full = (1 << graph.num_nodes) - 1
    return [u for u in order if anc[u] | desc[u] | (1 << u) == full]


def segment_problems(graph: OpGraph) -> list[Problem]:
    """The graph's pieces between cut nodes, in execution order (each cut ends its piece)."""
    order = topological_order(graph)
    if order is None:
        raise ValueError("the operator graph has a cycle")
    cuts = set(cut_nodes(graph, order))
    pieces: list[list[int]] = [[]]
    for u in order:
        pieces[-1].append(u)
        if u in cuts:
            pieces.append([])
    pieces = [p for p in pieces if p]
    done = [False] * graph.num_nodes
    problems = []
    for piece in pieces:
        problems.append(_compile(graph, piece, done))
        for u in piece:
            done[u] = True
    return problems


def _compile(graph: OpGraph, piece: list[int], done: list[bool]) -> Problem:
    """The :class:`Problem` of ``piece`` when the nodes flagged in ``done`` have run."""
    local = {u: i for i, u in enumerate(piece)}
    prod = graph.producers()
    cons = graph.consumers()
    size = graph.tensor_bytes
    outputs = set(graph.outputs)

    def ran(u: int) -> bool:
        return u < 0 or done[u]

    def kept(t: int) -> bool:  # must outlive this piece
        return t in outputs or any(not done[c] and c not in local for c in cons[t])

    def readers(t: int) -> int:
        return sum(1 << local[c] for c in cons[t] if c in local)

    touched = {t for u in piece for t in (*graph.node_inputs[u], *graph.node_outputs[u])}
    live_at_start = [
        t for t in range(len(size))
        if ran(prod[t]) and (t in outputs or any(not done[c] for c in cons[t])
                             or (prod[t] < 0 and not cons[t]))
    ]
    live0 = sum(size[t] for t in live_at_start if t in touched)
    offset = sum(size[t] for t in live_at_start if t not in touched)
    alloc, frees, pred_mask, succ, in_bytes = [], [], [], [], []
    dying: set[int] = set()
    for u in piece:
        outs = graph.node_outputs[u]
        alloc.append(sum(size[t] for t in outs))
        mortal = [t for t in dict.fromkeys((*graph.node_inputs[u], *outs)) if not kept(t)]
        dying.update(mortal)
        frees.append(tuple((size[t], readers(t)) for t in mortal))
        preds = {local[prod[t]] for t in graph.node_inputs[u] if prod[t] in local}
        pred_mask.append(sum(1 << p for p in preds))
        succ.append(tuple(sorted({local[c] for t in outs for c in cons[t] if c in local})))
        in_bytes.append(sum(size[t] for t in graph.node_inputs[u]))
    final_live = live0 + sum(alloc) - sum(size[t] for t in dying)
    # Bytes of each node's outputs that outlive it (read later, or kept) and that die at once.
    lasting = [sum(size[t] for t in graph.node_outputs[u] if cons[t] or kept(t)) for u in piece]
    dead = [a - keep for a, keep in zip(alloc, lasting, strict=True)]
    deferrable = [
        bool(succ[u]) and in_bytes[u] <= lasting[u]
        and all(in_bytes[u] + dead[u] <= alloc[c] for c in succ[u])
        for u in range(len(piece))
    ]
    return Problem(
        nodes=tuple(piece), alloc=tuple(alloc), frees=tuple(frees), pred_mask=tuple(pred_mask),
        succ=tuple(succ), succ_mask=tuple(sum(1 << c for c in cs) for cs in succ),
        deferrable=tuple(deferrable), in_bytes=tuple(in_bytes), live0=live0,
        final_live=final_live, offset=offset,
    )
