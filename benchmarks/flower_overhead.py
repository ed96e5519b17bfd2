"""Our overhead on Flower's simulation engine: client trainings per second, ours vs plain Flower.

Both stacks train the same digits CNN on the same 20 Dirichlet(0.5) shards, 10 clients per
round, 2 local epochs of batch 10, on Flower's Ray engine with one CPU per client, and both
evaluate the global model centrally after every round. "plain Flower" is Flower's own
``FedAvg`` strategy with a textbook ClientApp (``torch.optim.SGD`` loop, ``ArrayRecord`` of the
state dict). "fleetfl" is ``fleetfl simulate`` (FleetFedProx with per-client plans, reply
screening, byte accounting, virtual clock, metrics files). Runs alternate A/B, B/A, ... in
fresh processes (earlier versions always ran Flower first); throughput counts rounds 2..R
(round 1 includes actor start-up).

    python -m benchmarks.flower_overhead [--rounds 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import PLAIN, emit, simulate

NUM_CLIENTS, PER_ROUND, EPOCHS, BATCH, LR = 20, 10, 2, 10, 0.1


def run_flower(rounds: int, num_clients: int = NUM_CLIENTS, per_round: int = PER_ROUND,
               partitions: int = 0) -> list[float]:
    """Plain Flower FedAvg; returns the wall time at the end of each round (seconds), from the
    round-0 evaluation. Client i trains on data partition i mod ``partitions`` (0: one each),
    as fleetfl's ``federation.data_partitions``."""
    partitions = partitions or num_clients
    import logging

    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    from fleetfl.tasks.builtin import DigitsTask
    from fleetfl.tasks.models import build_model
    from fleetfl.tasks.registry import load_federated
    from fleetfl.tasks.task import evaluate_task

    logging.getLogger("flwr").setLevel(logging.ERROR)

    def data():
        return load_federated("digits", num_clients=partitions, seed=0, partition_alpha=0.5)

    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        fed = data()
        shard, _ = fed.clients[int(context.node_config["partition-id"]) % partitions]
        model = build_model("cnn", fed.input_shape, fed.num_classes)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        x, y = torch.from_numpy(shard.x), torch.from_numpy(shard.y)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        loss_fn = torch.nn.CrossEntropyLoss()
        model.train()
        for _ in range(EPOCHS):
            for idx in torch.randperm(len(y)).split(BATCH):
                opt.zero_grad()
                loss_fn(model(x[idx]), y[idx]).backward()
                opt.step()
        reply = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                            "metrics": MetricRecord({"num-examples": len(y)})})
        return Message(reply, reply_to=msg)

    server = ServerApp()
    marks: list[float] = []

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        fed = data()
        model = build_model("cnn", fed.input_shape, fed.num_classes)
        xt, yt = torch.from_numpy(fed.test.x), torch.from_numpy(fed.test.y)

        def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            model.load_state_dict(arrays.to_torch_state_dict())
            scores = evaluate_task(DigitsTask(), model, xt, yt)
            loss, acc = scores["loss"], scores["accuracy"]
            marks.append(time.perf_counter())
            return MetricRecord({"accuracy": acc, "loss": loss})

        strategy = FedAvg(fraction_train=per_round / num_clients, fraction_evaluate=0.0,
                          min_train_nodes=per_round, min_available_nodes=num_clients)
        strategy.start(grid, ArrayRecord(model.state_dict()), num_rounds=rounds,
                       train_config=ConfigRecord(), evaluate_fn=central)

    run_simulation(server_app=server, client_app=client, num_supernodes=num_clients,
                   backend_config={"client_resources": {"num_cpus": 1.0, "num_gpus": 0.0},
                                   "init_args": {"logging_level": logging.ERROR}})
    return [m - marks[0] for m in marks[1:]]  # marks[0] is the round-0 evaluation


def run_ours(rounds: int, out: Path) -> float:
    """``fleetfl simulate`` on an always-on fleet; returns trainings/s over rounds 2..R."""
    _, rows = simulate([*PLAIN, f"federation.rounds={rounds}",
                        f"federation.num_clients={NUM_CLIENTS}",
                        f"federation.clients_per_round={PER_ROUND}",
                        f"federation.local_epochs={EPOCHS}", f"federation.batch_size={BATCH}",
                        f"federation.lr={LR}", "fleet.mix={rpi5=1}", "output.plot=false"], out)
    # Count the trainings that really ran: a device may be offline in some round.
    trainings = sum(r["received"] + r["failed"] for r in rows[1:])
    return trainings / (rows[-1]["wall_time_s"] - rows[0]["wall_time_s"])


def throughput(marks: list[float]) -> float:
    """Client trainings per second over rounds 2..R (plain Flower: always PER_ROUND)."""
    return PER_ROUND * (len(marks) - 1) / (marks[-1] - marks[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", choices=["flower"], help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, default=NUM_CLIENTS, help=argparse.SUPPRESS)
    parser.add_argument("--per-round", type=int, default=PER_ROUND, help=argparse.SUPPRESS)
    parser.add_argument("--partitions", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/overhead"))
    args = parser.parse_args()
    if args.one == "flower":
        print(json.dumps(run_flower(args.rounds, args.clients, args.per_round,
                                    args.partitions)))
        return
    runs: dict[str, list[float]] = {"flower": [], "fleetfl": []}
    order: list[str] = []
    for rep in range(args.repeats):
        # A/B, then B/A: whichever runs second inherits a warmer (or hotter) machine.
        for stack in ("flower", "fleetfl") if rep % 2 == 0 else ("fleetfl", "flower"):
            order.append(stack)
            if stack == "flower":
                proc = subprocess.run([sys.executable, "-m", "benchmarks.flower_overhead",
                                       "--one", "flower", "--rounds", str(args.rounds)],
                                      capture_output=True, text=True, check=True)
                marks = json.loads(proc.stdout.strip().splitlines()[-1])
                runs["flower"].append(throughput(marks))
            else:
                runs["fleetfl"].append(run_ours(args.rounds, args.out / f"rep{rep}"))
    med = {k: statistics.median(v) for k, v in runs.items()}
    emit("flower_overhead", {
        "rounds": args.rounds, "repeats": args.repeats, "order": order, "clients": NUM_CLIENTS,
        "clients_per_round": PER_ROUND, "trainings_per_s": runs,
        "median_trainings_per_s": med,
        "fleetfl_slowdown_vs_flower": 1.0 - med["fleetfl"] / med["flower"],
    })


if __name__ == "__main__":
    main()
