"""The sections of the run configuration: one frozen dataclass per TOML table, each with
``check()``. Field names are the TOML keys; ``_f`` gives each its default and the one-line help
``fleetfl simulate --help`` prints. Parsing, overrides and cross-section checks live in
:mod:`fleetfl.coordinator.config`, which re-exports these names.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetfl.compression.masks import pruning_schedule
from fleetfl.devices.fleet import DEFAULT_MIX, parse_mix
from fleetfl.devices.memory_planner import DEFAULT_RUNTIME_BYTES, MIB
from fleetfl.tasks.registry import TaskError, resolve_task
from fleetfl.tasks.task import Task

STRATEGY_NAMES = ("fedavg", "fedprox")


class ConfigError(ValueError):
    """A configuration problem; the message starts with the offending ``section.key``."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"config key '{key}': {problem}")
        self.key, self.problem = key, problem


def _f(default: Any, help: str) -> Any:  # noqa: A002 - mirrors argparse's name
    """A dataclass field with a default and a one-line ``help`` shown by ``--help``."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TaskConfig:
    """What is learned: a built-in task or the user's own (``fleetfl.Task``)."""

    name: str = _f("digits", "'digits', 'synthetic' or 'package.module:attribute' (a "
                             "fleetfl.Task subclass, instance or factory)")
    params: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "keyword arguments of the task, a table: digits {model, partition_alpha, iid}, "
                "synthetic {alpha, beta, iid, model}"})
    seed: int = _f(0, "seed of data generation, partitioning and model initialization")

    def check(self) -> None:
        _at_least("task.seed", self.seed, 0)
        self.build()  # the task must resolve now, not after an engine started

    def build(self) -> Task:
        """The task object (imports a user's module; raises ConfigError naming the key)."""
        try:
            return resolve_task(self.name, self.params)
        except TaskError as err:
            raise ConfigError(err.key, str(err)) from None


MAX_CLIENTS = 1_000_000  # simulated clients: each has a device profile and a data split
MAX_LR = 100.0
ENGINES = ("local", "ray")  # and "auto", resolved to one of them


@dataclass(frozen=True)
class FederationConfig:
    """How many clients, rounds and local work; where the simulation runs."""

    num_clients: int = _f(20, "clients in the fleet (synthetic: number of users)")
    clients_per_round: int = _f(10, "clients sampled per round among those available")
    data_partitions: int = _f(0, "simulation: the data is split into this many partitions and "
                                 "client i trains on partition i mod P, for populations larger "
                                 "than the data can be split into (0: one per client)")
    rounds: int = _f(30, "communication rounds")
    local_epochs: int = _f(2, "local epochs E of a full (non-straggler) work plan")
    batch_size: int = _f(10, "local mini-batch size")
    lr: float = _f(0.1, "local SGD learning rate")
    engine: str = _f("auto", "simulation engine: 'local' (worker processes on this machine, no "
                             "Ray), 'ray' (Flower's Ray engine, also on a cluster), 'auto' "
                             "(ray when federation.ray_address is set, else local)")
    workers: int = _f(0, "local engine: worker processes, each serving many clients (0: one "
                         "per CPU core)")
    ray_address: str = _f("", "'' starts a local Ray; 'auto' or 'HOST:PORT' joins a cluster")
    client_cpus: float = _f(1.0, "CPUs per simulated client: Ray's reservation, and the "
                                 "torch/BLAS threads of each worker (both engines)")
    round_timeout_s: float = _f(600.0, "wall seconds to wait for a round's replies")
    evaluate_every: int = _f(0, "federated evaluation every N rounds: the round's cohort "
                                "evaluates the global model on its local test splits (0: never)")
    max_examples_per_client: int = _f(1_000_000, "a client's claimed example count is capped "
                                                 "here (it weights the client's update)")
    min_clients: int = _f(0, "a round starts only when this many devices are registered "
                             "(the coordinator waits, logging it; 0: 2 with secure "
                             "aggregation, else 1)")
    round_wait_s: float = _f(600.0, "wall seconds a round waits for federation.min_clients "
                                    "devices before the run stops with an error")

    def __post_init__(self) -> None:
        # Resolved here so that summary.json records the engine that ran.
        if self.engine == "auto":
            object.__setattr__(self, "engine", "ray" if self.ray_address else "local")

    @property
    def partitions(self) -> int:
        """Data partitions of a simulation: ``data_partitions``, or one per client."""
        return self.data_partitions or self.num_clients

    def check(self) -> None:
        _positive("federation.num_clients", self.num_clients)
        if self.num_clients > MAX_CLIENTS:
            raise ConfigError("federation.num_clients", f"{self.num_clients} is more than "
                                                        f"fleetfl simulates ({MAX_CLIENTS})")
        _positive("federation.clients_per_round", self.clients_per_round)
        if self.clients_per_round > self.num_clients:
            raise ConfigError(
                "federation.clients_per_round",
                f"{self.clients_per_round} exceeds federation.num_clients={self.num_clients}",
            )
        _at_least("federation.data_partitions", self.data_partitions, 0)
        if self.data_partitions > self.num_clients:
            raise ConfigError("federation.data_partitions", f"{self.data_partitions} exceeds "
                                                            f"federation.num_clients="
                                                            f"{self.num_clients}")
        _positive("federation.rounds", self.rounds)
        _positive("federation.local_epochs", self.local_epochs)
        _positive("federation.batch_size", self.batch_size)
        _positive("federation.lr", self.lr)
        if self.lr > MAX_LR:
            raise ConfigError("federation.lr", f"{self.lr} would diverge at once "
                                               f"(at most {MAX_LR:g})")
        if self.engine not in ENGINES:
            raise ConfigError("federation.engine", f"{self.engine!r} is not one of 'auto', "
                                                   f"{', '.join(map(repr, ENGINES))}")
        if self.engine == "local" and self.ray_address:
            raise ConfigError("federation.engine", "the local engine runs on this machine; "
                                                   "to join the Ray cluster at "
                                                   "federation.ray_address set engine = 'ray'")
        _at_least("federation.workers", self.workers, 0)
        _positive("federation.client_cpus", self.client_cpus)
        _positive("federation.round_timeout_s", self.round_timeout_s)
        _at_least("federation.evaluate_every", self.evaluate_every, 0)
        _positive("federation.max_examples_per_client", self.max_examples_per_client)
        _at_least("federation.min_clients", self.min_clients, 0)
        if self.min_clients > self.num_clients:
            raise ConfigError("federation.min_clients", f"{self.min_clients} exceeds "
                                                        f"federation.num_clients="
                                                        f"{self.num_clients}")
        _positive("federation.round_wait_s", self.round_wait_s)


