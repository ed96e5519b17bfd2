"""Round state that survives a crash: committed after every finished round, resumed after.

Flower's SuperLink keeps runs, nodes and messages in its SQLite ``--database``, but a run whose
ServerApp process dies is over for Flower (``finished:failed``) and the global model lived only
in that process. So the ServerApp commits, after each finished round, everything needed to go
on: the global model, the round number, strategy, pruning and quantization state, and the
metrics rows. A restarted coordinator submits a new run whose ServerApp loads the last commit
and continues with round ``server_round + 1``:

* **nothing finished is lost**: a round counts as finished once :meth:`RoundStore.commit`
  returns; the file is replaced atomically and the directory fsynced, so a crash leaves the
  previous or the new commit, never a mix.
* **nothing is applied twice**: commits must advance the round by exactly one; a round that
  was in flight at the crash was never committed and is simply run again.
* **one writer**: :meth:`RoundStore.acquire` takes an exclusive ``flock`` for the ServerApp's
  lifetime (the kernel drops it if the process dies), so a stale duplicate run fails fast.

The commit is a regular global-model checkpoint (:mod:`fleetfl.coordinator.checkpoint`), so
``fleetfl export`` reads ``STATE/rounds/checkpoint.pt`` directly. Next to it:
``commit.json`` (the round and the SHA-256 of the checkpoint it committed, written after it:
a checkpoint that does not match is refused at resume), ``metrics.jsonl`` (the rows, rewritten
atomically after each commit and rebuilt from the checkpoint's history at resume; the service
prints from it) and ``lock``. A full disk is reported as such, naming the directory.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

STATE_ENV = "FLEETFL_STATE_DIR"  # set by `fleetfl coordinator start` for the ServerApp process
CHECKPOINT = "checkpoint.pt"
COMMIT = "commit.json"
METRICS = "metrics.jsonl"
# Config keys that may change between a crash and the restart without invalidating the state.
# How a run is executed, not what it computes (both engines train the same model bit for bit).
RESUMABLE_CHANGES = ("federation.rounds", "federation.round_timeout_s", "federation.engine",
                     "federation.workers", "output.")


class StateError(RuntimeError):
    """The round state cannot be read, written or resumed; the message says why."""


@dataclass
class RoundState:
    """Everything needed to continue after ``server_round`` (0: the initial model).

    ``arrays``: the global model (state_dict name -> array, in model order). ``task``: the
    resolved ``[task]`` section plus ``input_shape``, ``num_classes`` and ``num_clients`` (what
    the checkpoint needs to rebuild the model). ``strategy``, ``pruning``, ``quantization``:
    plain-valued dicts owned by those components (the virtual clock, the pruning schedule
    position, int8 clip ranges, ...); ``masks``: pruning masks (bool arrays) by tensor name.
    ``history``: the metrics row of every finished round; ``config``: ``Config.to_dict()``.
    """

    server_round: int
    arrays: dict[str, np.ndarray]
    task: dict[str, Any]
    strategy: dict[str, Any] = field(default_factory=dict)
    pruning: dict[str, Any] = field(default_factory=dict)
    quantization: dict[str, Any] = field(default_factory=dict)
    masks: dict[str, np.ndarray] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)


def _flat(config: Mapping[str, Any]) -> dict[str, Any]:
    """``{section: {key: v}}`` -> ``{"section.key": v}`` (tables below sections stay values)."""
    return {f"{s}.{k}": v for s, keys in config.items() for k, v in dict(keys).items()}


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``section.key`` names whose value differs, ignoring :data:`RESUMABLE_CHANGES`. A key
    the saved config lacks (written by an older fleetfl) counts as its default."""
    from fleetfl.coordinator.config import from_dict

    defaults = _flat(from_dict({}).to_dict())
    a, b = {**defaults, **_flat(saved)}, {**defaults, **_flat(current)}
    changed = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return [k for k in changed if not k.startswith(RESUMABLE_CHANGES)]


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (the rename itself is atomic, not durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RoundStore:
    """Commit and load :class:`RoundState` in one directory (see the module docstring)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._lock: IO[bytes] | None = None

    @classmethod
    def from_env(cls) -> RoundStore | None:
        """The store under ``$FLEETFL_STATE_DIR/rounds``, or ``None`` (e.g. in simulation)."""
        root = os.environ.get(STATE_ENV)
        return cls(Path(root) / "rounds") if root else None

    @property
    def checkpoint_path(self) -> Path:
        """The committed checkpoint (readable by ``fleetfl export``)."""
        return self.directory / CHECKPOINT

    def acquire(self) -> None:
        """Become the only writer (raises :class:`StateError` if another process is)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fh = open(self.directory / "lock", "ab")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise StateError(f"{self.directory} is in use by another fleetfl ServerApp") from None
        self._lock = fh

    def release(self) -> None:
        """Give up the writer lock (also released by the kernel when the process exits)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def load(self) -> RoundState | None:
        """The last committed state, or ``None`` if nothing was committed yet."""
        # Imported here: checkpoints need torch; the service only reads metrics.jsonl.
        from fleetfl.coordinator.checkpoint import CheckpointError, load_checkpoint

        if not self.checkpoint_path.exists():
            return None
        try:
            ckpt = load_checkpoint(self.checkpoint_path)
        except CheckpointError as err:
            raise StateError(f"{err}; move the file away to start over") from None
        self._check_commit(ckpt.server_round)
        extra = ckpt.strategy_state or {}
        return RoundState(
            server_round=ckpt.server_round,
            arrays={k: v.numpy() for k, v in ckpt.state_dict.items()},
            task=ckpt.task,
            strategy=dict(extra.get("strategy", {})),
            pruning=dict(extra.get("pruning", {})),
            quantization=ckpt.quantization,
            masks=ckpt.masks,
            history=list(extra.get("history", [])),
            config=dict(extra.get("config", {})),
        )

    def _check_commit(self, server_round: int) -> None:
        """The checkpoint must be the one ``commit.json`` records, or the next round's (a crash
        between the checkpoint's atomic replace and ``commit.json``'s); without the file (a
        store from before it existed) the checkpoint's own checks apply."""
        try:
            commit = json.loads((self.directory / COMMIT).read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as err:
            raise StateError(f"{self.directory / COMMIT} is unreadable ({err}); move the "
                             f"directory away to start over") from None
        digest = _sha256(self.checkpoint_path)
        if digest != commit.get("sha256") and server_round != commit.get("round", -1) + 1:
            raise StateError(f"{self.checkpoint_path} is not the checkpoint committed for round "
                             f"{commit.get('round')} (sha256 {digest[:12]}…, committed "
                             f"{str(commit.get('sha256'))[:12]}…): truncated or changed; move "
                             f"the directory away to start over")

    def last_round(self) -> int | None:
        """The committed round number (``None``: nothing committed)."""
        state = self.load()
        return None if state is None else state.server_round

    def commit(self, state: RoundState) -> None:
        """Atomically make ``state`` the last finished round (must advance it by exactly one)."""
        from fleetfl.coordinator.checkpoint import save_checkpoint

        if self._lock is None:
            raise StateError("commit() without acquire(): another process might be writing")
        last = self.last_round()
        if last is not None and state.server_round != last + 1:
            raise StateError(f"round {state.server_round} cannot follow committed round {last}: "
                             "each round is committed once, in order")
        try:
            save_checkpoint(
                self.checkpoint_path,
                state_dict=state.arrays,
                task=state.task,
                server_round=state.server_round,
                masks=state.masks,
                quantization=state.quantization,
                strategy_state={"strategy": state.strategy, "pruning": state.pruning,
                                "history": state.history, "config": state.config},
            )
            _fsync_dir(self.directory)
            _atomic_text(self.directory / COMMIT, json.dumps(
                {"round": state.server_round, "sha256": _sha256(self.checkpoint_path)}))
            self._write_metrics(state.history)
        except OSError as err:
            if err.errno == errno.ENOSPC:
                free = shutil.disk_usage(self.directory).free
                raise StateError(f"the disk holding {self.directory} is full ({free} bytes "
                                 f"free): round {state.server_round} was not committed") from None
            raise

    def _write_metrics(self, history: list[dict[str, Any]]) -> None:
        _atomic_text(self.directory / METRICS, "".join(json.dumps(row) + "\n" for row in history))

    def resume(self, config: Mapping[str, Any]) -> RoundState | None:
        """:meth:`load`, refusing a state made with a different configuration."""
        state = self.load()
        if state is None:
            return None
        changed = config_changes(state.config, config)
        if changed:
            raise StateError(f"{self.directory} was made with a different configuration "
                             f"({', '.join(changed)}); use a new --state directory to start over")
        self._write_metrics(state.history)  # rebuilt: a corrupted metrics.jsonl blocks nothing
        return state


def read_metrics(directory: str | Path) -> list[dict[str, Any]]:
    """The committed metrics rows under ``directory`` (``[]`` before the first commit; lines
    that do not parse are skipped: the file is rebuilt from the checkpoint at resume)."""
    try:
        lines = (Path(directory) / METRICS).read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()
