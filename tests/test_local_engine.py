"""The local engine: real worker processes behind a Flower Grid, and lazily known populations."""

import json
import time

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fleetfl.coordinator.config import ConfigError, from_dict
from fleetfl.coordinator.local_engine import FIRST_NODE_ID, index_of, local_grid, node_id_of
from fleetfl.coordinator.planning import PlanSettings, draw_cohort
from fleetfl.coordinator.population import Population, SimulatedFleet
from fleetfl.coordinator.registry import parse_registration
from fleetfl.coordinator.worker_pool import load_app, split_batches
from fleetfl.devices.fleet import build_fleet, fleet_kinds

APP = "engine_apps:app"


def _ask(grid, nodes, **cfg):
    return [Message(RecordDict({"config": ConfigRecord(cfg)}), dst_node_id=n,
                    message_type=MessageType.QUERY) for n in nodes]


def _by_partition(replies):
    return {int(r.content["config"]["partition"]): r for r in replies if not r.has_error()}


def test_every_node_answers_from_worker_processes_and_keeps_its_context():
    with local_grid(APP, num_nodes=40, workers=2) as grid:
        nodes = list(grid.get_node_ids())
        assert nodes == [node_id_of(i) for i in range(40)] and index_of(nodes[3]) == 3
        # 0.1 s each: long enough that the second worker, still importing, gets a share.
        first = list(grid.send_and_receive(
            _ask(grid, nodes, act="sleep", seconds=0.1, targets=list(range(40))), timeout=120))
        second = list(grid.send_and_receive(_ask(grid, nodes[:5]), timeout=120))
    got = _by_partition(first)
    assert sorted(got) == list(range(40))
    assert {r.metadata.src_node_id for r in first} == set(nodes)
    assert len({int(r.content["config"]["pid"]) for r in first}) == 2  # both workers served
    # A node's context came back with its reply and went out with its next message.
    assert all(int(r.content["config"]["seen"]) == 1 for r in first)
    assert all(int(r.content["config"]["seen"]) == 2 for r in second)
    assert len(grid.contexts) == 40


def test_a_raising_client_is_an_error_reply_and_the_others_answer():
    with local_grid(APP, num_nodes=6, workers=2) as grid:
        replies = list(grid.send_and_receive(
            _ask(grid, grid.get_node_ids(), act="raise", targets=[2]), timeout=120))
    errors = [r for r in replies if r.has_error()]
    assert len(replies) == 6 and len(errors) == 1
    assert errors[0].metadata.src_node_id == node_id_of(2)
    assert "partition 2 refuses" in errors[0].error.reason
    assert sorted(_by_partition(replies)) == [0, 1, 3, 4, 5]


def test_a_dead_worker_fails_its_batch_only_and_the_pool_comes_back():
    with local_grid(APP, num_nodes=8, workers=2) as grid:
        nodes = list(grid.get_node_ids())
        replies = list(grid.send_and_receive(_ask(grid, nodes, act="die", targets=[0]),
                                             timeout=120))
        again = list(grid.send_and_receive(_ask(grid, nodes), timeout=120))
    died = [r for r in replies if r.has_error()]
    assert len(replies) == 8 and died  # every message was answered, some with an error
    assert node_id_of(0) in {r.metadata.src_node_id for r in died}
    assert all("died" in r.error.reason for r in died)
    assert sorted(_by_partition(again)) == list(range(8))  # the next dispatch is served


def test_a_timeout_returns_what_came_and_drops_the_late_reply():
    with local_grid(APP, num_nodes=4, workers=2) as grid:
        nodes = list(grid.get_node_ids())
        list(grid.send_and_receive(_ask(grid, nodes), timeout=120))  # workers up
        replies = list(grid.send_and_receive(
            _ask(grid, nodes, act="sleep", seconds=4.0, targets=[3]), timeout=2.0))
        time.sleep(3.0)  # the late reply arrives in the meantime ...
        later = list(grid.send_and_receive(_ask(grid, nodes[:1]), timeout=60))
    # Returned without the sleeper's reply (waiting for all would have included it).
    assert node_id_of(3) not in {r.metadata.src_node_id for r in replies}
    assert {r.metadata.src_node_id for r in replies} == set(nodes[:3])
    assert [r.metadata.src_node_id for r in later] == [nodes[0]]  # ... and is not handed out
    assert not grid._replies


def test_messages_to_unknown_nodes_are_refused_not_sent():
    with local_grid(APP, num_nodes=2, workers=1) as grid:
        ids = list(grid.push_messages(_ask(grid, [FIRST_NODE_ID - 1, node_id_of(2),
                                                  node_id_of(1)])))
        assert len(ids) == 1
        assert [r.metadata.src_node_id for r in grid.send_and_receive([], timeout=0)] == []


def test_a_wrong_app_reference_fails_before_any_worker_starts():
    with pytest.raises(ValueError, match="module:attribute"):
        load_app("engine_apps")
    with pytest.raises(ValueError, match="not a flwr ClientApp"):
        load_app("engine_apps:not_an_app")


