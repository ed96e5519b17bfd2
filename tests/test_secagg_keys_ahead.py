"""SecAgg+ keys ahead: a client advertises its next round's keys on its masked input, and that
round skips the advertise exchange for it (docs/secagg.md §7). Exact sums, one use per pair,
and what a lying party gets."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, RecordDict

from fleetfl import protocol as P
from fleetfl.client import secure
from fleetfl.privacy import (
    KeysAhead,
    SecAggClient,
    SecAggParams,
    SecAggRejected,
    SecAggServer,
    Stage,
)
from fleetfl.privacy.crypto import seeded_random_bytes

D = 17
PARAMS = SecAggParams(num_neighbours=4, threshold=3)  # n = 5: the complete graph


def _inputs(cohort: list[int], rnd: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(rnd)
    return {u: rng.integers(-127, 128, size=D).astype(np.int16) for u in cohort}


def secure_round(cohort: list[int], rnd: int, ahead: Mapping[int, bytes],
                 secrets: dict[int, bytes], *, drop: frozenset[int] = frozenset(),
                 setup_for: Any = None) -> tuple[Any, dict[int, bytes], dict[str, int]]:
    """One round over the protocol objects; clients with keys in ``ahead`` (coordinator) and
    ``secrets`` (their own) skip stage 1. Returns the result, the keys advertised for the next
    round, and how many messages each exchange carried. ``drop`` never reply after stage 2."""
    server = SecAggServer(cohort, D, round=rnd, params=PARAMS,
                          random_bytes=seeded_random_bytes(b"s%d" % rnd))
    setup = server.setup()
    adopted = server.adopt_keys({u: ahead[u] for u in cohort if u in ahead})
    clients: dict[int, SecAggClient] = {}
    adverts = {}
    for u in cohort:
        if u in adopted:
            given = setup_for(u, setup) if setup_for else setup
            clients[u] = SecAggClient.with_keys_ahead(u, given, secrets.pop(u))
        else:
            clients[u] = SecAggClient(u)
            adverts[u] = clients[u].advertise_keys(setup)
    counts = {"advertise": len(adverts)}
    requests = server.share_keys_requests(adverts)
    replies = {}
    for u, req in requests.items():
        try:
            replies[u] = clients[u].share_keys(req)
        except SecAggRejected:
            continue
    requests = server.masked_input_requests(replies)
    inputs = _inputs(cohort, rnd)
    masked, ahead_replies = {}, {}
    for u, req in requests.items():
        if u in drop:
            continue
        masked[u] = clients[u].masked_input(req, inputs[u])
        ahead_replies[u], secrets[u] = clients[u].keys_ahead()
    next_keys = server.keys_ahead(ahead_replies)
    requests = server.unmask_requests(masked)
    result = server.finish({u: clients[u].unmask(req) for u, req in requests.items()})
    expected = sum(inputs[u].astype(np.int64) for u in result.survivors)
    np.testing.assert_array_equal(result.sum, expected)
    return result, next_keys, counts


def test_returning_cohort_skips_the_advertise_exchange_and_sums_exactly() -> None:
    cohort, secrets = [11, 12, 13, 14, 15], {}
    _, ahead, counts = secure_round(cohort, 1, {}, secrets)
    assert counts["advertise"] == 5 and set(ahead) == set(cohort)
    result, ahead2, counts = secure_round(cohort, 2, ahead, secrets)
    assert counts["advertise"] == 0 and result.survivors == tuple(cohort)
    assert set(ahead2) == set(cohort) and not set(ahead.values()) & set(ahead2.values())


def test_mixed_cohort_and_a_dropout_with_keys_ahead_still_sum_exactly() -> None:
    secrets: dict[int, bytes] = {}
    _, ahead, _ = secure_round([11, 12, 13], 1, {}, secrets)
    # 11-13 return with keys ahead, 14-15 are new; 12 drops after sharing its keys
    result, _, counts = secure_round([11, 12, 13, 14, 15], 2, ahead, secrets,
                                     drop=frozenset({12}))
    assert counts["advertise"] == 2
    assert 12 not in result.survivors and len(result.survivors) == 4


def test_a_pair_serves_one_round_only() -> None:
    secrets: dict[int, bytes] = {}
    _, ahead, _ = secure_round([11, 12, 13, 14, 15], 1, {}, secrets)
    kept = dict(secrets)
    secure_round([11, 12, 13, 14, 15], 2, ahead, secrets)
    later = SecAggServer([11, 12, 13, 14, 15], D, round=3, params=PARAMS).setup()
    same_round = SecAggServer([11, 12, 13, 14, 15], D, round=1, params=PARAMS).setup()
    # the client refuses its keys for a round not after the one they were made in
    with pytest.raises(SecAggRejected, match="cannot serve"):
        SecAggClient.with_keys_ahead(11, same_round, kept[11])
    with pytest.raises(SecAggRejected, match="cannot serve"):
        SecAggClient.with_keys_ahead(12, later, kept[11])  # another node's keys
    # and the transport forgets a pair once taken, so a coordinator cannot get it used twice
    context = Context(run_id=1, node_id=11, node_config={}, state=RecordDict(),
                      run_config={})
    context.state[secure.AHEAD_KEY] = ConfigRecord({"keys": kept[11]})
    request = ConfigRecord({"type": 3})  # a ShareKeysRequest's type
    with pytest.raises(SecAggRejected):  # the request is garbage; the point is what follows
        secure.answer(request, context, ConfigRecord(later.to_config()))
    assert secure.AHEAD_KEY not in context.state.config_records
    with pytest.raises(ValueError, match="holds none"):
        secure.answer(request, context, ConfigRecord(later.to_config()))


def test_a_plain_setup_makes_the_client_drop_its_keys_ahead() -> None:
    context = Context(run_id=1, node_id=11, node_config={}, state=RecordDict(),
                      run_config={})
    context.state[secure.AHEAD_KEY] = ConfigRecord({"keys": b"x" * 10})
    setup = SecAggServer([11, 12], D, round=4, params=SecAggParams()).setup()
    secure.answer(ConfigRecord(setup.to_config()), context)
    assert secure.AHEAD_KEY not in context.state.config_records


def test_tampered_or_foreign_keys_ahead_are_ignored_not_fatal() -> None:
    cohort = [11, 12, 13, 14, 15]
    server = SecAggServer(cohort, D, round=1, params=PARAMS)
    setup = server.setup()
    clients = {u: SecAggClient(u) for u in cohort}
    requests = server.share_keys_requests({u: c.advertise_keys(setup)
                                           for u, c in clients.items()})
    requests = server.masked_input_requests({u: clients[u].share_keys(r)
                                             for u, r in requests.items()})
    inputs = _inputs(cohort, 1)
    masked = {u: clients[u].masked_input(r, inputs[u]) for u, r in requests.items()}
    adverts = {u: clients[u].keys_ahead()[0] for u in cohort}
    forged = KeysAhead(round=1, sender=12, receiver=0, enc_key=adverts[12].enc_key,
                       mask_key=adverts[12].mask_key, tag=bytes(28))
    replayed = adverts[13]
    accepted = server.keys_ahead({11: adverts[11], 12: forged, 14: replayed, 15: b"junk"})
    assert set(accepted) == {11}  # 14 sent 13's advert: not from its sender
    # the masked inputs stand: the round completes with everyone
    requests = server.unmask_requests(masked)
    result = server.finish({u: clients[u].unmask(r) for u, r in requests.items()})
    assert result.survivors == tuple(cohort)


def test_a_client_given_another_setup_than_the_coordinators_refuses_to_share() -> None:
    secrets: dict[int, bytes] = {}
    _, ahead, _ = secure_round([11, 12, 13, 14, 15], 1, {}, secrets)
    other = SecAggServer([11, 12, 13, 14, 15], D, round=2, params=PARAMS).setup()
    # 11 gets a different Setup than the one its share-keys request was tagged under: it
    # refuses the request, and the round goes on without it
    result, _, _ = secure_round([11, 12, 13, 14, 15], 2, ahead, secrets,
                                setup_for=lambda u, s: other if u == 11 else s)
    assert result.survivors == (12, 13, 14, 15) and "share_keys" in result.dropped[11]


def test_adopted_node_that_also_advertises_is_rejected() -> None:
    secrets: dict[int, bytes] = {}
    _, ahead, _ = secure_round([11, 12, 13, 14, 15], 1, {}, secrets)
    server = SecAggServer([11, 12, 13, 14, 15], D, round=2, params=PARAMS)
    setup = server.setup()
    assert server.adopt_keys(ahead) == frozenset({11, 12, 13, 14, 15})
    extra = SecAggClient(11).advertise_keys(setup)
    requests = server.share_keys_requests({11: extra})
    assert 11 not in requests and "advertise" in server.dropped[11]


def test_adopt_keys_skips_invalid_keys_and_strangers() -> None:
    server = SecAggServer([11, 12, 13], D, round=2, params=SecAggParams())
    server.setup()
    good = SecAggClient(13)
    setup = SecAggServer([13, 14], D, round=1, params=SecAggParams()).setup()
    advert = good.advertise_keys(setup)
    adopted = server.adopt_keys({11: b"\x00" * 64, 12: b"short", 13: advert.enc_key +
                                 advert.mask_key, 99: advert.enc_key + advert.mask_key})
    assert adopted == frozenset({13})


def test_keys_ahead_ride_on_the_training_reply_records() -> None:
    """The transport: ``masked_update(ahead=True)`` adds the record and keeps the secret."""
    cohort = [11, 12]
    server = SecAggServer(cohort, 3, round=1, params=SecAggParams())
    setup = server.setup()
    contexts = {u: Context(run_id=1, node_id=u, node_config={}, state=RecordDict(),
                           run_config={}) for u in cohort}
    replies = {u: secure.answer(ConfigRecord(setup.to_config()), contexts[u]) for u in cohort}
    requests = server.share_keys_requests({u: dict(r) for u, r in replies.items()})
    replies = {u: secure.answer(ConfigRecord(r.to_config()), contexts[u])
               for u, r in requests.items()}
    requests = server.masked_input_requests({u: dict(r) for u, r in replies.items()})
    records = {u: secure.masked_update(ConfigRecord(r.to_config()), np.zeros(3, np.int16),
                                       contexts[u], ahead=True) for u, r in requests.items()}
    assert all(set(rec) == {P.SECAGG, P.SECAGG_AHEAD} for rec in records.values())
    assert all(secure.AHEAD_KEY in c.state.config_records for c in contexts.values())
    stage = Stage.ADVERTISE_KEYS.name.lower()
    before = server.stats.uplink_bytes[stage]
    kept = server.keys_ahead({u: dict(rec[P.SECAGG_AHEAD]) for u, rec in records.items()})
    assert set(kept) == set(cohort)
    assert server.stats.uplink_bytes[stage] - before == sum(
        KeysAhead.from_config(dict(rec[P.SECAGG_AHEAD])).wire_size() for rec in records.values())
