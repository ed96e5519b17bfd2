"""FleetFedProx: Flower's FedProx with per-client work plans and partial-work aggregation.

Server-side math is FedProx's (= FedAvg's) weighted average over the kept replies,

    w^{t+1} = sum_{k in S_t} n_k w_k^{t+1} / sum_{k in S_t} n_k,

where S_t is the cohort minus failed, rejected and late replies. What this class adds:

* ``configure_train`` sends **each client its own** ``ConfigRecord``: the round's settings plus
  the client's work plan (``plan.*``) from its device profile, the straggler draw, the
  deadline and its memory budget (see :mod:`fleetfl.coordinator.planning`); online clients
  whose device cannot fit any memory plan are not selected (``RoundStats.unfit``), and a client
  that refuses its plan (``RoundStats.memory_refused``) counts as failed.
* the model travels as a codec blob (pruned, int8/fp16/fp32) and each client returns its update
  Δ_k = w_k − w^t as a codec blob (int8 with the cohort's shared clip range, or float32), see
  :mod:`fleetfl.coordinator.transport`; the average above is applied as
  w^{t+1} = w^t + sum_k n_k Δ_k / sum_k n_k.
* ``aggregate_train`` validates every reply (codec: names, shapes, counts, dtype, scale, round,
  mask id, NaN/Inf, checksum; metrics) and rejects a bad one *for that client only*; keeps
  stragglers' partial work (FedProx) or drops it (``drop_stragglers``, FedAvg's behaviour in the
  FedProx paper); measures bytes from the serialized messages and advances the virtual clock.
* combining holds no math here: each kept reply is added to the round's aggregator
  (:mod:`fleetfl.aggregation.aggregator`, chosen by ``_aggregator``) with its weight, and the
  server optimizer steps on the result (:mod:`fleetfl.aggregation.server_opt`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedProx

from fleetfl import protocol as P
from fleetfl.aggregation.aggregator import Aggregator, FloatMean, Int8Sum
from fleetfl.aggregation.combine import Combined, RobustRule
from fleetfl.aggregation.int8_mean import update_weights
from fleetfl.aggregation.server_opt import ServerOptimizer, apply_step
from fleetfl.coordinator.planning import PlanSettings, draw_cohort, plan_cohort, probe_plan
from fleetfl.coordinator.population import SimulatedFleet
from fleetfl.coordinator.registry import ClientInfo, FleetRegistry
from fleetfl.coordinator.transport import ModelTransport
from fleetfl.devices.clock import VirtualClock, client_round_time_s, round_time_s
from fleetfl.devices.workplan import WorkPlan

log = logging.getLogger(__name__)


# A reply's metrics record is a few hundred bytes; plan with room to spare.
_METRICS_ALLOWANCE_BYTES = 1024


class ReplyError(ValueError):
    """A client's reply that cannot be aggregated; the round goes on without it."""


@dataclass
class RoundStats:
    """What happened in one training round (counts of clients, bytes, simulated seconds)."""

    server_round: int
    selected: int = 0
    aggregated: int = 0
    stragglers: int = 0  # clients given a partial plan (straggler draw or deadline)
    dropped_stragglers: int = 0
    rejected: int = 0  # replies that failed validation
    failed: int = 0  # error replies or no reply
    missed_deadline: int = 0
    received: int = 0  # replies that carried an update (their bytes count as uplink)
    uplink_bytes: int = 0
    dense_uplink_bytes: int = 0  # what the same replies would be as plain Flower fp32 records
    downlink_bytes: int = 0
    round_time_s: float = 0.0  # simulated: slowest client waited for, capped by the deadline
    client_train_loss: float = math.nan  # example-weighted mean of the clients' local losses
    sparsity: float = 0.0  # fraction of prunable weights pruned in this round's model
    values_total: int = 0  # values of the whole model (what a dense update carries)
    values_kept: int = 0  # values of this round's update: the unpruned ones
    clip: float = math.nan  # shared int8 clip range used this round
    unfit: int = 0  # online clients not selected: no memory plan fits their device
    memory_refused: int = 0  # of the failed: clients that refused a plan over their memory
    secagg_uplink_bytes: int = 0  # secure aggregation's extra messages, client -> coordinator
    secagg_downlink_bytes: int = 0  # ... coordinator -> clients (incl. stage 3's requests)
    secagg_server_s: float = 0.0  # coordinator compute seconds in the protocol
    secagg_aborted: int = 0  # 1: too few clients to unmask; no model update this round
    norm_bounded: int = 0  # readable updates scaled down to the round's norm bound
    secagg_refused: int = 0  # 1: the unmasked sum was out of honest bounds; no model update
    executorch: int = 0  # replies whose client says it trained in ExecuTorch's runtime