@dataclass(frozen=True)
class StrategyConfig:
    """The aggregation algorithm: FedAvg or FedProx with proximal weight ``mu``."""

    name: str = _f("fedprox", "'fedprox' or 'fedavg' (plain local SGD: mu is 0)")
    mu: float = _f(0.01, "FedProx proximal weight: loss + mu/2 * ||w - w_t||^2 (0 with fedavg)")
    server_optimizer: str = _f("none", "'none', 'fedavgm', 'fedadam' or 'fedyogi': the server "
                                       "step on the round's combined update (Reddi et al. 2021)")
    server_lr: float = _f(0.0, "server learning rate eta (0: the optimizer's default: 1.0 "
                               "fedavgm, 0.1 fedadam, 0.01 fedyogi)")
    server_momentum: float = _f(0.9, "fedavgm: momentum beta")

    def __post_init__(self) -> None:
        # FedAvg is FedProx with mu = 0; resolve it here so summary.json shows what ran.
        if self.name == "fedavg":
            object.__setattr__(self, "mu", 0.0)

    def check(self) -> None:
        _choice("strategy.name", self.name, STRATEGY_NAMES)
        _at_least("strategy.mu", self.mu, 0.0)
        from fleetfl.aggregation.server_opt import RULES

        _choice("strategy.server_optimizer", self.server_optimizer, RULES)
        if not 0 <= self.server_lr <= MAX_LR:
            raise ConfigError("strategy.server_lr", f"must be in [0, {MAX_LR:g}], got "
                                                    f"{self.server_lr}")
        if not 0 <= self.server_momentum < 1:
            raise ConfigError("strategy.server_momentum", f"must be in [0, 1), got "
                                                          f"{self.server_momentum}")


