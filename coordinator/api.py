"""The Python API of the simulation: ``fleetfl.simulate(config, out=None) -> summary``.

``fleetfl simulate`` on the command line and this function run the same code
(:func:`fleetfl.coordinator.simulate.simulate`). This one leaves the process as it found it:
``os.environ`` and the logging configuration (levels and handlers of the root, ``flwr`` and
``ray`` loggers) are restored when it returns or raises.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from fleetfl.coordinator.config import Config, apply_overrides, from_dict, load_config

_LOGGERS = ("", "flwr", "ray")


def simulate(config: Config | Mapping[str, Any] | str | os.PathLike[str] | None = None,
             out: str | os.PathLike[str] | None = None, *, progress: bool = False,
             overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run a simulated fleet and return its ``summary.json`` object.

    Args:
        config: a :class:`~fleetfl.coordinator.config.Config`, a nested mapping
            ``{section: {key: value}}`` as in the TOML file, the path of a TOML file, or
            ``None`` for the default fleet.
        out: the output directory (``metrics.jsonl``, ``summary.json``, ``report.png``,
            ``model.pt``); overrides ``output.dir``.
        progress: show the progress bar (on stderr).
        overrides: ``section.key=value`` strings, as ``--set`` takes them.

    Raises:
        fleetfl.coordinator.config.ConfigError: a bad key or value (before any engine starts).
        RuntimeError: the simulation stopped early.
    """
    sets = list(overrides)
    if out is not None:
        sets.append(f"output.dir={str(out)!r}")
    sets.append(f"output.progress={'true' if progress else 'false'}")
    resolved = _resolve(config, sets)
    from fleetfl.coordinator.simulate import simulate as run

    with _restored_process_state():
        return run(resolved)


def _resolve(config: Config | Mapping[str, Any] | str | os.PathLike[str] | None,
             sets: list[str]) -> Config:
    if config is None or isinstance(config, str | os.PathLike):
        return load_config(None if config is None else Path(config), sets)
    data = config.to_dict() if isinstance(config, Config) else {
        section: dict(values) if isinstance(values, Mapping) else values
        for section, values in config.items()}
    apply_overrides(data, sets)
    return from_dict(data)


@contextlib.contextmanager
def _restored_process_state() -> Iterator[None]:
    """Put ``os.environ`` and the loggers back as they were on exit."""
    environ = dict(os.environ)
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    saved = [(lg.level, list(lg.handlers), lg.propagate, lg.disabled) for lg in loggers]
    try:
        yield
    finally:
        for key in set(os.environ) - set(environ):
            del os.environ[key]
        os.environ.update(environ)
        for lg, (level, handlers, propagate, disabled) in zip(loggers, saved, strict=True):
            lg.setLevel(level)
            lg.handlers[:] = handlers
            lg.propagate, lg.disabled = propagate, disabled