@dataclass(frozen=True)
class _Reply:
    node: int
    update: Any  # int8 or float32 Δ by tensor name; a SecAgg+ record under secure aggregation
    num_examples: int
    samples: int
    loss: float


class FleetFedProx(FedProx):
    """FedProx over a heterogeneous fleet: per-client work plans, partial work kept."""

    def __init__(
        self,
        *,
        registry: FleetRegistry | SimulatedFleet,
        transport: ModelTransport,
        settings: PlanSettings,
        proximal_mu: float,
        flops_per_sample: float,
        drop_stragglers: bool = False,
        robust: RobustRule | None = None,
        server_opt: ServerOptimizer | None = None,
        clock: VirtualClock | None = None,
    ) -> None:
        super().__init__(
            fraction_evaluate=0.0,  # the simulation evaluates centrally (evaluate_fn)
            min_train_nodes=1,
            min_available_nodes=1,
            proximal_mu=proximal_mu,
        )
        self.registry = registry
        self.transport = transport
        self.settings = settings
        self.flops_per_sample = flops_per_sample
        self.drop_stragglers = drop_stragglers
        self.robust = robust or RobustRule()
        self.server_opt = server_opt or ServerOptimizer()
        self.clock = clock  # the run's virtual clock: a round starts at clock.now_s
        self.history: list[RoundStats] = []
        self._cohort: dict[int, ClientInfo] = {}
        self._plans: dict[int, WorkPlan] = {}
        self._down: dict[int, int] = {}
        self._keys: list[str] = []
        self._base: dict[str, np.ndarray] = {}
        self._dense_reply_bytes = 0
        self._omega: dict[int, float] = {}
        # Rounds already finished by an earlier process (resume): Flower's ``start`` counts
        # from 1, the fleet's round numbers (plans, masks, replay checks) go on from here.
        self.round_offset = 0

    @property
    def cohort_nodes(self) -> list[int]:
        """Node ids of the latest round's cohort (selected for training)."""
        return list(self._cohort)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Register new nodes, sample the cohort, and send each client its own plan."""
        server_round += self.round_offset
        self.registry.wait_for(grid, self.settings.min_clients, self.settings.round_wait_s)
        config[P.SERVER_ROUND] = server_round
        config[P.PROXIMAL_MU] = self.proximal_mu
        self._keys = list(arrays.keys())
        self._base = dict(zip(self._keys, arrays.to_numpy_ndarrays(), strict=True))
        self.transport.begin_round(server_round, self._base)  # prunes _base in place
        config[P.CLIP] = self.transport.clip
        self._dense_reply_bytes = _plain_flower_reply_bytes(arrays)
        now_s = self.clock.now_s if self.clock is not None else 0.0
        drawn = draw_cohort(self.registry.population, server_round, self.settings, now_s)
        cohort = drawn.members
        if drawn.unfit_example is not None:
            client, why = drawn.unfit_example
            log.info("round %d: %d online client(s) left out, no memory plan fits (client %d: "
                     "%s)", server_round, drawn.unfit_count, client.index, why)
        self._plans = plan_cohort(
            cohort,
            server_round,
            self.settings,
            flops_per_sample=self.flops_per_sample,
            downlink_bytes=self._downlink_estimate(config),
            uplink_bytes=self._uplink_estimate(),
        )
        self._cohort = {c.node_id: c for c in cohort}
        stats = RoundStats(server_round, selected=len(cohort), sparsity=self.transport.sparsity,
                           values_total=self.transport.total_count,
                           values_kept=self.transport.kept_count,
                           clip=self.transport.clip, unfit=drawn.unfit_count)
        stats.stragglers = sum(p.straggler for p in self._plans.values())
        messages = []
        # ω_k = n_k |C| / Σ n_j: the int8 average becomes a sum of integers (P.UPDATE_WEIGHT).
        self._omega = (update_weights({c.node_id: c.num_examples for c in cohort})
                       if cohort else {})
        for client in cohort:
            cfg = ConfigRecord({**config, **self._plans[client.node_id].to_config(),
                                P.UPDATE_WEIGHT: self._omega[client.node_id]})
            blob = self.transport.model_blob(client.node_id)
            content = RecordDict({P.CONFIG: cfg, P.PAYLOAD: ConfigRecord({P.MODEL_BLOB: blob})})
            self._down[client.node_id] = P.record_bytes(content)
            stats.downlink_bytes += self._down[client.node_id]
            messages.append(
                Message(content, dst_node_id=client.node_id, message_type=MessageType.TRAIN)
            )
        self.history.append(stats)
        return messages

    def _downlink_estimate(self, config: ConfigRecord) -> int:
        """Bytes of this round's largest train message (with bitmaps, placeholder plan)."""
        probe = ConfigRecord({**config, **probe_plan(self.settings).to_config()})
        blob = ConfigRecord({P.MODEL_BLOB: self.transport.model_blob(-1)})
        return P.record_bytes(RecordDict({P.CONFIG: probe, P.PAYLOAD: blob}))

    def _uplink_estimate(self) -> int:
        """An upper bound of a reply: the largest update blob of this round plus metrics.

        A bound rather than last round's sizes, because entropy-coded updates vary in size and
        a plan must keep a slow device inside the deadline.
        """
        return self.transport.max_update_bytes() + _METRICS_ALLOWANCE_BYTES

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen replies, keep or drop partial work, and average what is kept."""
        server_round += self.round_offset
        stats = self.history[-1]
        kept: list[_Reply] = []
        waited: list[float] = []
        answered: set[int] = set()
        errored: set[int] = set()
        for msg in replies:
            node = msg.metadata.src_node_id
            if node not in self._cohort or node in answered:
                # The SuperLink answers for a node that went offline, in its own name.
                why = f": {msg.error.reason}" if msg.has_error() else ""
                log.warning("round %d: ignoring a reply from node %d%s", server_round, node, why)
                continue
            if msg.has_error():
                errored.add(node)
                self.transport.forget(node)
                refused = msg.error.code == P.ERROR_PLAN_REFUSED
                stats.memory_refused += refused
                log.warning("round %d: client %d %s: %s", server_round, self._cohort[node].index,
                            "refused its work plan" if refused else "failed", msg.error.reason)
                continue
            answered.add(node)
            stats.executorch += _says_executorch(msg)
            up = P.record_bytes(msg.content)
            stats.uplink_bytes += up
            stats.received += 1
            stats.dense_uplink_bytes += self._dense_reply_bytes
            try:
                reply = self._read_reply(msg)
            except ReplyError as err:
                stats.rejected += 1
                log.warning("round %d: rejected update of client %d: %s",
                            server_round, self._cohort[node].index, err)
                continue
            seconds = client_round_time_s(
                self._cohort[node].device,
                flops=reply.samples * self.flops_per_sample,
                uplink_bytes=up,
                downlink_bytes=self._down[node],
            )
            if self.settings.deadline_s and seconds > self.settings.deadline_s:
                stats.missed_deadline += 1
                continue
            waited.append(seconds)
            if self._plans[node].straggler and self.drop_stragglers:
                stats.dropped_stragglers += 1
                continue
            # Weight by the example count the client registered with, not what it claims now.
            kept.append(_Reply(node, reply.update, self._cohort[node].num_examples,
                               reply.samples, reply.loss))
        # Error replies, silence and the SuperLink's "node unavailable" replies alike.
        stats.failed = stats.selected - len(answered)
        for node in set(self._cohort) - answered - errored:
            log.warning("round %d: client %d sent no reply in time", server_round,
                        self._cohort[node].index)
        for node in set(self._cohort) - answered:
            self.transport.forget(node)
        stats.round_time_s = round_time_s(waited, self.settings.deadline_s)
        stats.aggregated = len(kept)
        # Fleet-index order, not arrival order: float sums (weights, losses) then give the
        # same bits on every run and engine, whichever client happened to answer first.
        kept.sort(key=lambda r: self._cohort[r.node].index)
        mean_delta = self._combine(kept, stats) if kept else None
        self.transport.end_round()  # after _combine: secure aggregation sums the tail counts
        if mean_delta is None:
            log.warning("round %d: no usable update; the global model is unchanged", server_round)
            return None, None
        weights = [r.num_examples for r in kept]
        stats.client_train_loss = float(np.average([r.loss for r in kept], weights=weights))
        step = self.server_opt.step(dict(zip(self._keys, mean_delta, strict=True)))
        new = apply_step({k: self._base[k] for k in self._keys}, step, self.transport.masks)
        metrics = MetricRecord(
            {P.TRAIN_LOSS: stats.client_train_loss, P.NUM_EXAMPLES: int(sum(weights))}
        )
        return P.arrays_to_record(self._keys, [new[k] for k in self._keys]), metrics

    def _combine(self, kept: list[_Reply], stats: RoundStats) -> list[np.ndarray] | None:
        """The kept replies' Δ̄, tensors in ``self._keys`` order (``None``: no update): each
        added to this round's :meth:`_aggregator` with its weight, then read."""
        aggregator = self._aggregator()
        for r in kept:
            aggregator.add(r.node, self._update_of(r), self._weight_of(r))
        result = aggregator.result()
        self._account(aggregator, result, stats)
        return None if result is None else result.delta

    def _aggregator(self) -> Aggregator:
        """float32 updates: the example-weighted mean; int8: the exact integer sum (ω weights);
        both with ``self.robust``'s norm bounds and rule (:mod:`fleetfl.aggregation`)."""
        if self.transport.settings.update_bits == 32:
            return FloatMean(self.robust)
        return Int8Sum(self.robust, self.transport.clip)

    def _update_of(self, reply: _Reply) -> Any:
        """What the aggregator adds: the reply's tensors in ``self._keys`` order."""
        return [reply.update[k] for k in self._keys]

    def _weight_of(self, reply: _Reply) -> float:
        """n_k (registered, not claimed) for float32 updates, ω_k for int8 ones."""
        if self.transport.settings.update_bits == 32:
            return reply.num_examples
        return self._omega[reply.node]

    def _account(self, aggregator: Aggregator, result: Combined | None,
                 stats: RoundStats) -> None:
        """Record what combining did: updates scaled down to the norm bound."""
        stats.norm_bounded = result.norm_bounded if result is not None else 0
        if stats.norm_bounded:
            log.warning("round %d: %d update(s) scaled down to the norm bound "
                        "(aggregation.clip_norm, aggregation.norm_bound_ratio)",
                        stats.server_round, stats.norm_bounded)

    def _read_reply(self, msg: Message) -> _Reply:
        """Validate one training reply (raises :class:`ReplyError` naming the problem)."""
        content = msg.content
        if P.METRICS not in content.metric_records:
            raise ReplyError(f"reply lacks '{P.METRICS}'")
        metrics = content.metric_records[P.METRICS]
        try:
            n = int(metrics[P.NUM_EXAMPLES])
            samples = int(metrics[P.SAMPLES_PROCESSED])
            loss = float(metrics[P.TRAIN_LOSS])
        except (KeyError, TypeError, ValueError) as err:
            raise ReplyError(f"bad metrics: {err!r}") from None
        if n <= 0 or samples < 0 or not math.isfinite(loss):
            raise ReplyError(f"implausible reply: {n=} {samples=} {loss=}")
        node = msg.metadata.src_node_id
        return _Reply(node, self._read_update(msg), n, samples, loss)

    def _read_update(self, msg: Message) -> Any:
        """The reply's update: the codec blob decoded and validated (int8 stays int8)."""
        content = msg.content
        try:
            tail = list(content.metric_records[P.METRICS][P.CLIP_TAIL])  # type: ignore[arg-type]
            blob = content.config_records[P.PAYLOAD][P.UPDATE_BLOB]
        except (KeyError, TypeError, ValueError) as err:
            raise ReplyError(f"bad payload: {err!r}") from None
        if not isinstance(blob, bytes):
            raise ReplyError(f"update blob is {type(blob).__name__}, not bytes")
        try:
            return self.transport.decode_update(msg.metadata.src_node_id, blob, tail,
                                                dequantize=False)
        except ValueError as err:  # CodecError included
            raise ReplyError(str(err)) from None


def _says_executorch(msg: Message) -> bool:
    """The reply's claim to have trained in ExecuTorch (informational: counted, not trusted)."""
    metrics = msg.content.metric_records.get(P.METRICS)
    return metrics is not None and metrics.get(P.TRAINED_IN_EXECUTORCH) == 1


def _plain_flower_reply_bytes(arrays: ArrayRecord) -> int:
    """Serialized size of the reply plain Flower would send: the fp32 model and metrics."""
    metrics = MetricRecord({P.NUM_EXAMPLES: 1, P.SAMPLES_PROCESSED: 1, P.STEPS: 1,
                            P.TRAIN_LOSS: 0.0})
    return P.record_bytes(RecordDict({P.ARRAYS: arrays, P.METRICS: metrics}))