@dataclass(frozen=True)
class FleetConfig:
    """The simulated devices: profile mix, stragglers, round deadline."""

    mix: Mapping[str, float] = field(
        default_factory=lambda: dict(DEFAULT_MIX),
        metadata={"help": "device profiles and their weights, e.g. {rpi4 = 1, phone-mid = 2}"},
    )
    stragglers: float = _f(0.0, "fraction of each round's cohort that does only part of the work")
    drop_stragglers: bool = _f(
        False, "discard stragglers' partial work (FedAvg's behaviour in the FedProx paper)"
    )
    deadline_s: float = _f(0.0, "simulated seconds per round; 0 = no deadline")
    seed: int = _f(0, "seed of device assignment, availability and straggler draws")
    memory_budget_fraction: float = _f(
        0.0, "share of each device's RAM its client process may use; 0 = the profile's own "
        "budget (50 % of RAM on boards, 25 % on phones)")
    runtime_memory_mib: float = _f(
        DEFAULT_RUNTIME_BYTES / MIB, "MiB a client process holds before training (Python, "
        "torch, Flower, model, data), reserved in every memory plan; a real device measures "
        "its own")
    runtimes: Mapping[str, str] = field(
        default_factory=dict,
        metadata={"help": "training runtime per device profile, e.g. {phone-mid = "
                          "\"executorch\"} (what phones run; needs fleetfl[executorch]); "
                          "unlisted profiles train in torch"},
    )
    capacity_trace: str = _f("", "simulation: a FedScale device capacity trace (pickle or "
                                 "JSON: ms per sample, kbit/s); client i takes entry i mod T")
    availability_trace: str = _f("", "simulation: a FedScale availability trace (active "
                                     "windows, repeating); replaces the profiles' availability")

    def check(self) -> None:
        _check_runtimes(self.runtimes)
        for key, kind in (("capacity_trace", "capacity"), ("availability_trace", "availability")):
            path = getattr(self, key)
            if path:
                from fleetfl.devices.traces import TraceError, load

                try:
                    load(kind, path)
                except TraceError as err:
                    raise ConfigError(f"fleet.{key}", str(err)) from None
        try:
            parse_mix(self.mix)
        except ValueError as err:
            raise ConfigError("fleet.mix", str(err)) from None
        if not 0.0 <= self.stragglers <= 1.0:
            raise ConfigError("fleet.stragglers", f"must be in [0, 1], got {self.stragglers}")
        _at_least("fleet.deadline_s", self.deadline_s, 0.0)
        if not 0.0 <= self.memory_budget_fraction <= 1.0:
            raise ConfigError("fleet.memory_budget_fraction",
                              f"must be in [0, 1], got {self.memory_budget_fraction}")
        _at_least("fleet.runtime_memory_mib", self.runtime_memory_mib, 0.0)
        _at_least("fleet.seed", self.seed, 0)

    @property
    def runtime_memory_bytes(self) -> int:
        """``runtime_memory_mib`` in bytes."""
        return round(self.runtime_memory_mib * MIB)


def _check_runtimes(runtimes: Mapping[str, str]) -> None:
    from fleetfl.client.programs import EXECUTORCH, RUNTIMES
    from fleetfl.devices.profiles import get_profile

    if not isinstance(runtimes, Mapping):
        raise ConfigError("fleet.runtimes", "must be a table {profile = runtime}")
    for profile, runtime in runtimes.items():
        try:
            get_profile(profile)
        except (KeyError, ValueError) as err:
            raise ConfigError("fleet.runtimes", str(err).strip("'\"")) from None
        if runtime not in RUNTIMES:
            raise ConfigError("fleet.runtimes", f"{profile} = {runtime!r}: valid runtimes are "
                                                f"{', '.join(RUNTIMES)}")
    if EXECUTORCH in runtimes.values():
        from fleetfl.client.executorch_api import ExecuTorchMissing, require

        try:
            require()
        except ExecuTorchMissing as err:
            raise ConfigError("fleet.runtimes", str(err)) from None


@dataclass(frozen=True)
class CompressionConfig:
    """Pruning, int8 update transport, downlink precision and quantization-aware training."""

    prune_final_sparsity: float = _f(0.8, "fraction of prunable weights pruned at the end "
                                          "(0-1; 0: no pruning)")
    prune_start_round: int = _f(0, "first round of the cubic pruning schedule (0: min(10, "
                                   "ceil(rounds/3)))")
    prune_end_round: int = _f(0, "round at which prune_final_sparsity is reached (0: "
                                 "min(30, rounds))")
    update_bits: int = _f(8, "uplink update precision: 8 (int8, shared clip) or 32 (float32)")
    downlink_bits: int = _f(8, "global model precision on the downlink: 8, 16 or 32")
    error_feedback: bool = _f(True, "clients re-send int8 rounding/clipping error next round")
    qat: bool = _f(False, "fake-quant (per-channel int8 weights) during local training")
    entropy_coding: bool = _f(True, "zlib the update and model blobs (lossless)")
    initial_clip: float = _f(0.05, "shared int8 clip range of round 1; adapted every round")
    clip_target: float = _f(1e-3, "fraction of update values the adapted clip range may clip")

    def check(self) -> None:
        if not 0.0 <= self.prune_final_sparsity < 1.0:
            raise ConfigError("compression.prune_final_sparsity",
                              f"must be in [0, 1), got {self.prune_final_sparsity}")
        _at_least("compression.prune_start_round", self.prune_start_round, 0)
        _at_least("compression.prune_end_round", self.prune_end_round, 0)
        if 0 < self.prune_end_round < self.prune_start_round:
            raise ConfigError("compression.prune_end_round",
                              f"{self.prune_end_round} is before prune_start_round "
                              f"{self.prune_start_round}")
        _choice("compression.update_bits", str(self.update_bits), ("8", "32"))
        _choice("compression.downlink_bits", str(self.downlink_bits), ("8", "16", "32"))
        if not 1e-6 <= self.initial_clip <= 1e3:
            raise ConfigError("compression.initial_clip", f"must be in [1e-6, 1e3], got "
                              f"{self.initial_clip}")
        if not 0.0 < self.clip_target < 1.0:
            raise ConfigError("compression.clip_target", f"must be in (0, 1), got "
                              f"{self.clip_target}")

    def pruning_rounds(self, num_rounds: int) -> tuple[int, int]:
        """(start, end) rounds of the cubic schedule, 0s resolved for a run of ``num_rounds``."""
        return pruning_schedule(num_rounds, self.prune_start_round, self.prune_end_round)


