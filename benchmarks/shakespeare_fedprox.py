"""The FedProx paper's Shakespeare setting (Li et al. 2020, Fig. 1), scaled to 2 CPU cores.

Paper: LEAF Shakespeare (143 devices, 2 x LSTM 256), 10 devices per round, E = 20 local epochs,
batch 10, lr 0.8, mu = 0.001, 40 rounds; 0 % and 90 % of each round's devices are stragglers
that run a uniform number of epochs in [1, E). Here: 143 clients drawn from fleetfl's
``shakespeare`` task, the ``small`` model (1 x LSTM 128) and at most ``--max-samples``
training windows per client (the paper's devices hold 3,616 on average), fewer rounds.
Methods: FedAvg (stragglers dropped), FedProx mu = 0 (partial work kept), FedProx mu = 0.001.

    python -m benchmarks.shakespeare_fedprox [--rounds 20] [--max-samples 100]

Prints JSON with the test accuracy per round per (stragglers, method); writes
``benchmarks/results/shakespeare_fedprox.png``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.common import PLAIN, RESULTS, emit, simulate

METHODS = {
    "FedAvg": ["strategy.name=fedavg", "fleet.drop_stragglers=true"],
    "FedProx mu=0": ["strategy.name=fedprox", "strategy.mu=0.0"],
    "FedProx mu=0.001": ["strategy.name=fedprox", "strategy.mu=0.001"],
}
# At 0 % stragglers FedAvg and FedProx mu=0 are the same algorithm: one run stands for both.
RUNS = [(0.9, "FedAvg"), (0.9, "FedProx mu=0"), (0.9, "FedProx mu=0.001"),
        (0.0, "FedProx mu=0"), (0.0, "FedProx mu=0.001")]


def base(rounds: int, max_samples: int, seed: int) -> list[str]:
    return [
        *PLAIN,
        "task.name=shakespeare", "task.params.model=small",
        f"task.params.max_samples={max_samples}", f"task.seed={seed}",
        "federation.num_clients=143", "federation.clients_per_round=10",
        f"federation.rounds={rounds}", "federation.local_epochs=20", "federation.batch_size=10",
        "federation.lr=0.8", f"fleet.seed={seed}", "fleet.mix={rpi4=1}", "output.plot=false",
    ]


def plot(curves: dict[str, dict[str, list[dict]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(11, 4), constrained_layout=True)
    for ax, (frac, runs) in zip(axes, curves.items(), strict=True):
        for method, rows in runs.items():
            ax.plot([r["round"] for r in rows], [r["accuracy"] for r in rows], label=method)
        ax.set(title=f"{frac} stragglers", xlabel="round", ylabel="test accuracy")
        ax.legend()
    fig.suptitle("Shakespeare (small LSTM, 143 clients): FedAvg vs FedProx (fleetfl)")
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--max-samples", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/shakespeare"))
    args = parser.parse_args()
    table, curves = [], {"90%": {}, "0%": {}}
    for frac, method in RUNS:
        out = args.out / f"s{int(frac * 100)}-{method.replace(' ', '').replace('=', '')}"
        summary, rows = simulate(base(args.rounds, args.max_samples, args.seed)
                                 + METHODS[method] + [f"fleet.stragglers={frac}"], out)
        curves[f"{frac:.0%}"][method] = rows
        table.append({
            "stragglers": frac, "method": method,
            "accuracy_per_round": [round(r["accuracy"], 4) for r in rows],
            "final_accuracy": summary["final_accuracy"],
            "best_accuracy": summary["best_accuracy"],
            "final_train_loss": summary["final_train_loss"],
            "dropped_stragglers": summary["dropped_stragglers_total"],
            "wall_time_s": summary["wall_time_s"],
        })
        # Rewritten after every run: a partial sweep still leaves its measured rows.
        emit("shakespeare_fedprox", {"rounds": args.rounds, "max_samples": args.max_samples,
                                     "seed": args.seed, "runs": table})
    plot(curves, RESULTS / "shakespeare_fedprox.png")


if __name__ == "__main__":
    main()
