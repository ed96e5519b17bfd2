"""``fleetfl simulate``: run the fleet on the configured engine and write results.

The ServerApp runs in this process. ``federation.engine = "local"``: its Grid hands each
message to a pool of worker processes running the ClientApp
(:mod:`fleetfl.coordinator.local_engine`); ``"ray"``: Flower's simulation engine runs the
ServerApp in a thread and each simulated client is a virtual SuperNode whose ClientApp executes
in a Ray actor. Outputs, in ``config.output.dir``:
``metrics.jsonl`` (one object per round, written as rounds finish), ``summary.json`` and
``report.png``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flwr.serverapp import ServerApp
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fleetfl.client.daemon import THREAD_VARS
from fleetfl.client.state_store import ENV as STATE_ENV
from fleetfl.coordinator.config import Config
from fleetfl.coordinator.preflight import preflight
from fleetfl.coordinator.report import append_row, build_summary, plot_report, write_summary
from fleetfl.coordinator.savings import savings_rows
from fleetfl.coordinator.server_app import RunOutcome, make_server_app


def worker_thread_env(config: Config) -> dict[str, str]:
    """BLAS/OpenMP thread counts for the Ray workers: the CPUs reserved for one client (at
    least 1). Each worker's BLAS would otherwise start a thread per core: with the ServerApp
    and N workers on a few cores, OpenBLAS threads spin against each other (a synthetic-data
    run stalled > 10 min in numpy's multivariate_normal; with OPENBLAS_NUM_THREADS=1 it ran)."""
    threads = str(max(1, math.floor(config.federation.client_cpus)))
    return dict.fromkeys(THREAD_VARS, threads)


def backend_config(config: Config, verbose: bool = False) -> dict[str, Any]:
    """Flower's Ray backend settings: CPUs per client, and the cluster to join if any."""
    init_args: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": verbose}
    if config.federation.ray_address:
        init_args["address"] = config.federation.ray_address
    return {
        "client_resources": {"num_cpus": config.federation.client_cpus, "num_gpus": 0.0},
        "init_args": init_args,
    }


def _quiet_flower(verbose: bool) -> None:
    """Flower logs every round at INFO; the progress bar replaces that unless verbose.

    Client failures still surface: Flower returns them as error replies, which the strategy
    logs through ``fleetfl.*`` loggers.
    """
    logging.getLogger("flwr").setLevel(logging.INFO if verbose else logging.ERROR)
    # Ray warns about accelerator env vars on CPU-only runs; we reserve no GPUs on purpose.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def simulate(config: Config, *, verbose: bool = False, console: Console | None = None) -> dict:
    """Run the configured simulation; return the summary (also written to the output dir)."""
    preflight(config)  # a feature that cannot apply to the model: an error before Ray starts
    console = console or Console(stderr=True)
    out = Path(config.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    metrics_path.write_text("", encoding="utf-8")
    _quiet_flower(verbose)
    # Ray's workers inherit this process's environment (Flower passes its own runtime_env to
    # ray.init, so ours cannot go there); a value the user set wins. A cluster joined with
    # federation.ray_address keeps its nodes' own environment.
    for var, value in worker_thread_env(config).items():
        os.environ.setdefault(var, value)
    with _client_state_dir():
        return _run(config, out, metrics_path, verbose, console)


@contextlib.contextmanager
def _client_state_dir() -> Iterator[None]:
    """A fresh directory for the simulated clients' state (:mod:`fleetfl.client.state_store`)
    while the run lasts, unless the user named one (a shared directory on a cluster)."""
    if os.environ.get(STATE_ENV):
        yield
        return
    with tempfile.TemporaryDirectory(prefix="fleetfl-client-state-") as tmp:
        os.environ[STATE_ENV] = tmp
        try:
            yield
        finally:
            os.environ.pop(STATE_ENV, None)


def _run(config: Config, out: Path, metrics_path: Path, verbose: bool,
         console: Console) -> dict:
    """The body of :func:`simulate`, once the environment is set."""
    outcome = RunOutcome()
    started = time.perf_counter()
    progress = Progress(
        TextColumn("[bold]rounds"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.description}"), console=console, disable=not config.output.progress,
    )
    with progress, _one_driver_thread():
        bar = progress.add_task(f"starting the {config.federation.engine} engine…",
                                total=config.federation.rounds)

        def on_round(row: dict[str, Any]) -> None:
            append_row(metrics_path, row)
            progress.update(bar, advance=1, description=(
                f"acc {row['accuracy']:.3f}  loss {row['loss']:.3f}  "
                f"clients {row['aggregated']}/{row['selected']}"))

        server_app = make_server_app(config, on_round=on_round, outcome=outcome,
                                     checkpoint_path=out / "model.pt")
        _run_engine(config, server_app, verbose)
    if outcome.clients_total == 0:
        raise RuntimeError("no simulated client registered, so nothing was trained; the "
                           "warnings above give each client's error")
    if len(outcome.rows) < config.federation.rounds:
        raise RuntimeError(
            f"the simulation stopped after {len(outcome.rows)} of {config.federation.rounds} "
            "rounds; see the log above for the cause"
        )
    summary = build_summary(outcome.rows, config=config.to_dict(),
                            clients_total=outcome.clients_total,
                            wall_time_s=time.perf_counter() - started, initial=outcome.initial)
    write_summary(out / "summary.json", summary)
    if config.output.plot:
        params = ", ".join(f"{k}={v}" for k, v in config.task.params.items())
        title = (f"{config.strategy.name} mu={config.strategy.mu} on {config.task.name}"
                 f"{f'({params})' if params else ''}, {config.federation.num_clients} clients")
        plot_report(out / "report.png", outcome.rows, title)
    return summary


CLIENT_APP = "fleetfl.client.app:app"
# What its train handler imports on first use: loaded while the workers start, not in round 1.
CLIENT_PRELOAD = ("torch", "fleetfl.client.training")


def local_workers(config: Config) -> int:
    """The local engine's worker processes: ``federation.workers``, or one per CPU core this
    process may use."""
    return config.federation.workers or max(1, len(os.sched_getaffinity(0)))


def _run_engine(config: Config, server_app: ServerApp, verbose: bool) -> None:
    """Run ``server_app`` over the simulated fleet on the configured engine."""
    fed = config.federation
    if fed.engine == "local":
        from fleetfl.coordinator.local_engine import run_local

        run_local(server_app, CLIENT_APP, fed.num_clients, local_workers(config),
                  threads=max(1, math.floor(fed.client_cpus)), preload=CLIENT_PRELOAD)
        return
    from flwr.simulation import run_simulation

    from fleetfl.client.app import app as client_app

    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=fed.num_clients,
        backend_config=backend_config(config, verbose),  # type: ignore[arg-type]
        verbose_logging=verbose,
    )


@contextlib.contextmanager
def _one_driver_thread() -> Iterator[None]:
    """One BLAS/OpenMP and one torch thread in this process while the simulation runs (the
    ServerApp's numpy and central evaluation share the cores with the Ray workers); the
    caller's settings come back afterwards."""
    import torch
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(threads)


def summary_table(summary: dict[str, Any], out_dir: str) -> Table:
    """The table printed at the end of a run."""
    table = Table(title=f"fleetfl simulate → {out_dir}", show_header=False)
    fmt = {
        "rounds": "{:d}", "final_accuracy": "{:.4f}", "final_loss": "{:.4f}",
        "best_accuracy": "{:.4f}", "clients_total": "{:d}", "client_rounds": "{:d}",
        "stragglers_total": "{:d}", "dropped_stragglers_total": "{:d}",
        "rejected_total": "{:d}", "failed_total": "{:d}",
        "uplink_bytes_total": "{:,d} B", "downlink_bytes_total": "{:,d} B",
        "uplink_bytes_per_client_round": "{:,.0f} B", "compression_ratio_uplink": "{:.1f}x",
        "final_sparsity": "{:.2f}", "simulated_time_s": "{:,.1f} s",
        "wall_time_s": "{:,.1f} s",
    }
    for key, pattern in fmt.items():
        table.add_row(key, pattern.format(summary[key]))
    table.add_section()
    for feature, text in savings_rows(summary):
        table.add_row(feature, text)
    return table