@dataclass(frozen=True)
class SecAggConfig:
    """Secure aggregation (SecAgg+): the coordinator learns only the cohort's sum."""

    enabled: bool = _f(True, "SecAgg+ over the int8 updates (needs compression.update_bits = 8 "
                             "and 2+ clients per round)")
    num_neighbours: int = _f(0, "k, each client's neighbours in the masking graph (0: derived "
                                "from the cohort size and the fractions below)")
    threshold: int = _f(0, "t, Shamir shares needed to unmask a client (0: derived)")
    corrupt_fraction: float = _f(0.1, "fraction of the cohort that may collude with the "
                                      "coordinator and still not learn one client's update")
    dropout_fraction: float = _f(0.3, "fraction of the cohort that may drop out mid-round and "
                                      "the round still completes")
    keys_ahead: bool = _f(True, "clients advertise their next round's keys on their training "
                                "reply, so a returning client skips the advertise exchange")

    def check(self) -> None:
        _at_least("secagg.num_neighbours", self.num_neighbours, 0)
        _at_least("secagg.threshold", self.threshold, 0)
        for key in ("corrupt_fraction", "dropout_fraction"):
            value = getattr(self, key)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"secagg.{key}", f"must be in [0, 1), got {value}")


ROBUST_RULES = ("mean", "trimmed_mean", "median")


@dataclass(frozen=True)
class AggregationConfig:
    """How the coordinator combines the updates it can read (aggregation/robust.py)."""

    clip_norm: float = _f(0.0, "clients clip their update to this L2 norm before sending it, "
                               "and the coordinator scales down any readable update above it "
                               "(0: off)")
    norm_bound_ratio: float = _f(3.0, "the coordinator scales a readable update down to this "
                                       "multiple of the round's median update norm (0: off)")
    robust: str = _f("mean", "'mean' (weighted by examples), 'trimmed_mean' or 'median' "
                             "(coordinate-wise, unweighted; not with secure aggregation)")
    trim_fraction: float = _f(0.1, "trimmed_mean: fraction of largest and of smallest values "
                                   "dropped per coordinate")

    def check(self) -> None:
        if not (math.isfinite(self.clip_norm) and self.clip_norm >= 0):
            raise ConfigError("aggregation.clip_norm", f"must be >= 0, got {self.clip_norm}")
        if not (self.norm_bound_ratio == 0 or 1 <= self.norm_bound_ratio < math.inf):
            raise ConfigError("aggregation.norm_bound_ratio",
                              f"must be 0 (off) or >= 1, got {self.norm_bound_ratio}")
        _choice("aggregation.robust", self.robust, ROBUST_RULES)
        if not 0 <= self.trim_fraction < 0.5:
            raise ConfigError("aggregation.trim_fraction",
                              f"must be in [0, 0.5), got {self.trim_fraction}")


@dataclass(frozen=True)
class OutputConfig:
    """Where results go and how progress is shown."""

    dir: str = _f("runs/latest", "output directory (--out overrides)")
    progress: bool = _f(True, "a progress bar on the terminal")
    plot: bool = _f(True, "write report.png")

    def check(self) -> None:
        if not self.dir:
            raise ConfigError("output.dir", "must not be empty")
        if Path(self.dir).expanduser().exists() and not Path(self.dir).expanduser().is_dir():
            raise ConfigError("output.dir", f"{self.dir} exists and is not a directory")


def _choice(key: str, value: str, valid: Iterable[str]) -> None:
    valid = tuple(valid)
    if value not in valid:
        raise ConfigError(key, f"{value!r} is not one of {', '.join(map(repr, valid))}")


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(key, f"must be > 0, got {value}")


def _at_least(key: str, value: float, low: float) -> None:
    if not value >= low:
        raise ConfigError(key, f"must be >= {low}, got {value}")
