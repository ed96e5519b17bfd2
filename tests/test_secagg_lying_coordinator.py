"""A lying coordinator against SecAgg+ as fleetfl implements it (docs/secagg.md §4).

The attacker is the coordinator itself: it holds everything ``SecAggServer`` holds (the channel
keys that authenticate its requests, the clients' public keys and masked inputs) and sends each
holder its own, signed, unmask request. It tells the holders of victim u's shares that u
survived (they reveal shares of u's self-mask seed b_u) and tells holders of each of u's
neighbours v that v dropped out (they reveal shares of v's mask key), so it can strip every
mask from u's masked input. Every honest client checks only its own request: its two lists are
disjoint, it holds the shares asked for, and at least t - 1 survivors are listed. So the
coordinator spreads the key requests over the holders, at most k + 1 - t per holder.

These tests run that attack with **no colluding client** and recover u's update exactly at
n = 20 and n = 50 with the derived (k, t), the parameters fleetfl uses. They document a
property fleetfl does not protect (Bell et al.'s malicious-secure variant would); they fail
the day a client-side check stops the attack, and docs/secagg.md §4 must then change.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_secagg_protocol import make_round

from fleetfl.privacy import crypto, ring
from fleetfl.privacy.crypto import KeyPair
from fleetfl.privacy.messages import (
    MaskedInput,
    UnmaskRequest,
    UnmaskShares,
    parse,
)
from fleetfl.privacy.secagg import (
    SERVER_ID,
    SecAggRejected,
    pairwise_seed,
)


def _run_to_masked_inputs(r) -> dict[int, object]:
    """Stages 1-3 honestly; the clients' masked-input replies."""
    setup = r.server.setup()
    adverts = {u: c.handle(setup) for u, c in r.clients.items()}
    shares = {u: r.clients[u].handle(m)
              for u, m in r.server.share_keys_requests(adverts).items()}
    return {u: r.clients[u].masked_input(m, r.inputs[u])
            for u, m in r.server.masked_input_requests(shares).items()}


def _forged_requests(server, victim: int) -> dict[int, UnmaskRequest]:
    """Per holder: (survivors, dropped) lists that get t seed shares of the victim and t key
    shares of each of its neighbours, each list valid on its own."""
    t, k = server.threshold, server.num_neighbours
    neighbours = sorted(server._masked_with[victim])
    held = {w: set(server._held_by(w)) for w in server._x}
    dropped: dict[int, set[int]] = {w: set() for w in held}
    capacity = {w: k + 1 - t for w in held}  # keeps t - 1 survivors in every request
    for v in neighbours:
        holders = sorted((w for w in held if v in held[w] and capacity[w] > 0),
                         key=lambda w: -capacity[w])
        if len(holders) < t:
            raise AssertionError(f"not enough holders left for node {v}'s key")
        for w in holders[:t]:
            dropped[w].add(v)
            capacity[w] -= 1
    return {w: UnmaskRequest(round=server._setup.round, sender=SERVER_ID, receiver=w,
                             survivors=tuple(sorted(held[w] - dropped[w])),
                             dropped=tuple(sorted(dropped[w])))
            for w in held}


def _strip_masks(server, victim: int, masked: bytes, seed: bytes,
                 keys: dict[int, bytes], length: int) -> np.ndarray:
    """y_u - PRG(b_u) - Σ_{v>u} PRG(s_uv) + Σ_{v<u} PRG(s_uv), as signed integers."""
    bits, dtype = server.ring_bits, ring.ring_dtype(server.ring_bits)
    y = ring.unpack(masked, bits, length).astype(np.int64)  # then mod 2^bits in to_signed
    y -= crypto.expand_mask(seed, length, dtype).astype(np.int64)
    for v, private in keys.items():
        agreed = KeyPair.from_private_bytes(private).agree(server._keys[victim].mask_key)
        stream = crypto.expand_mask(pairwise_seed(agreed, server._salt, v, victim), length,
                                    dtype).astype(np.int64)
        y += -stream if victim < v else stream
    return ring.to_signed(y, bits)


@pytest.mark.parametrize("n", [20, 50])
def test_a_lying_coordinator_unmasks_one_client_with_no_colluder(n: int) -> None:
    r = make_round(n, 40, seed=n)
    masked_replies = _run_to_masked_inputs(r)
    server, victim = r.server, min(r.clients)
    server.unmask_requests(masked_replies)  # the honest path up to here (it sums the inputs)
    forged = _forged_requests(server, victim)
    answers = {w: parse(UnmaskShares, r.clients[w].handle(
        req.signed(server._channel[w], server._random))) for w, req in forged.items()}
    seed_shares = {server._x[w]: a.seed_shares[victim] for w, a in answers.items()
                   if victim in a.seed_shares}
    key_shares: dict[int, dict[int, bytes]] = {}
    for w, a in answers.items():
        for owner, share in a.key_shares.items():
            key_shares.setdefault(owner, {})[server._x[w]] = share
    seed = server._rebuild({victim: seed_shares}, server._seed_ok)[victim]
    keys = server._rebuild(key_shares, server._key_ok)
    assert set(keys) == set(server._masked_with[victim])
    masked = parse(MaskedInput, masked_replies[victim]).masked
    recovered = _strip_masks(server, victim, masked, seed, keys, 40)
    np.testing.assert_array_equal(recovered, r.inputs[victim].astype(np.int64))


def test_the_same_lie_in_one_request_is_refused() -> None:
    """Asking one holder for both secrets of one client is the check that does hold."""
    r = make_round(20, 40, seed=3)
    masked_replies = _run_to_masked_inputs(r)
    server = r.server
    server.unmask_requests(masked_replies)
    holder = min(r.clients)
    owner = min(server._held_by(holder))
    survivors = tuple(sorted(server._held_by(holder)))
    bad = UnmaskRequest(round=server._setup.round, sender=SERVER_ID, receiver=holder,
                        survivors=survivors, dropped=(owner,))
    with pytest.raises(SecAggRejected, match="both as survivors and as dropped"):
        r.clients[holder].handle(bad.signed(server._channel[holder], server._random))
