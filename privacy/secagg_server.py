"""The coordinator side of SecAgg+: one method per stage, from Setup to the unmasked sum.

Drive it as (each ``replies`` maps the transport's sender node id to its reply: a message, its
bytes or its config dict; a missing node is a dropout)::

    server = SecAggServer(cohort, vector_length, round=r, params=SecAggParams(...))
    setup = server.setup()                               # broadcast to the cohort
    adopted = server.adopt_keys(ahead)                   # optional: keys advertised earlier
    requests = server.share_keys_requests(replies)       # replies: AdvertiseKeys
    requests = server.masked_input_requests(replies)     # replies: ShareKeys
    requests = server.unmask_requests(replies)           # replies: MaskedInput
    result = server.finish(replies)                      # replies: UnmaskShares
    result.sum                                           # int64: Σ of the survivors' vectors

**Keys ahead.** :meth:`SecAggServer.keys_ahead` checks the :class:`KeysAhead` that rode on this
round's masked inputs; the caller keeps them for each node's next round, where
:meth:`SecAggServer.adopt_keys` takes them in place of that node's stage-1 reply (the Setup
then travels with its share-keys request).

**Dropouts at every stage.** A client missing after advertising or sharing keys simply leaves
the round (nobody masks with it). Then clients that would have fewer than ``t`` live holders of
their shares are left out too (to a fixpoint), before anything depends on them. A client
missing after masked input, or whose masked input is rejected, counts as dropped: its pairwise
masks are removed with its rebuilt mask key, its input is not in the sum. Clients missing
during unmask cost only their shares. Whenever some needed secret can no longer reach ``t``
shares the round raises :class:`SecAggAbort` (no model update), before revealing anything more.

**Rejections.** A reply that does not parse, is not from the node that sent it, is for another
round or stage, comes from outside the cohort or from a client that already left, or fails its
tag is rejected (:class:`SecAggRejected`, logged and kept in ``rejections``) and the client is
treated as missing at that stage. Rebuilt secrets are verified (mask seeds against their
commitment, mask keys against the advertised public key); a wrong share is worked around when
spare shares allow, else the round aborts rather than return a wrong sum.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fleetfl.privacy import crypto, ring, shamir
from fleetfl.privacy.crypto import KeyPair, RandomBytes
from fleetfl.privacy.graph import choose_parameters, neighbours
from fleetfl.privacy.messages import (
    AdvertiseKeys,
    KeysAhead,
    MaskedInput,
    MaskedInputRequest,
    Message,
    Setup,
    ShareKeys,
    ShareKeysRequest,
    UnmaskRequest,
    UnmaskShares,
    parse,
)
from fleetfl.privacy.secagg import (
    PROTOCOL_VERSION,
    SERVER_ID,
    SecAggAbort,
    SecAggParams,
    SecAggRejected,
    SecAggStateError,
    SecAggStats,
    Stage,
    channel_key,
    pairwise_seed,
    seed_commitment,
    stage_name,
    transcript,
)

log = logging.getLogger(__name__)

_SEALED_SHARES = 2 * shamir.SHARE_BYTES + crypto.SEAL_OVERHEAD
_MAX_ATTEMPTS = 64  # share subsets tried to rebuild one secret when a share is wrong
# progress of a round: which method may run next
_NEW, _SETUP_SENT, _KEYS_SENT, _SHARES_SENT, _UNMASK_SENT, _FINISHED, _ABORTED = range(7)


@dataclass(frozen=True)
class SecAggResult:
    """What a completed round yields: the sum, and who is (not) in it."""

    sum: np.ndarray  # int64, the exact signed sum of the survivors' input vectors
    survivors: tuple[int, ...]  # nodes whose input is in the sum
    # node -> the stage (and why) it left the round; one that left during unmask had already
    # sent its masked input, so it is also among the survivors
    dropped: dict[int, str]
    rejections: tuple[SecAggRejected, ...]
    num_neighbours: int
    threshold: int
    ring_bits: int
    stats: SecAggStats = field(repr=False)


class SecAggServer:
    """The coordinator's SecAgg+ state for one round of cohort ``cohort`` (node ids).

    ``vector_length`` values per client; ``round`` binds every message and key to this round.
    ``random_bytes`` is ``os.urandom``; tests pass a seeded one.
    """

    def __init__(self, cohort: Sequence[int], vector_length: int, *, round: int,
                 params: SecAggParams | None = None,
                 random_bytes: RandomBytes = os.urandom) -> None:
        started = time.perf_counter()
        params = params or SecAggParams()
        nodes = tuple(sorted(set(cohort)))
        if len(nodes) != len(cohort) or any(not 0 < u < 1 << 64 for u in nodes):
            raise ValueError("cohort node ids must be distinct nonzero u64")
        k, t = choose_parameters(
            len(nodes), corrupt_fraction=params.corrupt_fraction,
            dropout_fraction=params.dropout_fraction, security_bits=params.security_bits,
            correctness_bits=params.correctness_bits, num_neighbours=params.num_neighbours,
            threshold=params.threshold)
        self.stats = SecAggStats()
        self.dropped: dict[int, str] = {}
        self.rejections: list[SecAggRejected] = []
        self._random = random_bytes
        self._key = KeyPair.generate(random_bytes)
        self._setup = Setup(
            round=round, sender=SERVER_ID, receiver=SERVER_ID, cohort=nodes, num_neighbours=k,
            threshold=t, ring_bits=ring.bits_for_sum(len(nodes), params.max_abs),
            max_abs=params.max_abs, vector_length=vector_length,
            graph_seed=random_bytes(crypto.KEY_BYTES), server_key=self._key.public)
        self._setup.signed_bytes()  # range checks
        self._salt = transcript(self._setup)
        self._neighbours = neighbours(nodes, k, self._setup.graph_seed)
        self._x = {node: i + 1 for i, node in enumerate(nodes)}
        self._step = _NEW
        self._channel: dict[int, bytes] = {}
        self._keys: dict[int, AdvertiseKeys] = {}
        self._adopted: dict[int, AdvertiseKeys] = {}  # stage 1 done in an earlier round
        self._asked: dict[int, frozenset[int]] = {}  # stage-2 neighbours listed to each client
        self._commitments: dict[int, bytes] = {}
        self._masked_with: dict[int, frozenset[int]] = {}
        self._sum: np.ndarray | None = None
        self._vectors: dict[int, np.ndarray] = {}  # the masked input being checked
        self._shared: set[int] = set()  # U2: sent shares (after pruning)
        self._in_sum: set[int] = set()  # U3: masked input accepted
        self._unheld: set[tuple[int, int]] = set()  # (owner, holder): holder lacks the shares
        self._unmask_asked: dict[int, tuple[frozenset[int], frozenset[int]]] = {}
        # parameters, graph and round key are the setup's cost
        self.stats.seconds[stage_name(Stage.ADVERTISE_KEYS)] = time.perf_counter() - started

    @property
    def setup_message(self) -> Setup:
        """The round's :class:`Setup` (public: cohort, k, t, ring, graph seed, round key)."""
        return self._setup

    @property
    def threshold(self) -> int:
        """Shamir threshold ``t`` of this round."""
        return self._setup.threshold

    @property
    def num_neighbours(self) -> int:
        """Degree ``k`` of the neighbour graph (``n - 1``: complete)."""
        return self._setup.num_neighbours

    @property
    def ring_bits(self) -> int:
        """Bits of the ring the vectors are summed in."""
        return self._setup.ring_bits

    # ------------------------------------------------------------------------- stages

    def setup(self) -> Setup:
        """Stage 1 request: the :class:`Setup` to broadcast to every node of the cohort."""
        self._expect(_NEW, "setup")
        self._step = _SETUP_SENT
        self.stats.add_bytes(Stage.ADVERTISE_KEYS,
                             down=self._setup.wire_size() * len(self._setup.cohort))
        return self._setup

    def adopt_keys(self, ahead: Mapping[int, bytes]) -> frozenset[int]:
        """Take keys the cohort's nodes advertised in an earlier round (``{node: enc_key +
        mask_key}``, as :meth:`keys_ahead` returned them) as their stage-1 replies.

        Call after :meth:`setup`, before :meth:`share_keys_requests`. The adopted nodes get no
        Setup exchange: their share-keys request must carry the Setup. A node outside the
        cohort, or a key that is not a valid X25519 public key, is skipped (that node
        advertises as usual). Returns the adopted nodes.
        """
        with self.stats.timed(Stage.ADVERTISE_KEYS):
            self._expect(_SETUP_SENT, "adopt_keys")
            for node, keys in ahead.items():
                if node not in self._x or len(keys) != 2 * crypto.KEY_BYTES:
                    continue
                advert = AdvertiseKeys(round=self._setup.round, sender=node, receiver=SERVER_ID,
                                       enc_key=keys[: crypto.KEY_BYTES],
                                       mask_key=keys[crypto.KEY_BYTES :])
                try:
                    crypto.check_public_key(advert.mask_key)
                    secret = self._key.agree(advert.enc_key)
                except crypto.CryptoError as err:
                    log.warning("secagg round %d: keys ahead of node %d skipped: %s",
                                self._setup.round, node, err)
                    continue
                self._channel[node] = channel_key(secret, self._salt, node)
                self._adopted[node] = advert
            return frozenset(self._adopted)

    def keys_ahead(self, replies: Mapping[int, Any]) -> dict[int, bytes]:
        """Check the :class:`KeysAhead` that rode on this round's masked inputs.

        Returns ``{node: enc_key + mask_key}`` for :meth:`adopt_keys` in the node's next round.
        One that does not parse, is not tagged by a node of this round, or carries an invalid
        key is logged and left out: that node will simply advertise as usual. Its masked input
        is not affected.
        """
        out = {}
        for node, raw in replies.items():
            try:
                msg = parse(KeysAhead, raw)
                if node not in self._channel or msg.sender != node or \
                        msg.receiver != SERVER_ID or msg.round != self._setup.round:
                    raise ValueError("not from a node of this round, to the coordinator")
                if msg.version != PROTOCOL_VERSION:
                    raise ValueError(f"unsupported protocol version {msg.version}")
                msg.verify(self._channel[node])
                crypto.check_public_key(msg.enc_key)
                crypto.check_public_key(msg.mask_key)
            except ValueError as err:  # MessageError and CryptoError are ValueErrors
                log.warning("secagg round %d: keys ahead of node %d ignored: %s",
                            self._setup.round, node, err)
                continue
            self.stats.add_bytes(Stage.ADVERTISE_KEYS, up=msg.wire_size())
            out[node] = msg.enc_key + msg.mask_key
        return out

    def share_keys_requests(self, replies: Mapping[int, Any]) -> dict[int, ShareKeysRequest]:
        """Take :class:`AdvertiseKeys` replies (from the nodes not adopted, see
        :meth:`adopt_keys`); return each live client's neighbours' keys."""
        with self.stats.timed(Stage.ADVERTISE_KEYS):
            self._expect(_SETUP_SENT, "share_keys_requests")
            stage = Stage.ADVERTISE_KEYS
            expected = set(self._setup.cohort) - set(self._adopted)
            adverts = self._receive(AdvertiseKeys, replies, expected, stage)
            adverts.update({node: advert for node, advert in self._adopted.items()
                            if node not in self.dropped})  # one that also replied misbehaved
            for node in self._duplicate_keys(adverts):
                self._reject(SecAggRejected(node, stage, "public key repeats another's"))
                del adverts[node]
            self._keys = adverts
            alive = self._prune(set(adverts), stage)
            requests = {}
            for node in sorted(alive):
                peers = self._neighbours[node] & alive
                self._asked[node] = frozenset(peers)
                requests[node] = ShareKeysRequest(
                    round=self._setup.round, sender=SERVER_ID, receiver=node,
                    public_keys={p: adverts[p].enc_key + adverts[p].mask_key for p in peers})
            return self._send(requests, Stage.SHARE_KEYS, _KEYS_SENT)

    def masked_input_requests(self, replies: Mapping[int, Any]
                              ) -> dict[int, MaskedInputRequest]:
        """Take :class:`ShareKeys` replies; route each live client the shares sealed for it."""
        with self.stats.timed(Stage.SHARE_KEYS):
            self._expect(_KEYS_SENT, "masked_input_requests")
            stage = Stage.SHARE_KEYS
            shares = self._receive(ShareKeys, replies, set(self._asked), stage)
            alive = self._prune(set(shares), stage)
            self._shared = alive
            self._commitments = {u: shares[u].commitment for u in alive}
            requests = {}
            for node in sorted(alive):
                peers = self._asked[node] & alive
                self._masked_with[node] = frozenset(peers)
                requests[node] = MaskedInputRequest(
                    round=self._setup.round, sender=SERVER_ID, receiver=node,
                    ciphertexts={p: shares[p].ciphertexts[node] for p in peers})
            return self._send(requests, Stage.MASKED_INPUT, _SHARES_SENT)

    def unmask_requests(self, replies: Mapping[int, Any]) -> dict[int, UnmaskRequest]:
        """Take :class:`MaskedInput` replies (summing them); ask survivors for shares."""
        with self.stats.timed(Stage.MASKED_INPUT):
            self._expect(_SHARES_SENT, "unmask_requests")
            stage = Stage.MASKED_INPUT
            masked = self._receive(MaskedInput, replies, self._shared, stage)
            self._in_sum = set(masked)
            for node in self._shared - self._in_sum:
                self.dropped.setdefault(node, f"{stage_name(stage)}: no valid masked input")
            if len(self._in_sum) < self.threshold:  # a sum of fewer inputs would say too much
                self._abort(f"only {len(self._in_sum)} masked inputs, threshold t = "
                            f"{self.threshold}")
            for holder, reply in masked.items():
                self._unheld |= {(owner, holder) for owner in reply.rejected}
            for node in sorted(self._in_sum):
                held = self._held_by(node)
                self._unmask_asked[node] = (frozenset(held & self._in_sum),
                                            frozenset(held - self._in_sum))
            self._check_recoverable(self._unmask_asked)
            requests = {}
            for node, (survivors, dropped) in self._unmask_asked.items():
                requests[node] = UnmaskRequest(
                    round=self._setup.round, sender=SERVER_ID, receiver=node,
                    survivors=tuple(sorted(survivors)), dropped=tuple(sorted(dropped)))
            return self._send(requests, Stage.UNMASK, _UNMASK_SENT)

    def finish(self, replies: Mapping[int, Any]) -> SecAggResult:
        """Take :class:`UnmaskShares` replies; rebuild the secrets and return the exact sum."""
        with self.stats.timed(Stage.UNMASK):
            self._expect(_UNMASK_SENT, "finish")
            answers = self._receive(UnmaskShares, replies, set(self._unmask_asked), Stage.UNMASK)
            self._check_recoverable(answers)
            seeds: dict[int, dict[int, bytes]] = {u: {} for u in self._in_sum}
            keys: dict[int, dict[int, bytes]] = {u: {} for u in self._shared - self._in_sum}
            for holder, reply in answers.items():
                for owner, share in reply.seed_shares.items():
                    seeds[owner][self._x[holder]] = share
                for owner, share in reply.key_shares.items():
                    keys[owner][self._x[holder]] = share
            keys = {u: s for u, s in keys.items() if self._masked_with[u] & self._in_sum}
            total = self._sum
            assert total is not None
            for seed in self._rebuild(seeds, self._seed_ok).values():
                np.subtract(total, crypto.expand_mask(seed, total.size, total.dtype), out=total)
            for owner, private in self._rebuild(keys, self._key_ok).items():
                self._remove_pairwise(total, owner, private)
            ring.reduce_(total, self.ring_bits)
            self._step = _FINISHED
            return SecAggResult(
                sum=ring.to_signed(total, self.ring_bits), survivors=tuple(sorted(self._in_sum)),
                dropped=dict(self.dropped), rejections=tuple(self.rejections),
                num_neighbours=self.num_neighbours, threshold=self.threshold,
                ring_bits=self.ring_bits, stats=self.stats)

    # ------------------------------------------------------------------------- receiving

    def _receive(self, cls: type, replies: Mapping[int, Any], expected: set[int],
                 stage: Stage) -> dict[int, Any]:
        """Parse and check every reply; missing or rejected expected nodes count as dropped."""
        valid = {}
        for node, raw in replies.items():
            try:
                msg = parse(cls, raw)
            except ValueError as err:
                self._reject(SecAggRejected(node, stage, str(err)))
                continue
            size = msg.wire_size()
            self.stats.add_bytes(stage, up=size)
            self.stats.uplink_by_client[node] = self.stats.uplink_by_client.get(node, 0) + size
            try:
                self._check_reply(msg, node, expected, stage)
            except SecAggRejected as rejection:
                self._reject(rejection)
                continue
            valid[node] = msg
            if node in self._vectors:  # a checked masked input: add it now, keep only the sum
                self._accumulate(self._vectors.pop(node))
        for node in sorted(expected - set(valid)):
            self.dropped.setdefault(node, f"{stage_name(stage)}: no valid reply")
        return valid

    def _check_reply(self, msg: Any, node: int, expected: set[int], stage: Stage) -> None:
        def refuse(reason: str) -> None:
            raise SecAggRejected(node, stage, reason)

        if node not in self._x:
            refuse("not in this round's cohort")
        if node not in expected:
            refuse("not expected at this stage (it left the round earlier)")
        if msg.sender != node or msg.receiver != SERVER_ID:
            refuse(f"claims to be from node {msg.sender} to {msg.receiver}")
        if msg.version != PROTOCOL_VERSION:
            refuse(f"unsupported protocol version {msg.version}")
        if msg.round != self._setup.round:
            refuse(f"message of round {msg.round} in round {self._setup.round} (replayed?)")
        if isinstance(msg, AdvertiseKeys):
            try:
                crypto.check_public_key(msg.mask_key)
                self._channel[node] = channel_key(self._key.agree(msg.enc_key), self._salt, node)
            except crypto.CryptoError as err:
                refuse(f"bad public key: {err}")
        try:
            msg.verify(self._channel[node])
        except crypto.CryptoError:
            refuse("authentication failed (tampered, replayed or forged)")
        problem = self._check_payload(msg, node)
        if problem:
            refuse(problem)

    def _check_payload(self, msg: Message, node: int) -> str | None:
        """What is wrong with an authenticated reply's content, if anything."""
        if isinstance(msg, ShareKeys):
            if set(msg.ciphertexts) != self._asked[node]:
                return "shares not addressed to exactly its listed neighbours"
            if len(msg.commitment) != crypto.KEY_BYTES:
                return "commitment must be 32 bytes"
            if any(len(c) != _SEALED_SHARES for c in msg.ciphertexts.values()):
                return f"sealed shares must be {_SEALED_SHARES} bytes"
        elif isinstance(msg, MaskedInput):
            if not set(msg.rejected) <= self._masked_with[node]:
                return "reports shares from nodes that were not sent to it"
            try:
                self._vectors[node] = ring.unpack(msg.masked, self.ring_bits,
                                                  self._setup.vector_length)
            except ValueError as err:
                return f"masked vector: {err}"
        elif isinstance(msg, UnmaskShares):
            survivors, dropped = self._unmask_asked[node]
            if set(msg.seed_shares) != survivors | {node} or set(msg.key_shares) != dropped:
                return "shares for other nodes than asked"
            shares = [*msg.seed_shares.values(), *msg.key_shares.values()]
            if any(len(share) != shamir.SHARE_BYTES for share in shares):
                return f"shares must be {shamir.SHARE_BYTES} bytes"
            try:  # all field ranges in one check
                shamir.share_values(b"".join(shares), len(shares))
            except ValueError as err:
                return f"bad share: {err}"
        return None

    def _accumulate(self, vector: np.ndarray) -> None:
        if self._sum is None:
            self._sum = vector
        else:
            np.add(self._sum, vector, out=self._sum)  # wraps mod 2^16/2^32: reduced at the end

    def _duplicate_keys(self, adverts: Mapping[int, AdvertiseKeys]) -> set[int]:
        owners: dict[bytes, list[int]] = {}
        for node, msg in adverts.items():
            for key in {msg.enc_key, msg.mask_key}:
                owners.setdefault(key, []).append(node)
        return {node for nodes in owners.values() if len(nodes) > 1 for node in nodes}

    def _reject(self, rejection: SecAggRejected) -> None:
        log.warning("secagg round %d: %s", self._setup.round, rejection)
        self.rejections.append(rejection)
        if rejection.sender in self._x and rejection.stage is not None:
            self.dropped.setdefault(rejection.sender,
                                    f"{stage_name(rejection.stage)}: {rejection.reason}")

    # ------------------------------------------------------------------------- dropouts

    def _prune(self, alive: set[int], stage: Stage) -> set[int]:
        """Leave out clients with fewer than ``t`` live holders (neighbours + itself)."""
        t, alive = self.threshold, set(alive)
        changed = True
        while changed:
            short = {u for u in alive if len(self._neighbours[u] & alive) + 1 < t}
            for node in short:
                self.dropped.setdefault(node, f"{stage_name(stage)}: fewer than t = {t} live "
                                              "neighbours to hold its shares")
            alive -= short
            changed = bool(short)
        if not alive:
            self._abort(f"{stage_name(stage)}: no client has {t - 1} live neighbours "
                        f"(threshold t = {t})")
        return alive

    def _held_by(self, holder: int) -> set[int]:
        """Nodes whose shares ``holder`` holds (it masked with them and opened their shares)."""
        return {owner for owner in self._masked_with[holder]
                if (owner, holder) not in self._unheld}

    def _check_recoverable(self, holders: Iterable[int]) -> None:
        """Abort unless every needed secret has ``t`` shares among those ``holders`` answer.

        Survivors need their seed (their own share counts), dropped clients whose masks are in
        the sum need their mask key. A holder answers for what ``_unmask_asked`` lists.
        """
        t, count = self.threshold, dict.fromkeys(self._shared, 0)
        for holder in holders:
            survivors, dropped = self._unmask_asked[holder]
            for owner in survivors | dropped | {holder}:
                count[owner] += 1
        short = sorted(u for u, c in count.items()
                       if c < t and (u in self._in_sum or self._masked_with[u] & self._in_sum))
        if short:
            self._abort(f"fewer than t = {t} shares can be had for nodes {short} "
                        f"({len(self._in_sum)} inputs in the sum)")

    def _abort(self, reason: str) -> None:
        self._step = _ABORTED
        log.error("secagg round %d aborted: %s", self._setup.round, reason)
        raise SecAggAbort(f"secure aggregation round {self._setup.round} aborted, no model "
                          f"update: {reason}")

    # ------------------------------------------------------------------------- unmasking

    def _rebuild(self, shares: Mapping[int, Mapping[int, bytes]], ok: Any) -> dict[int, bytes]:
        """Rebuild every owner's secret from ``t`` shares at once; verify, retry if wrong."""
        t = self.threshold
        owners = sorted(shares)
        if not owners:
            return {}
        rows = [sorted(shares[u])[:t] for u in owners]
        xs = np.array(rows, dtype=np.int64)
        flat = b"".join(shares[u][x] for u, row in zip(owners, rows, strict=True) for x in row)
        ys = np.frombuffer(flat, dtype="<u4").astype(np.int64).reshape(len(owners), t, -1)
        chunks = shamir.combine_many(xs, ys)
        out = {}
        for u, row in zip(owners, chunks, strict=True):
            secret = _decode(row)
            if secret is None or not ok(u, secret):
                secret = self._rebuild_robust(u, shares[u], ok)
            out[u] = secret
        return out

    def _rebuild_robust(self, owner: int, shares: Mapping[int, bytes], ok: Any) -> bytes:
        """Try other ``t``-subsets of the shares (a holder sent a wrong one); abort if none."""
        log.warning("secagg round %d: shares of node %d are inconsistent", self._setup.round,
                    owner)
        for subset in itertools.islice(itertools.combinations(sorted(shares), self.threshold),
                                       1, _MAX_ATTEMPTS):
            try:
                secret = shamir.combine({x: shares[x] for x in subset})
            except ValueError:  # chunks out of range: this subset has the wrong share
                continue
            if ok(owner, secret):
                return secret
        self._abort(f"the shares of node {owner} do not rebuild its committed secret "
                    "(a holder sent a wrong share)")
        raise AssertionError  # unreachable: _abort raises

    def _seed_ok(self, owner: int, seed: bytes) -> bool:
        return seed_commitment(self._salt, owner, seed) == self._commitments[owner]

    def _key_ok(self, owner: int, private: bytes) -> bool:
        return crypto.public_from_private(private) == self._keys[owner].mask_key

    def _remove_pairwise(self, total: np.ndarray, owner: int, private: bytes) -> None:
        """Subtract the pairwise masks that survivors added with dropped ``owner``."""
        pair = KeyPair.from_private_bytes(private)
        for peer in sorted(self._masked_with[owner] & self._in_sum):
            seed = pairwise_seed(pair.agree(self._keys[peer].mask_key), self._salt, owner, peer)
            stream = crypto.expand_mask(seed, total.size, total.dtype)
            # the peer added the mask if its id is the smaller one, else subtracted it
            (np.subtract if peer < owner else np.add)(total, stream, out=total)

    # ------------------------------------------------------------------------- plumbing

    def _expect(self, step: int, name: str) -> None:
        if self._step == _ABORTED:
            raise SecAggStateError(f"{name}: this round was aborted")
        if self._step != step:
            raise SecAggStateError(f"{name} called out of order (stages run once, in order)")

    def _send(self, requests: Mapping[int, Message], stage: Stage, step: int) -> Any:
        signed = {node: msg.signed(self._channel[node], self._random)
                  for node, msg in requests.items()}
        self.stats.add_bytes(stage, down=sum(m.wire_size() for m in signed.values()))
        self._step = step
        return signed


def _decode(chunks: np.ndarray) -> bytes | None:
    try:
        return shamir.decode_secret(chunks)
    except ValueError:
        return None

