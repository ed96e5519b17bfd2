"""The FedProx paper's systems-heterogeneity experiment (Li et al. 2020, Fig. 1) on Synthetic(1,1).

30 devices, 10 per round, E = 20 local epochs, batch 10, lr 0.01; 0 %, 50 % and 90 % of each
round's devices are stragglers that run a uniform number of epochs in [1, E). Three methods:
FedAvg (stragglers dropped, mu = 0), FedProx mu = 0 (partial work kept), FedProx mu = 1.

    python -m benchmarks.fedprox_stragglers [--rounds 200] [--out runs/bench/fedprox]

Prints JSON with final/best test accuracy and final training loss per (stragglers, method), and
writes ``benchmarks/results/fedprox_stragglers.png`` (training loss and test accuracy per round).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.common import PLAIN, RESULTS, emit, simulate

METHODS = {
    "FedAvg": ["strategy.name=fedavg", "fleet.drop_stragglers=true"],
    "FedProx mu=0": ["strategy.name=fedprox", "strategy.mu=0.0"],
    "FedProx mu=1": ["strategy.name=fedprox", "strategy.mu=1.0"],
}
STRAGGLERS = (0.0, 0.5, 0.9)


def base(rounds: int, seed: int) -> list[str]:
    return [
        *PLAIN,
        "task.dataset=synthetic", "task.model=logreg", "task.alpha=1.0", "task.beta=1.0",
        f"task.seed={seed}", "federation.num_clients=30", "federation.clients_per_round=10",
        f"federation.rounds={rounds}", "federation.local_epochs=20", "federation.batch_size=10",
        "federation.lr=0.01", f"fleet.seed={seed}", "fleet.mix={rpi4=1}", "output.plot=false",
    ]


def plot(curves: dict[str, dict[str, list[dict]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(STRAGGLERS), figsize=(13, 7), constrained_layout=True)
    for col, frac in enumerate(STRAGGLERS):
        for method, rows in curves[f"{frac:.0%}"].items():
            rounds = [r["round"] for r in rows]
            axes[0, col].plot(rounds, [r["train_loss"] for r in rows], label=method)
            axes[1, col].plot(rounds, [r["accuracy"] for r in rows], label=method)
        axes[0, col].set(title=f"{frac:.0%} stragglers", ylabel="training loss", yscale="log")
        axes[1, col].set(xlabel="round", ylabel="test accuracy", ylim=(0, 1))
        axes[0, col].legend()
    fig.suptitle("Synthetic(1,1): FedAvg vs FedProx under systems heterogeneity (fleetfl)")
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/fedprox"))
    args = parser.parse_args()
    table, curves = [], {f"{frac:.0%}": {} for frac in STRAGGLERS}
    # Most telling setting first; the JSON is rewritten after every run, so a partial sweep
    # still leaves its measured rows behind.
    for frac in sorted(STRAGGLERS, reverse=True):
        for method, overrides in METHODS.items():
            out = args.out / f"s{int(frac * 100)}-{method.replace(' ', '').replace('=', '')}"
            summary, rows = simulate(base(args.rounds, args.seed) + overrides
                                     + [f"fleet.stragglers={frac}"], out)
            curves[f"{frac:.0%}"][method] = rows
            tail = rows[-10:]
            table.append({
                "stragglers": frac, "method": method,
                "final_accuracy": summary["final_accuracy"],
                "best_accuracy": summary["best_accuracy"],
                "mean_accuracy_last10": sum(r["accuracy"] for r in tail) / len(tail),
                "final_train_loss": summary["final_train_loss"],
                "mean_train_loss_last10": sum(r["train_loss"] for r in tail) / len(tail),
                "dropped_stragglers": summary["dropped_stragglers_total"],
                "failed": summary["failed_total"],
                "wall_time_s": summary["wall_time_s"],
            })
            emit("fedprox_stragglers", {"rounds": args.rounds, "seed": args.seed,
                                        "complete": False, "results": table})
    plot(curves, RESULTS / "fedprox_stragglers.png")
    emit("fedprox_stragglers", {"rounds": args.rounds, "seed": args.seed, "complete": True,
                                "results": table})


if __name__ == "__main__":
    main()
