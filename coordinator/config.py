"""The run configuration: TOML sections, `--set section.key=value` overrides, validation.

Every section is a frozen dataclass whose field names are the TOML keys
(:mod:`fleetfl.coordinator.config_sections`). Parsing is strict: an
unknown section or key, a value of the wrong type, or a value out of range raises
:class:`ConfigError` naming the offending ``section.key``. Nothing is silently coerced except an
int where a float is expected.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_type_hints

from fleetfl.coordinator.config_sections import (
    MAX_CLIENTS,
    MAX_LR,
    ROBUST_RULES,
    STRATEGY_NAMES,
    AggregationConfig,
    CompressionConfig,
    ConfigError,
    FederationConfig,
    FleetConfig,
    OutputConfig,
    SecAggConfig,
    StrategyConfig,
    TaskConfig,
)
from fleetfl.tasks.builtin import BUILTIN_PARAMS

__all__ = [  # the sections are defined in config_sections; users import them from here
    "MAX_CLIENTS", "MAX_LR", "ROBUST_RULES", "STRATEGY_NAMES", "AggregationConfig",
    "CompressionConfig", "Config", "ConfigError", "FederationConfig", "FleetConfig",
    "OutputConfig", "PLAIN_OVERRIDES", "SecAggConfig", "StrategyConfig", "TaskConfig",
    "apply_overrides",
    "describe_keys", "from_dict", "from_run_config", "load_config", "parse_override",
    "to_run_config",
]

# The defaults run the full stack (int8, pruning, SecAgg+). These overrides give the plain path,
# float32 both ways with neither, which tests and benchmarks of one feature start from.
PLAIN_OVERRIDES = ("compression.update_bits=32", "compression.downlink_bits=32",
                   "compression.prune_final_sparsity=0", "secagg.enabled=false")

# The task keys before the Task API still work: ``dataset`` is ``name``, the others are keys of
# ``params``. As before, a key the chosen built-in does not use (alpha on digits) is ignored.
LEGACY_TASK_PARAMS = BUILTIN_PARAMS
_LEGACY_KEYS = ("dataset", "model", "alpha", "beta", "iid", "partition_alpha")


def _legacy_task(values: Mapping[str, Any]) -> dict[str, Any]:
    """``[task]`` with its pre-Task-API keys moved to ``name`` and ``params``."""
    out = {k: v for k, v in values.items() if k not in _LEGACY_KEYS}
    if "dataset" in values:
        if "name" in values and values["name"] != values["dataset"]:
            raise ConfigError("task.dataset", f"the old spelling of task.name, which says "
                                              f"{values['name']!r}; keep one")
        out["name"] = values["dataset"]
    legacy = {k: v for k, v in values.items() if k in _LEGACY_KEYS and k != "dataset"}
    if not legacy:
        return out
    name = out.get("name", TaskConfig.name)
    if name not in LEGACY_TASK_PARAMS:
        key = next(iter(legacy))
        raise ConfigError(f"task.{key}", f"set it as task.params.{key} (a key of [task.params])")
    params = out.get("params", {})
    if not isinstance(params, Mapping):
        return out  # reported by the type check
    merged = {k: v for k, v in legacy.items() if k in LEGACY_TASK_PARAMS[name]}
    for key, value in merged.items():
        if key in params and params[key] != value:
            raise ConfigError(f"task.{key}", f"conflicts with task.params.{key}")
    out["params"] = {**merged, **params}
    return out


@dataclass(frozen=True)
class Config:
    """The whole resolved configuration of a run."""

    task: TaskConfig = field(default_factory=TaskConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Nested plain dict (JSON- and TOML-serializable)."""
        return {
            s.name: {k: _plain(v) for k, v in dataclasses.asdict(getattr(self, s.name)).items()}
            for s in dataclasses.fields(self)
        }


_SECTION_TYPES = get_type_hints(Config)


def _plain(value: Any) -> Any:
    return dict(value) if isinstance(value, Mapping) else value


def _coerce(key: str, value: Any, expected: Any) -> Any:
    """Check ``value`` against the field type ``expected``; int→float is the only coercion."""
    if expected is bool:
        if isinstance(value, bool):
            return value
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif expected is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(key, f"must be finite, got {value}")
            return float(value)
    elif expected is str:
        if isinstance(value, str):
            return value
    elif expected == dict[str, Any]:  # a free table: the task's keyword arguments
        if isinstance(value, Mapping):
            return {str(k): v for k, v in value.items()}
    elif isinstance(value, Mapping):  # Mapping[str, float] or Mapping[str, str]
        item = get_args(expected)[1] if get_args(expected) else float
        return {str(k): _coerce(f"{key}.{k}", v, item) for k, v in value.items()}
    name = getattr(expected, "__name__", None) or "table"
    raise ConfigError(key, f"expected {name}, got {type(value).__name__} {value!r}")


def _build_section(name: str, values: Mapping[str, Any]) -> Any:
    if name == "task":
        values = _legacy_task(values)
    cls = _SECTION_TYPES[name]
    hints = get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            known = ", ".join(hints) or "(none yet)"
            raise ConfigError(f"{name}.{key}", f"unknown key; [{name}] accepts: {known}")
        kwargs[key] = _coerce(f"{name}.{key}", value, hints[key])
    section = cls(**kwargs)
    section.check()
    return section