def test_batches_cover_the_cohort_in_order():
    jobs = list(range(100))
    batches = split_batches(jobs, workers=2)  # type: ignore[arg-type]
    assert [j for b in batches for j in b] == jobs
    assert max(map(len, batches)) <= 13 and len(batches) >= 8
    assert split_batches([], 2) == []


@pytest.mark.parametrize("changes, key", [
    ({"federation": {"engine": "dask"}}, "federation.engine"),
    ({"federation": {"engine": "local", "ray_address": "auto"}}, "federation.engine"),
    ({"federation": {"workers": -1}}, "federation.workers"),
])
def test_engine_config_errors_name_the_key(changes, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        from_dict(changes)


# --- populations ------------------------------------------------------------------------------

def test_the_simulated_fleet_is_what_its_clients_register_as():
    """The coordinator's derived population equals the registration each simulated client
    sends (the same ClientApp handler), member by member."""
    from flwr.app import Context

    from fleetfl.client.app import query
    from fleetfl.coordinator.server_app import message_config

    config = from_dict({"federation": {"num_clients": 30}})
    task = config.task.build()
    data = task.federated_data(30, config.task.seed)
    profiles, kind = fleet_kinds(30, config.fleet.mix, config.fleet.seed)
    fleet = SimulatedFleet(profiles, kind, [len(tr.y) for tr, _ in data.clients], node_id_of)
    cfg = message_config(config)
    cfg["op"] = "register"
    for i in range(30):
        msg = Message(RecordDict({"config": cfg}), dst_node_id=node_id_of(i),
                      message_type=MessageType.QUERY)
        ctx = Context(run_id=1, node_id=node_id_of(i), state=RecordDict(), run_config={},
                      node_config={"partition-id": i, "num-partitions": 30})
        reply = query(msg, ctx).content["config"]
        assert fleet.population.client(i) == parse_registration(node_id_of(i), reply)


def test_fleet_kinds_is_build_fleet():
    mix = {"rpi4": 0.5, "phone-low": 0.3, "jetson-nano": 0.2}
    profiles, kind = fleet_kinds(500, mix, seed=4)
    assert [profiles[k] for k in kind] == build_fleet(500, mix, seed=4)


def test_a_population_draws_the_cohort_a_client_list_draws():
    import torch

    from fleetfl.coordinator.planning import MemorySettings
    from fleetfl.coordinator.registry import ClientInfo
    from fleetfl.devices.memory_stats import training_memory_stats

    fleet = build_fleet(300, {"rpi-zero-2w": 0.3, "rpi4": 0.4, "phone-mid": 0.3}, seed=1)
    # Flower's node ids are random unsigned 64-bit integers.
    clients = [ClientInfo(2**63 + 7 * i, i, d, 5 + i % 40) for i, d in enumerate(fleet)]
    stats = training_memory_stats(torch.nn.Linear(64, 10), (64,))
    settings = PlanSettings(clients_per_round=50, local_epochs=1, batch_size=10, stragglers=0,
                            deadline_s=None, seed=3,
                            memory=MemorySettings(stats, runtime_bytes=320 * 2**20))
    pop = Population.of_clients(clients)
    for r in (1, 2, 9):
        a, b = draw_cohort(clients, r, settings), draw_cohort(pop, r, settings)
        assert a == b and len(a.members) == 50
        assert a.unfit_count > 0 and a.unfit_example[0].device.name == "rpi-zero-2w"


def test_a_population_of_100000_is_arrays_and_draws_a_cohort_of_1000():
    profiles, kind = fleet_kinds(100_000, json.loads(json.dumps({"rpi4": 1, "phone-low": 1})),
                                 seed=0)
    fleet = SimulatedFleet(profiles, kind, np.full(100_000, 20), node_id_of)
    pop = fleet.population
    assert sum(a.nbytes for a in (pop.node_ids, pop.indices, pop.profile_of, pop.num_examples,
                                  pop.runtime_bytes)) <= 40 * 100_000
    settings = PlanSettings(clients_per_round=1_000, local_epochs=1, batch_size=10,
                            stragglers=0, deadline_s=None, seed=0)
    cohort = draw_cohort(pop, 1, settings).members
    assert len({c.node_id for c in cohort}) == 1_000
    assert all(c.node_id == node_id_of(c.index) for c in cohort)


def test_a_task_that_makes_fewer_partitions_than_asked_is_a_config_error():
    from fleetfl.coordinator.central_eval import evaluation_sets
    from fleetfl.tasks.builtin import DigitsTask

    class Short(DigitsTask):
        def federated_data(self, num_clients, seed):
            return super().federated_data(num_clients - 1, seed)

    task = Short(model="logreg")
    config = from_dict({"federation": {"num_clients": 6, "clients_per_round": 3}})
    with pytest.raises(ConfigError, match=r"federation\.num_clients.*made 5 .*asked for 6"):
        evaluation_sets(config, task, task.build_model(0), deployed=False)
