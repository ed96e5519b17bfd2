"""SecureFleetFedProx: FleetFedProx whose coordinator learns only the cohort's sum (SecAgg+).

The protocol is :mod:`fleetfl.privacy` (pure state machines); this class carries its messages
on Flower's Message API (docs/secagg.md §7):

=====  ================================================  =====================================
stage  coordinator -> client                             client -> coordinator
=====  ================================================  =====================================
1      ``query.secagg``: ``Setup``                       ``AdvertiseKeys``
2      ``query.secagg``: ``ShareKeysRequest``            ``ShareKeys``
3      ``train`` (model, plan) + ``MaskedInputRequest``  metrics + ``MaskedInput`` (no update)
       (+ ``secagg.ahead``: asks for next keys)          (+ ``KeysAhead``)
4      ``query.secagg``: ``UnmaskRequest``               ``UnmaskShares``
=====  ================================================  =====================================

**Keys ahead** (``secagg.keys_ahead``, on by default): every client that trains advertises the
keys of its next round on its reply. A cohort member whose keys are on file skips stage 1: its
stage-2 query carries the Setup (``secagg.setup``). A cohort that has trained before (a
deployed fleet from its second round) needs three exchanges per round instead of four. The
coordinator holds at most :data:`MAX_KEYS_AHEAD` such entries (64 bytes of public keys each),
dropping the oldest, and uses each once.

Each client masks one int8 vector: its update ω_k Δ_k on the unpruned coordinates (tensors in
order) followed by its int8 tail counts (clamped to 127, :mod:`fleetfl.client.secure`). The
unmasked sum gives the round's average exactly as the plain int8 path computes it,
``scale · Σ q_k / Σ ω_k`` over the survivors, and the cohort's tail counts for the next clip
range. Replies dropped for the deadline or as stragglers are left out of the sum like clients
that dropped out. If too few clients remain to unmask, the round ends with no model update
(``RoundStats.secagg_aborted``).

Not checked under secure aggregation, by design: the update's values (NaN, range) — the
coordinator never sees them; the ring embedding bounds every value to [-127, 127].
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fleetfl import protocol as P
from fleetfl.aggregation.aggregator import Aggregator, SecureSum
from fleetfl.aggregation.combine import Combined
from fleetfl.compression.quantize import TAIL_LEVELS, TailCounts
from fleetfl.coordinator.strategy import FleetFedProx, ReplyError, RoundStats, _Reply
from fleetfl.privacy import SecAggAbort, SecAggParams, SecAggServer, Setup

log = logging.getLogger(__name__)
MAX_KEYS_AHEAD = 1_000_000  # entries (~200 B each in Python): a fleet of a million devices


class SecureFleetFedProx(FleetFedProx):
    """FleetFedProx with SecAgg+ over the int8 updates (``[secagg] enabled = true``)."""

    def __init__(self, *, secagg: SecAggParams, timeout_s: float, keys_ahead: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.transport.settings.update_bits != 8:
            raise ValueError("secure aggregation sums int8 updates (compression.update_bits=8)")
        self.secagg = secagg
        self.timeout_s = timeout_s
        self.keys_ahead = keys_ahead
        self._grid: Grid | None = None
        self._server: SecAggServer | None = None
        self._ahead: OrderedDict[int, bytes] = OrderedDict()  # node -> its next round's keys

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Draw the cohort and plan it (as FleetFedProx), run stages 1-2, attach stage 3."""
        messages = list(super().configure_train(server_round, arrays, config, grid))
        stats = self.history[-1]
        self._grid, self._server = grid, None
        nodes = [m.metadata.dst_node_id for m in messages]
        try:
            self._server = SecAggServer(nodes, self.transport.kept_count + TAIL_LEVELS,
                                        round=stats.server_round, params=self.secagg)
            setup = self._server.setup()
            adopted = self._server.adopt_keys(
                {n: self._ahead.pop(n) for n in nodes if n in self._ahead})
            fresh = [n for n in nodes if n not in adopted]
            adverts = self._exchange(dict.fromkeys(fresh, setup)) if fresh else {}
            shares = self._exchange(self._server.share_keys_requests(adverts),
                                    setup=setup, with_setup=adopted)
            requests = self._server.masked_input_requests(shares)
        except (SecAggAbort, ValueError) as err:  # ValueError: no (k, t) for this cohort
            self._abort(stats, err)
            return []
        out = []
        for msg in messages:
            request = requests.get(msg.metadata.dst_node_id)
            if request is None:
                continue  # dropped out during key exchange: no work (counted as failed)
            records = RecordDict({P.SECAGG: ConfigRecord(request.to_config())})
            if self.keys_ahead:
                records[P.SECAGG_AHEAD] = ConfigRecord()
            stats.secagg_downlink_bytes += P.record_bytes(records)
            for key, record in records.items():
                msg.content[key] = record
            out.append(msg)
        return out

    def _read_update(self, msg: Message) -> Any:
        """A reply's update is its masked input (checked by the protocol when unmasking)."""
        record = msg.content.config_records.get(P.SECAGG)
        if record is None:
            raise ReplyError(f"reply lacks the '{P.SECAGG}' record (masked input)")
        self._remember_keys_ahead(msg)
        return record

    def _remember_keys_ahead(self, msg: Message) -> None:
        """Keep the checked ``KeysAhead`` of a training reply for the node's next round; its
        bytes count as secure aggregation's, not as the update's."""
        record = msg.content.config_records.get(P.SECAGG_AHEAD)
        if record is None or not self.keys_ahead or self._server is None:
            return
        node = msg.metadata.src_node_id
        size = P.record_bytes(RecordDict({P.SECAGG_AHEAD: record}))
        stats = self.history[-1]
        stats.uplink_bytes -= size
        stats.secagg_uplink_bytes += size
        for key_node, keys in self._server.keys_ahead({node: dict(record)}).items():
            self._ahead[key_node] = keys
            self._ahead.move_to_end(key_node)
        while len(self._ahead) > MAX_KEYS_AHEAD:
            self._ahead.popitem(last=False)

    def _combine(self, kept: list[_Reply], stats: RoundStats) -> list[np.ndarray] | None:
        """Stage 4 and the unmasked sum of the kept replies (no round without stages 1-3)."""
        return None if self._server is None else super()._combine(kept, stats)

    def _aggregator(self) -> Aggregator:
        """The survivors' mean from the unmasked sum (:class:`SecureSum`), stage 4 on Flower."""
        assert self._server is not None
        return SecureSum(self._server, self._exchange, self.transport.clip, self._tensors,
                         TAIL_LEVELS)

    def _tensors(self, values: np.ndarray) -> list[np.ndarray]:
        """Kept coordinates -> full-shape tensors in ``self._keys`` order."""
        scattered = self.transport.scatter(values)
        return [scattered[k] for k in self._keys]

    def _update_of(self, reply: _Reply) -> Any:
        return reply.update  # the masked input record

    def _account(self, aggregator: Aggregator, result: Combined | None,
                 stats: RoundStats) -> None:
        """Record the protocol's outcome; the survivors' tail counts set the next clip."""
        assert isinstance(aggregator, SecureSum)
        outcome = aggregator.outcome
        stats.secagg_server_s = outcome.server_s
        stats.rejected += len(outcome.rejections)
        for rejection in outcome.rejections:
            log.warning("round %d: secure aggregation rejected %s", stats.server_round,
                        rejection)
        if outcome.aborted is not None:
            self._abort(stats, outcome.aborted)
            return
        stats.aggregated = len(outcome.survivors)
        if outcome.refused is not None:
            stats.secagg_refused, stats.aggregated = 1, 0
            log.warning("round %d: secure sum refused, no model update: %s",
                        stats.server_round, outcome.refused)
            return
        self.transport.record_tail(TailCounts(self.transport.kept_count * len(outcome.survivors),
                                              outcome.tail))

    def _exchange(self, requests: Mapping[int, Any], *, setup: Setup | None = None,
                  with_setup: Iterable[int] = ()) -> dict[int, ConfigRecord]:
        """Send one stage's requests as ``query.secagg``; the usable replies by node id.

        The nodes in ``with_setup`` also get ``setup`` (their stage 1 was done ahead). An error
        reply, a missing reply or one without the record is a dropout at this stage.
        """
        assert self._grid is not None
        stats = self.history[-1]
        with_setup = frozenset(with_setup)
        messages = []
        for node, request in requests.items():
            content = RecordDict({P.SECAGG: ConfigRecord(request.to_config())})
            if node in with_setup and setup is not None:
                content[P.SECAGG_SETUP] = ConfigRecord(setup.to_config())
            stats.secagg_downlink_bytes += P.record_bytes(content)
            messages.append(Message(content, dst_node_id=node, message_type=P.SECAGG_QUERY))
        replies: dict[int, ConfigRecord] = {}
        for reply in self._grid.send_and_receive(messages, timeout=self.timeout_s):
            node = reply.metadata.src_node_id
            if reply.has_error() or node not in requests:
                why = reply.error.reason if reply.has_error() else "not asked"
                log.warning("round %d: secure aggregation: node %d dropped out: %s",
                            stats.server_round, node, why)
                continue
            record = reply.content.config_records.get(P.SECAGG)
            if record is not None:
                stats.secagg_uplink_bytes += P.record_bytes(reply.content)
                replies[node] = record
        return replies

    @staticmethod
    def _abort(stats: RoundStats, err: Exception | str) -> None:
        stats.secagg_aborted, stats.aggregated = 1, 0
        log.warning("round %d: secure aggregation aborted, no model update: %s",
                    stats.server_round, err)
