"""SecAgg+ protocol: exact sums, dropouts at every stage, rejected messages, uniform masking."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from fleetfl.privacy import (
    AdvertiseKeys,
    MaskedInput,
    MaskedInputRequest,
    Message,
    MessageError,
    SecAggAbort,
    SecAggClient,
    SecAggParams,
    SecAggRejected,
    SecAggServer,
    SecAggStateError,
    Setup,
    ShareKeys,
    Stage,
    UnmaskRequest,
    UnmaskShares,
    graph,
    ring,
)
from fleetfl.privacy.crypto import seeded_random_bytes

STAGES = (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.MASKED_INPUT, Stage.UNMASK)
Tamper = Callable[[int, Message], Message | None]  # (sender, reply) -> reply to deliver


@dataclasses.dataclass
class Round:
    server: SecAggServer
    clients: dict[int, SecAggClient]
    inputs: dict[int, np.ndarray]
    replies: dict[Stage, dict[int, Message]]


def make_round(n: int, d: int, *, params: SecAggParams | None = None, seed: int = 0,
               rnd: int = 1, first_id: int = 101) -> Round:
    rng = np.random.default_rng(seed)
    cohort = list(range(first_id, first_id + n))
    inputs = {u: rng.integers(-127, 128, size=d).astype(np.int8) for u in cohort}
    server = SecAggServer(cohort, d, round=rnd, params=params,
                          random_bytes=seeded_random_bytes(b"server%d" % seed))
    clients = {u: SecAggClient(u, random_bytes=seeded_random_bytes(b"c%d-%d" % (seed, u)))
               for u in cohort}
    return Round(server, clients, inputs, {})


def run(r: Round, *, drop: Mapping[Stage, set[int]] | None = None,
        tamper: Mapping[Stage, Tamper] | None = None) -> Any:
    """Run all four stages; ``drop[s]``: clients that do not reply at stage ``s``."""
    drop, tamper = drop or {}, tamper or {}
    gone: set[int] = set()
    requests: dict[int, Any] = dict.fromkeys(r.clients, r.server.setup())
    steps = (r.server.share_keys_requests, r.server.masked_input_requests,
             r.server.unmask_requests, r.server.finish)
    for stage, step in zip(STAGES, steps, strict=True):
        gone |= drop.get(stage, set())
        replies = {}
        for node, request in requests.items():
            if node in gone:
                continue
            client = r.clients[node]
            reply = (client.masked_input(request, r.inputs[node])
                     if stage == Stage.MASKED_INPUT else client.handle(request))
            if stage in tamper:
                reply = tamper[stage](node, reply)
            if reply is not None:
                replies[node] = reply
        r.replies[stage] = replies
        requests = step(replies)
    return requests


def plain_sum(r: Round, nodes: Any) -> np.ndarray:
    return sum((r.inputs[u].astype(np.int64) for u in nodes), np.zeros(
        len(next(iter(r.inputs.values()))), dtype=np.int64))


def complete(n: int, t: int) -> SecAggParams:
    return SecAggParams(num_neighbours=n - 1, threshold=t)


# ----------------------------------------------------------------------------- exact sums


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(2, 8), d=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_unmasked_sum_equals_plaintext_sum(n: int, d: int, seed: int) -> None:
    r = make_round(n, d, seed=seed)
    result = run(r)
    assert result.sum.dtype == np.int64
    np.testing.assert_array_equal(result.sum, plain_sum(r, r.clients))
    assert result.survivors == tuple(sorted(r.clients)) and not result.dropped


def test_extreme_values_do_not_wrap_the_smallest_ring() -> None:
    n, d = 9, 64
    r = make_round(n, d)
    for i, u in enumerate(r.inputs):  # all at +127 or all at -127: the sum's bounds
        r.inputs[u] = np.full(d, 127 if i % 2 else -127, dtype=np.int8)
    r.inputs[101][:32] = 127
    result = run(r)
    assert result.ring_bits == ring.bits_for_sum(n) == 12
    np.testing.assert_array_equal(result.sum, plain_sum(r, r.clients))


def test_sparse_graph_round_is_exact_and_sparse() -> None:
    n = 30
    r = make_round(n, 500, params=SecAggParams(num_neighbours=6, threshold=4))
    result = run(r)
    assert (result.num_neighbours, result.threshold) == (6, 4)
    np.testing.assert_array_equal(result.sum, plain_sum(r, r.clients))
    shares = r.replies[Stage.SHARE_KEYS]
    assert all(len(m.ciphertexts) == 6 for m in shares.values())  # k, not n - 1


def test_derived_parameters_are_used() -> None:
    r = make_round(20, 10)
    result = run(r)
    assert (result.num_neighbours, result.threshold) == graph.choose_parameters(20)
    assert result.num_neighbours < 19  # SecAgg+, not the complete graph


def test_rejects_out_of_range_update() -> None:
    r = make_round(3, 4)
    r.inputs[101] = np.array([0, 0, 0, -128], dtype=np.int8)
    with pytest.raises(ValueError, match="-127, 127"):
        run(r)


# ----------------------------------------------------------------------------- dropouts


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name.lower())
def test_dropouts_up_to_n_minus_t_succeed(stage: Stage) -> None:
    n, t = 10, 6
    r = make_round(n, 50, params=complete(n, t))
    dropped = set(list(r.clients)[: n - t])
    result = run(r, drop={stage: dropped})
    # clients gone during unmask already sent their masked input: they are in the sum
    in_sum = set(r.clients) - (dropped if stage != Stage.UNMASK else set())
    assert set(result.survivors) == in_sum
    np.testing.assert_array_equal(result.sum, plain_sum(r, in_sum))
    assert set(result.dropped) == dropped  # recorded either way, with the stage
    assert all(result.dropped[u].startswith(stage.name.lower()) for u in dropped)


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name.lower())
def test_more_than_n_minus_t_dropouts_abort_cleanly(stage: Stage) -> None:
    n, t = 10, 6
    r = make_round(n, 50, params=complete(n, t))
    with pytest.raises(SecAggAbort, match="no model update"):
        run(r, drop={stage: set(list(r.clients)[: n - t + 1])})
    with pytest.raises(SecAggStateError, match="aborted"):  # and the round stays dead
        r.server.finish({})


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name.lower())
def test_derived_parameters_survive_the_stated_dropout_fraction(stage: Stage) -> None:
    """Default parameters (sparse graph at n = 20) promise ⌊0.3 n⌋ dropouts: any 6 will do."""
    n = 20
    r = make_round(n, 30, seed=int(stage))
    assert r.server.num_neighbours < n - 1
    rng = np.random.default_rng(int(stage))
    dropped = set(rng.choice(list(r.clients), int(0.3 * n), replace=False).tolist())
    result = run(r, drop={stage: dropped})
    in_sum = set(r.clients) - (dropped if stage != Stage.UNMASK else set())
    np.testing.assert_array_equal(result.sum, plain_sum(r, in_sum))


def test_no_masked_input_at_all_aborts() -> None:
    r = make_round(6, 5, params=complete(6, 4))
    with pytest.raises(SecAggAbort, match="only 0 masked inputs"):
        run(r, drop={Stage.MASKED_INPUT: set(r.clients)})


def test_dropouts_spread_over_every_stage() -> None:
    n, t = 16, 9  # 7 dropouts leave 9 = t holders to unmask
    r = make_round(n, 80, params=complete(n, t))
    ids = list(r.clients)
    drop = {Stage.ADVERTISE_KEYS: {ids[0]}, Stage.SHARE_KEYS: {ids[1], ids[2]},
            Stage.MASKED_INPUT: {ids[3], ids[4]}, Stage.UNMASK: {ids[5], ids[6]}}
    result = run(r, drop=drop)
    in_sum = set(ids[5:])
    assert set(result.survivors) == in_sum
    np.testing.assert_array_equal(result.sum, plain_sum(r, in_sum))
    assert set(result.dropped) == set(ids[:7])
    assert result.dropped[ids[3]].startswith("masked_input")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), data=st.data())
def test_random_dropouts_give_exact_sum_or_abort(seed: int, data: st.DataObject) -> None:
    """Whatever drops when, the round never returns a wrong sum."""
    n = 16
    r = make_round(n, 30, params=SecAggParams(num_neighbours=8, threshold=5), seed=seed)
    ids = list(r.clients)
    drop = {s: set(data.draw(st.lists(st.sampled_from(ids), max_size=4))) for s in STAGES}
    try:
        result = run(r, drop=drop)
    except SecAggAbort:
        return
    late = drop[Stage.UNMASK] - set().union(*(drop[s] for s in STAGES[:3]))
    possible = (set(ids) - set().union(*drop.values())) | late
    survivors = set(result.survivors)
    # The coordinator may also leave out a client whose live neighbours became too few to
    # hold t of its shares (a sparse graph); each one left out is accounted for as dropped.
    assert survivors <= possible
    assert possible - survivors <= set(result.dropped)
    assert all("neighbours" in result.dropped[u] for u in possible - survivors - late)
    np.testing.assert_array_equal(result.sum, plain_sum(r, survivors))


def test_sparse_graph_prunes_clients_with_too_few_live_neighbours() -> None:
    n = 20
    r = make_round(n, 20, params=SecAggParams(num_neighbours=6, threshold=4))
    order = graph.ring_order(list(r.clients), r.server.setup_message.graph_seed)
    victim = order[5]  # four of its six neighbours leave: 1 + 2 live holders < t = 4
    gone = {order[3], order[4], order[6], order[7]}
    result = run(r, drop={Stage.ADVERTISE_KEYS: gone})
    assert "neighbours" in result.dropped[victim]
    assert set(result.dropped) == gone | {victim}  # the others keep enough holders
    np.testing.assert_array_equal(result.sum, plain_sum(r, result.survivors))


# ----------------------------------------------------------------------------- rejections


def resign(msg: Message, client: SecAggClient) -> Message:
    """``msg`` with a valid tag from ``client``: what a faulty but authentic client sends."""
    return msg.signed(client._channel)


def flip(data: bytes, at: int = 5) -> bytes:
    return data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :]


def test_tampered_masked_input_is_rejected_and_round_goes_on() -> None:
    n, t = 8, 5
    r = make_round(n, 40, params=complete(n, t))
    victim = 103

    def tamper(node: int, reply: Message) -> Message:
        if node == victim:
            assert isinstance(reply, MaskedInput)
            return dataclasses.replace(reply, masked=flip(reply.masked))
        return reply

    result = run(r, tamper={Stage.MASKED_INPUT: tamper})
    [rejection] = result.rejections
    assert (rejection.sender, rejection.stage) == (victim, Stage.MASKED_INPUT)
    assert "authentication failed" in str(rejection) and f"node {victim}" in str(rejection)
    assert victim not in result.survivors
    np.testing.assert_array_equal(result.sum, plain_sum(r, set(r.clients) - {victim}))


def test_tampered_share_ciphertext_is_reported_by_its_receiver() -> None:
    n, t = 8, 5
    r = make_round(n, 40, params=complete(n, t))
    sender, receiver = 102, 105

    def tamper(node: int, reply: Message) -> Message:
        if node != sender:
            return reply
        assert isinstance(reply, ShareKeys)
        bad = {**reply.ciphertexts, receiver: flip(reply.ciphertexts[receiver], 20)}
        return resign(dataclasses.replace(reply, ciphertexts=bad), r.clients[sender])

    result = run(r, tamper={Stage.SHARE_KEYS: tamper})
    report = r.replies[Stage.MASKED_INPUT][receiver].rejected
    assert list(report) == [sender] and "did not open" in report[sender]
    np.testing.assert_array_equal(result.sum, plain_sum(r, r.clients))  # still exact


def test_replay_from_an_earlier_round_is_rejected() -> None:
    old = make_round(5, 10, rnd=1, params=complete(5, 3))
    run(old)
    new = make_round(5, 10, rnd=2, params=complete(5, 3))

    def replay(node: int, reply: Message) -> Message:
        return old.replies[Stage.ADVERTISE_KEYS][node] if node == 101 else reply

    result = run(new, tamper={Stage.ADVERTISE_KEYS: replay})
    [rejection] = result.rejections
    assert rejection.sender == 101 and "round 1 in round 2" in rejection.reason
    np.testing.assert_array_equal(result.sum, plain_sum(new, set(new.clients) - {101}))


def test_client_rejects_a_request_replayed_from_another_round() -> None:
    old, new = make_round(4, 5, rnd=1), make_round(4, 5, rnd=2)
    old_requests = run_until(old, Stage.SHARE_KEYS)
    new_requests = run_until(new, Stage.SHARE_KEYS)
    with pytest.raises(SecAggRejected, match="round 1 in round 2"):
        new.clients[101].share_keys(old_requests[101])
    new.clients[101].share_keys(new_requests[101])  # the genuine one still works


def run_until(r: Round, stage: Stage) -> dict[int, Any]:
    """Requests of ``stage`` (every client answering everything before it)."""
    setup = r.server.setup()
    requests = r.server.share_keys_requests({u: c.advertise_keys(setup)
                                             for u, c in r.clients.items()})
    if stage == Stage.SHARE_KEYS:
        return requests
    requests = r.server.masked_input_requests({u: r.clients[u].share_keys(m)
                                               for u, m in requests.items()})
    if stage == Stage.MASKED_INPUT:
        return requests
    return r.server.unmask_requests({u: r.clients[u].masked_input(m, r.inputs[u])
                                     for u, m in requests.items()})


def test_reordered_and_misattributed_replies_are_rejected() -> None:
    r = make_round(7, 10, params=complete(7, 4))  # 3 rejected leave 4 = t inputs
    requests = run_until(r, Stage.MASKED_INPUT)
    masked = {u: r.clients[u].masked_input(m, r.inputs[u]) for u, m in requests.items()}
    swapped = dict(masked)
    swapped[101], swapped[102] = masked[102], masked[101]  # each under the other's id
    swapped[103] = r.clients[104].to_state()  # not a MaskedInput at all
    r.server.unmask_requests(swapped)
    reasons = {x.sender: x.reason for x in r.server.rejections}
    assert "claims to be from node 102" in reasons[101]
    assert "claims to be from node 101" in reasons[102]
    assert "expected MaskedInput" in reasons[103]


def test_client_rejects_a_share_routed_to_the_wrong_receiver() -> None:
    r = make_round(5, 10, params=complete(5, 3))
    requests = run_until(r, Stage.MASKED_INPUT)
    a, b = requests[101], requests[102]
    # the coordinator hands 101 the ciphertext that 103 sealed for 102, and signs it
    misrouted = {**a.ciphertexts, 103: b.ciphertexts[103]}
    forged = dataclasses.replace(a, ciphertexts=misrouted).signed(r.server._channel[101])
    reply = r.clients[101].masked_input(forged, r.inputs[101])
    assert list(reply.rejected) == [103]


def test_client_rejects_out_of_order_and_repeated_stages() -> None:
    r = make_round(3, 4)
    setup = r.server.setup()
    client = r.clients[101]
    with pytest.raises(SecAggStateError, match="unmask called after nothing"):
        client.unmask(UnmaskRequest(round=1, sender=0, receiver=101, survivors=(),
                                    dropped=()))
    client.advertise_keys(setup)
    with pytest.raises(SecAggStateError, match="advertise_keys called after advertise_keys"):
        client.advertise_keys(setup)
    with pytest.raises(SecAggStateError, match="out of order"):
        r.server.finish({})


def test_foreign_messages_are_rejected() -> None:
    r = make_round(4, 5, params=complete(4, 3))
    other = make_round(4, 5, params=complete(4, 3), seed=1)  # another coordinator, same round
    setup = r.server.setup()
    replies: dict[int, Any] = {u: c.advertise_keys(setup) for u, c in r.clients.items()}
    other_setup = other.server.setup()
    replies[102] = other.clients[102].advertise_keys(other_setup)  # keyed to another server
    intruder = SecAggClient(999, random_bytes=seeded_random_bytes(b"x"))
    replies[999] = intruder.advertise_keys(dataclasses.replace(
        setup, cohort=(*setup.cohort, 999), num_neighbours=4, ring_bits=11))
    requests = r.server.share_keys_requests(replies)
    reasons = {x.sender: x.reason for x in r.server.rejections}
    assert "authentication failed" in reasons[102]
    assert "not in this round's cohort" in reasons[999]
    assert set(requests) == {101, 103, 104}


def test_client_rejects_tampered_or_misaddressed_requests() -> None:
    r = make_round(4, 5, params=complete(4, 3))
    requests = run_until(r, Stage.SHARE_KEYS)
    bad_keys = dict(requests[101].public_keys)
    bad_keys[102] = flip(bad_keys[102], 40)
    with pytest.raises(SecAggRejected, match="authentication failed") as info:
        r.clients[101].share_keys(dataclasses.replace(requests[101], public_keys=bad_keys))
    assert info.value.sender == 0  # the coordinator's message
    with pytest.raises(SecAggRejected, match="not from the coordinator to node 101"):
        r.clients[101].share_keys(requests[102])


def test_client_never_reveals_both_secrets_of_a_node() -> None:
    r = make_round(5, 5, params=complete(5, 3))
    requests = run_until(r, Stage.UNMASK)
    req = requests[101]
    both = dataclasses.replace(req, dropped=(req.survivors[0],)).signed(r.server._channel[101])
    with pytest.raises(SecAggRejected, match="both as survivors and as dropped"):
        r.clients[101].unmask(both)


def test_client_refuses_a_setup_with_threshold_below_its_floor() -> None:
    r = make_round(4, 5, params=complete(4, 2))
    client = SecAggClient(101, min_threshold=3)
    with pytest.raises(SecAggRejected, match="threshold 2 outside"):
        client.advertise_keys(r.server.setup())


def test_wrong_unmask_share_is_caught_not_summed() -> None:
    n, t = 8, 5
    r = make_round(n, 30, params=complete(n, t))
    liar, owner = 102, 106

    def lie(node: int, reply: Message) -> Message:
        if node != liar:
            return reply
        assert isinstance(reply, UnmaskShares)
        seeds = {**reply.seed_shares, owner: flip(reply.seed_shares[owner], 0)}
        return resign(dataclasses.replace(reply, seed_shares=seeds), r.clients[liar])

    result = run(r, tamper={Stage.UNMASK: lie})  # spare shares: the right seed is found
    np.testing.assert_array_equal(result.sum, plain_sum(r, r.clients))

    r = make_round(n, 30, params=complete(n, t))
    few = set([u for u in r.clients if u not in (liar, owner)][: n - t])  # t answer
    with pytest.raises(SecAggAbort, match=f"shares of node {owner}"):
        run(r, drop={Stage.UNMASK: few}, tamper={Stage.UNMASK: lie})


# ----------------------------------------------------------------------------- uniformity


def masked_ring_values(n: int, d: int, update: np.ndarray) -> tuple[np.ndarray, int]:
    r = make_round(n, d, params=complete(n, n // 2 + 1), seed=7)
    r.inputs[101] = update
    requests = run_until(r, Stage.MASKED_INPUT)
    reply = r.clients[101].masked_input(requests[101], update)
    bits = r.server.ring_bits
    return ring.unpack(reply.masked, bits, d).astype(np.int64), bits


@pytest.mark.parametrize("kind", ["zeros", "max", "gaussian"])
def test_one_clients_masked_vector_is_uniform(kind: str) -> None:
    n = 5
    bits = ring.bits_for_sum(n)  # 11 bits: 2048 values
    d = 50 * (1 << bits)  # 50 expected per value
    rng = np.random.default_rng(3)
    update = {"zeros": np.zeros(d), "max": np.full(d, 127),
              "gaussian": np.clip(rng.normal(0, 20, d), -127, 127)}[kind].astype(np.int8)
    masked, bits = masked_ring_values(n, d, update)
    assert chisquare(np.bincount(masked, minlength=1 << bits)).pvalue > 1e-3
    # the same test does fail on what was masked: it can tell non-uniform data apart
    raw = ring.embed(update, bits, 127).astype(np.int64)
    assert chisquare(np.bincount(raw, minlength=1 << bits)).pvalue < 1e-12


def test_masked_vector_is_uniform_even_with_a_single_peer() -> None:
    d = 1 << 15
    update = np.full(d, 5, dtype=np.int8)
    r = make_round(2, d, params=complete(2, 2), seed=9)
    requests = run_until(r, Stage.MASKED_INPUT)
    reply = r.clients[101].masked_input(requests[101], update)
    values = ring.unpack(reply.masked, r.server.ring_bits, d).astype(np.int64)
    assert chisquare(np.bincount(values, minlength=1 << r.server.ring_bits)).pvalue > 1e-3


# ----------------------------------------------------------------------------- messages


def test_every_message_round_trips_bytes_and_flower_records() -> None:
    r = make_round(4, 9, params=complete(4, 3))
    run(r)
    messages: list[Message] = [r.server.setup_message]
    for replies in r.replies.values():
        messages += list(replies.values())
    for msg in messages:
        assert type(msg).from_bytes(msg.to_bytes()) == msg
        record = RecordDict({"secagg": ConfigRecord(msg.to_config())})
        assert type(msg).from_config(record["secagg"]) == msg
        assert msg.wire_size() == len(msg.to_bytes())


def test_malformed_messages_name_the_problem() -> None:
    msg = AdvertiseKeys(round=1, sender=5, receiver=0, enc_key=b"a" * 32, mask_key=b"b" * 32)
    with pytest.raises(MessageError, match="truncated"):
        AdvertiseKeys.from_bytes(msg.to_bytes()[:-40])
    with pytest.raises(MessageError, match="expected ShareKeys"):
        ShareKeys.from_bytes(msg.to_bytes())
    config = msg.to_config()
    with pytest.raises(MessageError, match="'enc_key' must be bytes"):
        AdvertiseKeys.from_config({**config, "enc_key": "text"})
    with pytest.raises(MessageError, match="missing key 'round'"):
        AdvertiseKeys.from_config({k: v for k, v in config.items() if k != "round"})
    with pytest.raises(MessageError, match="trailing"):
        AdvertiseKeys.from_bytes(msg.to_bytes() + b"\0")
    with pytest.raises(MessageError, match="u64"):
        Setup.from_config({**Setup(round=1, sender=0, receiver=0, cohort=(1,),
                                   num_neighbours=1, threshold=2, ring_bits=9, max_abs=127,
                                   vector_length=1, graph_seed=b"s" * 32,
                                   server_key=b"k" * 32).to_config(), "round": -1})


def test_clients_survive_being_saved_between_every_stage() -> None:
    """A Flower ClientApp keeps the client in context.state (bytes) between messages, and
    every message travels as a ConfigRecord both ways."""
    r = make_round(6, 25, params=SecAggParams(num_neighbours=4, threshold=3))
    saved = {u: c.to_state() for u, c in r.clients.items()}

    def step(node: int, request: Any, update: np.ndarray | None = None) -> ConfigRecord:
        client = SecAggClient.from_state(saved[node])
        reply = client.handle(ConfigRecord(request.to_config()), update)
        saved[node] = client.to_state()
        return ConfigRecord(reply.to_config())  # what the coordinator reads from the reply

    setup = r.server.setup()
    reqs = r.server.share_keys_requests({u: step(u, setup) for u in r.clients})
    reqs = r.server.masked_input_requests({u: step(u, m) for u, m in reqs.items()})
    reqs = r.server.unmask_requests({u: step(u, m, r.inputs[u]) for u, m in reqs.items()})
    result = r.server.finish({u: step(u, m) for u, m in reqs.items()})
    np.testing.assert_array_equal(result.sum, plain_sum(r, r.clients))


def test_byte_accounting_matches_messages_and_meets_the_uplink_budget() -> None:
    n, d = 10, 20_000
    r = make_round(n, d)
    result = run(r)
    stats = result.stats
    for stage in STAGES:
        sent = sum(m.wire_size() for m in r.replies[stage].values())
        assert stats.uplink_bytes[stage.name.lower()] == sent
    client = r.clients[101]
    per_client = sum(client.stats.uplink_bytes.values())
    assert per_client == stats.uplink_by_client[101]
    assert per_client <= 2.2 * d  # uplink budget: 2.2x the plain int8 update
    assert r.replies[Stage.MASKED_INPUT][101].masked.__len__() == ring.packed_size(
        d, result.ring_bits)
    assert all(s >= 0 for s in client.stats.seconds.values()) and len(client.stats.seconds) == 4


def test_masked_input_request_lists_exactly_the_live_neighbours() -> None:
    r = make_round(12, 5, params=SecAggParams(num_neighbours=6, threshold=4))
    requests = run_until(r, Stage.MASKED_INPUT)
    nbrs = graph.neighbours(list(r.clients), 6, r.server.setup_message.graph_seed)
    for node, req in requests.items():
        assert isinstance(req, MaskedInputRequest) and set(req.ciphertexts) == nbrs[node]


# ----------------------------------------------------------------------------- graph


def test_harary_graph_is_regular_symmetric_and_seeded() -> None:
    nodes = list(range(1, 41))
    g = graph.neighbours(nodes, 8, b"s" * 32)
    assert all(len(v) == 8 and u not in v for u, v in g.items())
    assert all(u in g[v] for u in g for v in g[u])
    assert g == graph.neighbours(nodes, 8, b"s" * 32)
    assert g != graph.neighbours(nodes, 8, b"t" * 32)
    assert graph.neighbours(nodes, 7, b"s" * 32) == g  # odd degrees round up
    full = graph.neighbours(nodes, 60, b"s" * 32)
    assert all(len(v) == 39 for v in full.values())


def test_chosen_parameters_meet_their_bounds() -> None:
    for n in (20, 50, 100, 1000):
        k, t = graph.choose_parameters(n, corrupt_fraction=0.1, dropout_fraction=0.3)
        assert 2 <= t <= k + 1 and t > (k + 1) / 2
        b = graph.bounds(n, k, t, 0.1, 0.3)
        assert b.log2_share_leak <= -40 and b.log2_round_fails <= -30
        assert b.log2_disconnected <= -40
    assert graph.choose_parameters(1000)[0] < 999  # logarithmic, not complete
    # the degree grows far slower than n
    assert graph.choose_parameters(10_000)[0] < 2 * graph.choose_parameters(1000)[0]


def test_infeasible_parameters_are_refused_with_a_hint() -> None:
    with pytest.raises(ValueError, match="dropout_fraction"):
        graph.choose_parameters(20, corrupt_fraction=0.4, dropout_fraction=0.6)
    assert graph.choose_parameters(20, num_neighbours=4, threshold=3) == (4, 3)


def test_disconnection_bound_holds_empirically() -> None:
    """Monte Carlo on the Harary graph: honest survivors disconnect no more than the bound."""
    n, k, corrupt, dropout = 40, 8, 0.2, 0.2
    bad_count = int(corrupt * n) + int(dropout * n)
    bound = 2 ** graph.bounds(n, k, k // 2 + 1, corrupt, dropout).log2_disconnected
    rng = np.random.default_rng(0)
    nodes = list(range(1, n + 1))
    trials, disconnected = 400, 0
    for trial in range(trials):
        g = graph.neighbours(nodes, k, trial.to_bytes(32, "little"))
        good = set(nodes) - set(rng.choice(nodes, bad_count, replace=False).tolist())
        seen, todo = set(), [next(iter(good))]
        while todo:
            u = todo.pop()
            if u not in seen:
                seen.add(u)
                todo += [v for v in g[u] if v in good]
        disconnected += seen != good
    assert 0 < disconnected / trials <= bound  # the bound is not vacuous here, and holds
