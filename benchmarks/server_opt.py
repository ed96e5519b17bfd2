"""FedAdam and FedYogi against FedProx on digits, non-IID: rounds to reach 0.90 accuracy.

Digits CNN, 20 clients with Dirichlet(alpha) label skew (alpha 0.1 and 0.5), 10 per round,
E = 2, batch 10, client lr 0.05, FedProx mu = 0.01 for all three (the server optimizers run on
FedProx's combined update), ``--rounds`` rounds. Server optimizers at Flower's defaults
(fedadam eta 0.1, fedyogi eta 0.01; beta1 0.9, beta2 0.99, tau 1e-3) unless ``--server-lr``.

    python -m benchmarks.server_opt [--rounds 40]

Prints JSON (rounds to 0.90, final and best accuracy per run);
``benchmarks/results/server_opt.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.common import PLAIN, emit, simulate

OPTIMIZERS = ("none", "fedadam", "fedyogi")
ALPHAS = (0.1, 0.5)
TARGET = 0.90


def base(rounds: int, alpha: float) -> list[str]:
    return [*PLAIN, "task.name=digits", "task.params.model=cnn",
            f"task.params.partition_alpha={alpha}",
            "federation.num_clients=20", "federation.clients_per_round=10",
            f"federation.rounds={rounds}", "federation.local_epochs=2", "federation.lr=0.05",
            "strategy.mu=0.01", "fleet.mix={rpi4=1}", "output.plot=false"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--server-lr", type=float, default=0.0)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/server_opt"))
    args = parser.parse_args()
    runs = []
    for alpha in ALPHAS:
        for opt in OPTIMIZERS:
            sets = [*base(args.rounds, alpha), f"strategy.server_optimizer={opt}",
                    f"strategy.server_lr={args.server_lr}"]
            summary, rows = simulate(sets, args.out / f"a{alpha}-{opt}")
            reached = next((r["round"] for r in rows if r["accuracy"] >= TARGET), None)
            runs.append({"alpha": alpha, "server_optimizer": opt, "rounds_to_0.90": reached,
                         "final_accuracy": summary["final_accuracy"],
                         "best_accuracy": summary["best_accuracy"],
                         "wall_time_s": summary["wall_time_s"]})
            emit("server_opt", {"rounds": args.rounds, "target": TARGET,
                                "server_lr": args.server_lr or "defaults", "runs": runs})


if __name__ == "__main__":
    main()