def from_dict(data: Mapping[str, Any]) -> Config:
    """Build and validate a :class:`Config` from nested ``{section: {key: value}}``."""
    sections = {}
    for name, values in data.items():
        if name not in _SECTION_TYPES:
            raise ConfigError(name, f"unknown section; valid: {', '.join(_SECTION_TYPES)}")
        if not isinstance(values, Mapping):
            raise ConfigError(name, "must be a table ([section])")
        sections[name] = _build_section(name, values)
    config = Config(**sections)
    _check_secagg(config)
    _check_executorch(config)
    return config


def _check_executorch(config: Config) -> None:
    """ExecuTorch's training program has no fake-quant step: QAT needs torch clients."""
    if "executorch" in config.fleet.runtimes.values() and config.compression.qat:
        raise ConfigError("compression.qat", "fake-quant training is not available in the "
                                             "ExecuTorch runtime (fleet.runtimes maps a "
                                             "profile to it); set compression.qat = false")


def _check_secagg(config: Config) -> None:
    """Secure aggregation sums integers: int8 updates, and a (k, t) that exists for the cohort."""
    sec = config.secagg
    if not sec.enabled:
        return
    if config.aggregation.robust != "mean":
        raise ConfigError("aggregation.robust", "secure aggregation (on by default) gives the "
                                                "coordinator only the sum; a coordinate-wise "
                                                "rule needs each update: use 'mean' or set "
                                                "secagg.enabled = false")
    if config.federation.clients_per_round < 2:
        raise ConfigError("federation.clients_per_round", "secure aggregation (on by default) "
                                                          "needs 2 or more clients per round; "
                                                          "or set secagg.enabled = false")
    if config.compression.update_bits != 8:
        raise ConfigError("secagg.enabled", "secure aggregation (on by default) sums int8 "
                                            "updates; set compression.update_bits = 8, or "
                                            "secagg.enabled = false for float32 updates")
    from fleetfl.privacy.graph import choose_parameters
    from fleetfl.privacy.secagg_client import majority_threshold

    try:
        k, t = choose_parameters(config.federation.clients_per_round,
                          corrupt_fraction=sec.corrupt_fraction,
                          dropout_fraction=sec.dropout_fraction,
                          num_neighbours=sec.num_neighbours or None,
                          threshold=sec.threshold or None)
    except ValueError as err:
        key = "secagg.threshold" if sec.threshold else "secagg.num_neighbours"
        raise ConfigError(key, f"no SecAgg+ parameters for {config.federation.clients_per_round} "
                               f"clients per round: {err} (secagg.enabled = false turns secure "
                               f"aggregation off)") from None
    if t < majority_threshold(k):  # clients refuse it (a lying coordinator's simpler attack)
        raise ConfigError("secagg.threshold", f"t = {t} is below the majority of k = {k} "
                                              f"neighbours ({majority_threshold(k)}), which "
                                              f"every client enforces")


def parse_override(item: str) -> tuple[str, str, Any]:
    """Parse ``section.key=value``; the value is read as a TOML value, else as a bare string."""
    path, sep, raw = item.partition("=")
    section, dot, key = path.strip().partition(".")
    if not sep or not dot or not section or not key:
        raise ConfigError(path or item, "override must look like section.key=value")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, key, value


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Read the TOML file at ``path`` (optional), apply ``--set`` overrides, and validate."""
    data: dict[str, dict[str, Any]] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                loaded = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError("--config", f"file not found: {path}") from None
        except IsADirectoryError:
            raise ConfigError("--config", f"{path} is a directory, not a TOML file") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ConfigError("--config", f"{path} is not valid TOML: {err}") from None
        except OSError as err:
            raise ConfigError("--config", f"cannot read {path}: {err}") from None
        for name, values in loaded.items():
            data[name] = dict(values) if isinstance(values, Mapping) else values
    apply_overrides(data, overrides)
    return from_dict(data)


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> None:
    """Apply ``section.key=value`` strings to nested ``data`` in place (``section.table.key``
    sets one key inside a table, e.g. ``task.params.model=cnn``)."""
    for item in overrides:
        section, key, value = parse_override(item)
        if not isinstance(data.setdefault(section, {}), dict):
            raise ConfigError(section, "must be a table ([section])")
        table, _, sub = key.partition(".")
        if sub:
            if not isinstance(data[section].setdefault(table, {}), dict):
                raise ConfigError(f"{section}.{table}", "is not a table")
            data[section][table] = {**data[section][table], sub: value}
        else:
            data[section][key] = value


def to_run_config(config: Config) -> dict[str, bool | int | float | str]:
    """Flatten to Flower's ``run_config`` form (``"section.key"`` → scalar; tables as JSON)."""
    flat: dict[str, bool | int | float | str] = {}
    for section, values in config.to_dict().items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = json.dumps(value) if isinstance(value, dict) else value
    return flat


def from_run_config(run_config: Mapping[str, Any]) -> Config:
    """Inverse of :func:`to_run_config`; unknown keys are errors as in TOML."""
    data: dict[str, dict[str, Any]] = {}
    for flat_key, value in run_config.items():
        section, _, key = flat_key.partition(".")
        hints = get_type_hints(_SECTION_TYPES[section]) if section in _SECTION_TYPES else {}
        if isinstance(value, str) and key in hints and hints[key] not in (str,):
            value = json.loads(value)
        data.setdefault(section, {})[key] = value
    return from_dict(data)


def describe_keys() -> list[tuple[str, str, str]]:
    """``(section.key, default, help)`` for every configuration key, for ``--help``."""
    rows = []
    for name, cls in _SECTION_TYPES.items():
        for f in dataclasses.fields(cls):
            default = f.default_factory() if callable(f.default_factory) else f.default
            help_text = f.metadata.get("help", "")
            rows.append((f"{name}.{f.name}", json.dumps(_plain(default)), help_text))
    return rows
