"""The client side of SecAgg+: one method per stage, state kept between them.

A client lives for one round: :meth:`SecAggClient.advertise_keys` (given the coordinator's
:class:`Setup`), :meth:`~SecAggClient.share_keys`, :meth:`~SecAggClient.masked_input` (given
the int8 update) and :meth:`~SecAggClient.unmask`, each exactly once and in that order
(:class:`SecAggStateError` otherwise). :meth:`~SecAggClient.handle` dispatches on the message
type, for a transport that only sees records. Between messages a Flower ClientApp keeps the
client in ``context.state`` with :meth:`~SecAggClient.to_state` / :meth:`~SecAggClient.from_state`
(bytes, holding the round's private keys: the device's own memory, never sent).

Keys ahead: after its masked input a client may make the key pairs of its next round
(:meth:`~SecAggClient.keys_ahead`, advertised on the same reply); that round then starts with
:meth:`SecAggClient.with_keys_ahead` (the Setup arrives with the share-keys request) instead of
:meth:`~SecAggClient.advertise_keys`.

The masked input is ``y = x + PRG(b) + Σ_{v > u} PRG(s_uv) - Σ_{v < u} PRG(s_uv) mod 2^bits``
(Bell et al.'s double masking): ``b`` a fresh 32-byte self-mask seed, ``s_uv`` the seed agreed
with neighbour ``v`` from the two mask keys, every PRG a ChaCha20 keystream. Pairwise masks
cancel in the sum of two survivors; the coordinator removes the self masks of survivors and the
pairwise masks of dropped clients from Shamir shares, never both for one client.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fleetfl.privacy import crypto, ring, shamir
from fleetfl.privacy.crypto import KeyPair, RandomBytes
from fleetfl.privacy.graph import effective_degree, neighbours_of
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
    MAX_VECTOR_LENGTH,
    PROTOCOL_VERSION,
    SERVER_ID,
    SecAggRejected,
    SecAggStateError,
    SecAggStats,
    Stage,
    channel_key,
    pairwise_seed,
    seed_commitment,
    share_header,
    share_keys,
    transcript,
)

log = logging.getLogger(__name__)

_KEYS = 2 * crypto.KEY_BYTES  # enc_key + mask_key of one peer
_SHARES = 2 * shamir.SHARE_BYTES  # a holder's shares of (seed, mask key)


@dataclass(frozen=True, kw_only=True)
class _State(Message):
    """Everything a client keeps between stages (serialized with the message codec)."""

    TYPE = 100
    STAGE = Stage.ADVERTISE_KEYS
    done: int  # last completed stage (0: none)
    setup: bytes
    enc_private: bytes
    mask_private: bytes
    peer_keys: dict[int, bytes]  # live neighbours' enc_key + mask_key
    open_keys: dict[int, bytes]  # neighbour -> key opening its sealed shares for this client
    own_seed_share: bytes
    held: dict[int, bytes]  # neighbour -> its (seed, mask key) shares held for it
    masked_with: tuple[int, ...]
    seed: bytes  # self-mask seed, erased after masking


@dataclass(frozen=True, kw_only=True)
class _Ahead(Message):
    """The private halves of a :class:`KeysAhead`, kept by the client until the round that uses
    them (``round`` is the round they were advertised in)."""

    TYPE = 101
    STAGE = Stage.MASKED_INPUT
    enc_private: bytes
    mask_private: bytes


def majority_threshold(num_neighbours: int) -> int:
    """The smallest t a client accepts for ``k`` neighbours: ``floor((k + 1) / 2) + 1`` (and
    at least 2). Two disjoint sets of t share holders then cannot exist, so a coordinator that
    asks some holders for a client's seed and others for its mask key needs ``2t - k``
    colluding holders (docs/secagg.md section 4)."""
    return max(2, (num_neighbours + 1) // 2 + 1)


class SecAggClient:
    """One client's SecAgg+ state for one round.

    ``min_threshold`` is the client's own floor on the Shamir threshold (a curious coordinator
    could otherwise ask for t = 1); whatever it is, the client also refuses a ``t`` below the
    majority of its ``k`` neighbours, ``floor((k + 1) / 2) + 1`` (:func:`majority_threshold`).
    ``random_bytes`` is ``os.urandom``; tests pass a seeded one.
    """

    def __init__(self, node_id: int, *, min_threshold: int = 2,
                 random_bytes: RandomBytes = os.urandom) -> None:
        if not 0 < node_id < 1 << 64:
            raise ValueError(f"node id must be a nonzero u64, got {node_id}")
        self.node_id = node_id
        self.min_threshold = max(2, min_threshold)
        self.stats = SecAggStats()
        self._random = random_bytes
        self._done = 0
        self._setup: Setup | None = None
        self._salt = b""
        self._enc: KeyPair | None = None
        self._mask: KeyPair | None = None
        self._channel = b""
        self._neighbours: frozenset[int] = frozenset()
        self._peer_keys: dict[int, bytes] = {}
        self._open_keys: dict[int, bytes] = {}
        self._seed = b""
        self._own_seed_share = b""
        self._held: dict[int, bytes] = {}
        self._masked_with: tuple[int, ...] = ()

    # ------------------------------------------------------------------------- stages

    def advertise_keys(self, setup: Setup | bytes | Mapping[str, Any]) -> AdvertiseKeys:
        """Stage 1: check the round's :class:`Setup`, make two key pairs, advertise them."""
        setup = self._parse(Setup, setup, Stage.ADVERTISE_KEYS)
        with self.stats.timed(Stage.ADVERTISE_KEYS):
            self._expect(0, "advertise_keys")
            self._begin(setup, KeyPair.generate(self._random), KeyPair.generate(self._random))
            assert self._enc is not None and self._mask is not None
            reply = AdvertiseKeys(round=setup.round, sender=self.node_id, receiver=SERVER_ID,
                                  enc_key=self._enc.public, mask_key=self._mask.public)
            return self._send(reply, setup, Stage.ADVERTISE_KEYS)

    @classmethod
    def with_keys_ahead(cls, node_id: int, setup: Setup | bytes | Mapping[str, Any],
                        ahead: bytes, *, min_threshold: int = 2,
                        random_bytes: RandomBytes = os.urandom) -> SecAggClient:
        """Stage 1 done in advance: check ``setup`` and take the key pairs this client
        advertised in an earlier round (``ahead``: the bytes :meth:`keys_ahead` returned). No
        reply: the coordinator already has the public keys. :meth:`share_keys` comes next.

        Raises :class:`SecAggRejected` for a bad Setup, or keys not made by this node in an
        earlier round (a coordinator must not get one pair used twice).
        """
        client = cls(node_id, min_threshold=min_threshold, random_bytes=random_bytes)
        setup = client._parse(Setup, setup, Stage.ADVERTISE_KEYS)
        with client.stats.timed(Stage.ADVERTISE_KEYS):
            try:
                saved = _Ahead.from_bytes(ahead)
            except ValueError as err:
                raise SecAggStateError(f"node {node_id}: unreadable keys ahead: {err}") from None
            if saved.sender != node_id or not saved.round < setup.round:
                client._refuse(Stage.ADVERTISE_KEYS, f"keys made by node {saved.sender} in "
                                                     f"round {saved.round} cannot serve node "
                                                     f"{node_id} in round {setup.round}")
            client._begin(setup, KeyPair.from_private_bytes(saved.enc_private),
                          KeyPair.from_private_bytes(saved.mask_private))
        client.stats.add_bytes(Stage.ADVERTISE_KEYS, down=setup.wire_size())
        return client

    def keys_ahead(self) -> tuple[KeysAhead, bytes]:
        """Fresh key pairs for this client's next round, advertised now (after the masked
        input, on whose reply they ride). Returns the tagged :class:`KeysAhead` and the private
        keys as opaque bytes, for the client's own state until :meth:`with_keys_ahead`."""
        with self.stats.timed(Stage.MASKED_INPUT):
            if self._done < Stage.MASKED_INPUT:
                raise SecAggStateError(f"node {self.node_id}: keys_ahead before masked_input")
            assert self._setup is not None
            enc, mask = KeyPair.generate(self._random), KeyPair.generate(self._random)
            advert = KeysAhead(round=self._setup.round, sender=self.node_id,
                               receiver=SERVER_ID, enc_key=enc.public, mask_key=mask.public)
            signed = advert.signed(self._channel, self._random)
            self.stats.add_bytes(Stage.ADVERTISE_KEYS, up=signed.wire_size())
            secret = _Ahead(round=self._setup.round, sender=self.node_id, receiver=SERVER_ID,
                            enc_private=enc.private_bytes(), mask_private=mask.private_bytes())
            return signed, secret.to_bytes()

    def share_keys(self, request: ShareKeysRequest | bytes | Mapping[str, Any]) -> ShareKeys:
        """Stage 2: Shamir-share the self-mask seed and mask key, seal a share per neighbour."""
        request = self._parse(ShareKeysRequest, request, Stage.SHARE_KEYS)
        with self.stats.timed(Stage.SHARE_KEYS):
            self._expect(Stage.ADVERTISE_KEYS, "share_keys")
            self._check_request(request)
            setup, enc, mask = self._setup, self._enc, self._mask
            assert setup is not None and enc is not None and mask is not None
            peers = request.public_keys
            self._check_peer_keys(peers)
            holders = [self.node_id, *sorted(peers)]
            if len(holders) < setup.threshold:
                self._refuse(Stage.SHARE_KEYS, f"only {len(holders)} holders for my shares, "
                                               f"threshold is {setup.threshold}")
            self._seed = self._random(crypto.KEY_BYTES)
            index = {node: i + 1 for i, node in enumerate(setup.cohort)}
            xs = [index[node] for node in holders]  # Shamir x: index in the cohort + 1
            shares = shamir.split([self._seed, mask.private_bytes()], setup.threshold, xs,
                                  self._random)
            self._own_seed_share = shares[0, 0].tobytes()
            ciphertexts = {}
            for node, share in zip(holders[1:], shares[1:], strict=True):
                secret = self._agree(enc, peers[node][: crypto.KEY_BYTES], node,
                                     Stage.SHARE_KEYS)
                # one agreement keys both directions: keep the other one for the next stage
                key, self._open_keys[node] = share_keys(secret, self._salt, self.node_id, node)
                ciphertexts[node] = crypto.seal(key, share.tobytes(),
                                                share_header(setup.round, self.node_id, node),
                                                self._random)
            self._peer_keys = dict(peers)
            reply = ShareKeys(round=setup.round, sender=self.node_id, receiver=SERVER_ID,
                              ciphertexts=ciphertexts,
                              commitment=seed_commitment(self._salt, self.node_id, self._seed))
            self._done = Stage.SHARE_KEYS
            return self._send(reply, request, Stage.SHARE_KEYS)

    def masked_input(self, request: MaskedInputRequest | bytes | Mapping[str, Any],
                     update: np.ndarray) -> MaskedInput:
        """Stage 3: open the neighbours' shares, mask ``update``, bit-pack it.

        ``update`` is a 1-D integer vector of ``vector_length`` values in
        ``[-max_abs, max_abs]`` (the int8 update). A neighbour whose sealed shares do not open
        is reported in ``rejected`` (and still masked with: its mask needs only public keys).
        """
        request = self._parse(MaskedInputRequest, request, Stage.MASKED_INPUT)
        with self.stats.timed(Stage.MASKED_INPUT):
            self._expect(Stage.SHARE_KEYS, "masked_input")
            self._check_request(request)
            setup, mask = self._setup, self._mask
            assert setup is not None and mask is not None
            x = np.asarray(update)
            if x.shape != (setup.vector_length,):
                raise ValueError(f"update must have shape ({setup.vector_length},), "
                                 f"got {x.shape}")
            peers = sorted(request.ciphertexts)
            unknown = set(peers) - set(self._peer_keys)
            if unknown:
                self._refuse(Stage.MASKED_INPUT, f"shares from non-neighbours {sorted(unknown)}")
            if len(peers) + 1 < setup.threshold:
                self._refuse(Stage.MASKED_INPUT, f"only {len(peers) + 1} holders of my shares, "
                                                 f"threshold is {setup.threshold}")
            y = ring.embed(x, setup.ring_bits, setup.max_abs)  # checks the range first
            rejected = self._open_shares(request.ciphertexts)
            np.add(y, crypto.expand_mask(self._seed, y.size, y.dtype), out=y)
            for node in peers:
                secret = self._agree(mask, self._peer_keys[node][crypto.KEY_BYTES :], node,
                                     Stage.MASKED_INPUT)
                stream = crypto.expand_mask(pairwise_seed(secret, self._salt, self.node_id, node),
                                            y.size, y.dtype)
                # the smaller id adds, the larger subtracts: the pair cancels in the sum
                (np.add if self.node_id < node else np.subtract)(y, stream, out=y)
            ring.reduce_(y, setup.ring_bits)
            self._masked_with, self._seed = tuple(peers), b""  # the seed is not needed again
            reply = MaskedInput(round=setup.round, sender=self.node_id, receiver=SERVER_ID,
                                masked=ring.pack(y, setup.ring_bits), rejected=rejected)
            self._done = Stage.MASKED_INPUT
            return self._send(reply, request, Stage.MASKED_INPUT)

    def unmask(self, request: UnmaskRequest | bytes | Mapping[str, Any]) -> UnmaskShares:
        """Stage 4: reveal seed shares of survivors (and its own), key shares of the dropped."""
        request = self._parse(UnmaskRequest, request, Stage.UNMASK)
        with self.stats.timed(Stage.UNMASK):
            self._expect(Stage.MASKED_INPUT, "unmask")
            self._check_request(request)
            setup = self._setup
            assert setup is not None
            survivors, dropped = set(request.survivors), set(request.dropped)
            if survivors & dropped:
                # revealing both secrets of one client would let the coordinator unmask it
                self._refuse(Stage.UNMASK, f"nodes {sorted(survivors & dropped)} listed both as "
                                           "survivors and as dropped")
            if not (survivors | dropped) <= set(self._held):
                self._refuse(Stage.UNMASK, "asks for shares this client does not hold: "
                                           f"{sorted((survivors | dropped) - set(self._held))}")
            if len(survivors) + 1 < setup.threshold:
                self._refuse(Stage.UNMASK, f"only {len(survivors) + 1} survivors among my "
                                           f"neighbours, threshold is {setup.threshold}")
            size = shamir.SHARE_BYTES
            seed_shares = {node: self._held[node][:size] for node in survivors}
            seed_shares[self.node_id] = self._own_seed_share
            key_shares = {node: self._held[node][size:] for node in dropped}
            reply = UnmaskShares(round=setup.round, sender=self.node_id, receiver=SERVER_ID,
                                 seed_shares=seed_shares, key_shares=key_shares)
            self._done = Stage.UNMASK
            return self._send(reply, request, Stage.UNMASK)

    def handle(self, message: Message | bytes | Mapping[str, Any],
               update: np.ndarray | None = None) -> Message:
        """Run the stage ``message`` asks for (``update`` is needed by the masked input)."""
        kind = message.TYPE if isinstance(message, Message) else _type_of(message)
        if kind == Setup.TYPE:
            return self.advertise_keys(message)  # type: ignore[arg-type]
        if kind == ShareKeysRequest.TYPE:
            return self.share_keys(message)  # type: ignore[arg-type]
        if kind == MaskedInputRequest.TYPE:
            if update is None:
                raise ValueError("the masked-input stage needs the update vector")
            return self.masked_input(message, update)  # type: ignore[arg-type]
        if kind == UnmaskRequest.TYPE:
            return self.unmask(message)  # type: ignore[arg-type]
        raise SecAggRejected(SERVER_ID, None, f"message type {kind} is not a request")

    @property
    def stage(self) -> int:
        """The last completed stage (0 before :meth:`advertise_keys`)."""
        return int(self._done)

    # ------------------------------------------------------------------------- state

    def to_state(self) -> bytes:
        """This client's state between stages, as bytes (includes private keys: keep local)."""
        state = _State(
            round=self._setup.round if self._setup else 0, sender=self.node_id,
            receiver=SERVER_ID, done=int(self._done),
            setup=self._setup.to_bytes() if self._setup else b"",
            enc_private=self._enc.private_bytes() if self._enc else b"",
            mask_private=self._mask.private_bytes() if self._mask else b"",
            peer_keys=self._peer_keys, open_keys=self._open_keys,
            own_seed_share=self._own_seed_share, held=self._held,
            masked_with=self._masked_with, seed=self._seed)
        return state.to_bytes()

    @classmethod
    def from_state(cls, data: bytes, *, min_threshold: int = 2,
                   random_bytes: RandomBytes = os.urandom) -> SecAggClient:
        """Rebuild a client saved by :meth:`to_state` (stats start afresh)."""
        state = _State.from_bytes(data)
        client = cls(state.sender, min_threshold=min_threshold, random_bytes=random_bytes)
        client._done = state.done
        if state.setup:
            setup = Setup.from_bytes(state.setup)
            client._setup, client._salt = setup, transcript(setup)
            client._neighbours = neighbours_of(setup.cohort, setup.num_neighbours,
                                               setup.graph_seed, client.node_id)
        if state.enc_private:
            client._enc = KeyPair.from_private_bytes(state.enc_private)
            client._mask = KeyPair.from_private_bytes(state.mask_private)
            secret = client._enc.agree(client._setup.server_key)  # type: ignore[union-attr]
            client._channel = channel_key(secret, client._salt, client.node_id)
        client._peer_keys, client._held = dict(state.peer_keys), dict(state.held)
        client._open_keys = dict(state.open_keys)
        client._own_seed_share, client._seed = state.own_seed_share, state.seed
        client._masked_with = state.masked_with
        return client

    # ------------------------------------------------------------------------- checks

    def _begin(self, setup: Setup, enc: KeyPair, mask: KeyPair) -> None:
        """Stage 1 on this side: check the Setup, take the round's two key pairs."""
        self._check_setup(setup)
        self._setup, self._salt = setup, transcript(setup)
        self._neighbours = neighbours_of(setup.cohort, setup.num_neighbours,
                                         setup.graph_seed, self.node_id)
        self._enc, self._mask = enc, mask
        secret = self._agree(enc, setup.server_key, SERVER_ID, Stage.ADVERTISE_KEYS)
        self._channel = channel_key(secret, self._salt, self.node_id)
        self._done = Stage.ADVERTISE_KEYS

    def _parse(self, cls: type, raw: Any, stage: Stage) -> Any:
        try:
            return parse(cls, raw)
        except ValueError as err:
            raise SecAggRejected(SERVER_ID, stage, str(err)) from None

    def _expect(self, done: int, name: str) -> None:
        if self._done != done:
            last = Stage(self._done).name.lower() if self._done else "nothing"
            raise SecAggStateError(f"node {self.node_id}: {name} called after {last} "
                                   "(stages run once each, in order)")

    def _refuse(self, stage: Stage, reason: str) -> None:
        raise SecAggRejected(SERVER_ID, stage, reason)

    def _check_setup(self, setup: Setup) -> None:
        cohort, n = setup.cohort, len(setup.cohort)
        problems = []
        if setup.version != PROTOCOL_VERSION:
            problems.append(f"unsupported protocol version {setup.version}")
        if setup.sender != SERVER_ID or setup.receiver != SERVER_ID:
            problems.append("a Setup comes from the coordinator to everyone")
        if list(cohort) != sorted(set(cohort)) or self.node_id not in cohort or SERVER_ID in cohort:
            problems.append("cohort must be sorted distinct nonzero ids including this node")
        elif not (effective_degree(n, max(setup.num_neighbours, 1)) == setup.num_neighbours
                  and 1 <= setup.num_neighbours <= n - 1):
            problems.append(f"degree {setup.num_neighbours} is not even or n - 1 = {n - 1}")
        elif not (floor := max(self.min_threshold, majority_threshold(setup.num_neighbours))) \
                <= setup.threshold <= setup.num_neighbours + 1:
            problems.append(f"threshold {setup.threshold} outside [{floor}, "
                            f"k + 1 = {setup.num_neighbours + 1}]")
        elif setup.ring_bits < _bits_needed(n, setup.max_abs):
            problems.append(f"{setup.ring_bits}-bit ring cannot hold {n} x {setup.max_abs}")
        if not 1 <= setup.vector_length <= MAX_VECTOR_LENGTH or setup.ring_bits > ring.MAX_BITS:
            problems.append("vector length or ring width out of range")
        if len(setup.graph_seed) != crypto.KEY_BYTES:
            problems.append("graph seed must be 32 bytes")
        if problems:
            self._refuse(Stage.ADVERTISE_KEYS, "; ".join(problems))

    def _check_request(self, request: Message) -> None:
        """Version, round, parties and the coordinator's tag of a request."""
        setup = self._setup
        assert setup is not None
        stage = request.STAGE
        if request.version != PROTOCOL_VERSION:
            self._refuse(stage, f"unsupported protocol version {request.version}")
        if request.round != setup.round:
            self._refuse(stage, f"message of round {request.round} in round {setup.round} "
                                "(replayed?)")
        if request.sender != SERVER_ID or request.receiver != self.node_id:
            self._refuse(stage, f"addressed from {request.sender} to {request.receiver}, "
                                f"not from the coordinator to node {self.node_id}")
        try:
            request.verify(self._channel)
        except crypto.CryptoError:
            self._refuse(stage, "authentication failed (tampered, replayed or forged)")

    def _check_peer_keys(self, peers: Mapping[int, bytes]) -> None:
        if not set(peers) <= self._neighbours:
            extra = sorted(set(peers) - self._neighbours)
            self._refuse(Stage.SHARE_KEYS, f"keys of non-neighbours {extra}")
        assert self._enc is not None and self._mask is not None
        seen = {self._enc.public, self._mask.public}
        for node, keys in peers.items():
            if len(keys) != _KEYS:
                self._refuse(Stage.SHARE_KEYS, f"node {node}'s keys are not 2 x 32 bytes")
            halves = {keys[: crypto.KEY_BYTES], keys[crypto.KEY_BYTES :]}
            if len(halves) != 2 or halves & seen:
                self._refuse(Stage.SHARE_KEYS, f"node {node}'s public keys repeat another's")
            seen |= halves

    def _open_shares(self, ciphertexts: Mapping[int, bytes]) -> dict[int, str]:
        """Open every neighbour's sealed shares into ``self._held``; return the failures."""
        setup = self._setup
        assert setup is not None
        rejected = {}
        for node, sealed in sorted(ciphertexts.items()):
            try:
                plain = crypto.open_sealed(self._open_keys[node], sealed,
                                           share_header(setup.round, node, self.node_id))
                if len(plain) != _SHARES:
                    raise crypto.CryptoError(f"{len(plain)} bytes of shares, expected {_SHARES}")
                shamir.share_values(plain, 2)  # field range check
                self._held[node] = plain
            except (crypto.CryptoError, ValueError) as err:
                reason = f"sealed shares did not open: {err}"
                log.warning("secagg: node %d rejects shares from node %d: %s", self.node_id,
                            node, reason)
                rejected[node] = reason
        return rejected

    def _agree(self, pair: KeyPair, public: bytes, peer: int, stage: Stage) -> bytes:
        try:
            return pair.agree(public)
        except crypto.CryptoError as err:
            sender = SERVER_ID if peer == SERVER_ID else peer
            raise SecAggRejected(sender, stage, f"bad public key: {err}") from None

    def _send(self, reply: Message, request: Message, stage: Stage) -> Any:
        signed = reply.signed(self._channel, self._random)
        self.stats.add_bytes(stage, up=signed.wire_size(), down=request.wire_size())
        return signed


def _bits_needed(n: int, max_abs: int) -> int:
    """Ring bits for ``n`` inputs bounded by ``max_abs``; more than allowed if impossible."""
    try:
        return ring.bits_for_sum(n, max_abs)
    except ValueError:
        return ring.MAX_BITS + 1


def _type_of(raw: Any) -> int:
    if isinstance(raw, bytes | bytearray | memoryview):
        return raw[30] if len(raw) > 30 else -1
    if isinstance(raw, Mapping):
        value = raw.get("type", -1)
        return value if isinstance(value, int) else -1
    return -1

