"""Shakespeare: next-character prediction, one client per (play, role), as LEAF builds it.

A role's text (:func:`fleetfl.tasks.shakespeare_data.load_roles`) is encoded over LEAF's
80-symbol vocabulary (:data:`VOCAB`; any other character becomes a space) and cut into every
window of ``seq_len`` characters (stride 1): ``x`` is the window (uint8 symbol ids, shape
``(n, seq_len)``), ``y`` the character after it (int64). A client's first 80 % of windows train;
its test windows start ``seq_len`` characters after the last training target, so no character
of a test example was trained on (LEAF's split for this dataset). Roles with fewer than
``min_samples`` windows are left out; the simulation's ``num_clients`` clients are a seeded
random sample of the rest, and the central test set is the union of their test splits.

Models (:class:`CharLSTM`): ``leaf``, LEAF's (embedding 8, 2 × LSTM 256, 820 k parameters), and
``small`` (the default: embedding 8, 1 × LSTM 128, 82 k parameters), which trains ~5× faster
on a CPU core.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fleetfl.tasks.data import FederatedDataset, Split, concat_splits
from fleetfl.tasks.task import Task

if TYPE_CHECKING:
    from torch import nn

# LEAF's ALL_LETTERS (models/utils/language_utils.py): 80 symbols.
VOCAB = ("\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}")
SPACE = VOCAB.index(" ")
TRAIN_FRACTION = 0.8
MODELS: dict[str, tuple[int, int]] = {"small": (128, 1), "leaf": (256, 2)}  # hidden, layers


def encode(text: str) -> np.ndarray:
    """Symbol ids (uint8) of ``text``; characters outside :data:`VOCAB` map to a space."""
    codes = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    table = np.full(max(int(codes.max(initial=0)), 255) + 1, SPACE, np.uint8)
    table[[ord(ch) for ch in VOCAB]] = np.arange(len(VOCAB), dtype=np.uint8)
    return table[codes]


def role_splits(ids: np.ndarray, seq_len: int, max_samples: int | None,
                rng: np.random.Generator) -> tuple[Split, Split]:
    """(train, test) windows of one role's symbol ids (see the module docstring).

    ``max_samples`` caps the training windows, and the test windows at a quarter of it (the
    80/20 ratio), each a seeded random subset kept in text order."""
    n = len(ids) - seq_len
    windows = np.lib.stride_tricks.sliding_window_view(ids, seq_len + 1)[:n]
    n_train = int(TRAIN_FRACTION * n)
    train_idx, test_idx = np.arange(n_train), np.arange(n_train + seq_len, n)
    if max_samples is not None:
        train_idx = _subset(train_idx, max_samples, rng)
        test_idx = _subset(test_idx, max(1, max_samples // 4), rng)
    return _split(windows[train_idx]), _split(windows[test_idx])


def _subset(idx: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    return idx if len(idx) <= cap else np.sort(rng.choice(idx, cap, replace=False))


def _split(windows: np.ndarray) -> Split:
    return Split(x=np.ascontiguousarray(windows[:, :-1]), y=windows[:, -1].astype(np.int64))


@dataclass(frozen=True)
class PartitionStats:
    """How the roles' samples (windows) are distributed over clients."""

    plays: int
    roles: int
    clients: int  # roles with at least min_samples windows
    samples: int  # windows over those clients
    mean: float
    std: float
    percentiles: dict[str, int]  # p0, p10, p50, p90, p100 of windows per client

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return dict(self.__dict__)


class ShakespeareTask(Task):
    """LEAF Shakespeare; ``[task.params]``: ``model`` ("small" | "leaf"), ``seq_len`` (80),
    ``min_samples`` (windows a role needs to be a client, 64), ``max_samples`` (cap on a
    client's training windows, and a quarter of it on its test windows; none), ``archive`` (a
    local copy of the sdist)."""

    num_classes = len(VOCAB)
    input_dtype = "uint8"

    def __init__(self, model: str = "small", seq_len: int = 80, min_samples: int = 64,
                 max_samples: int | None = None, archive: str | None = None) -> None:
        if model not in MODELS:
            raise ValueError(f"model {model!r} is not one of {', '.join(MODELS)}")
        for key, value in (("seq_len", seq_len), ("min_samples", min_samples),
                           ("max_samples", 1 if max_samples is None else max_samples)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
        self.model, self.seq_len, self.min_samples = model, seq_len, min_samples
        self.max_samples, self.archive = max_samples, archive
        self.input_shape = (seq_len,)

    def build_model(self, seed: int) -> nn.Module:
        import torch

        from fleetfl.tasks.char_lstm import CharLSTM

        hidden, layers = MODELS[self.model]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return CharLSTM(len(VOCAB), embed=8, hidden=hidden, layers=layers)

    def eligible_roles(self) -> list[tuple[tuple[str, str], str]]:
        """``((play, role), text)`` of the roles with at least ``min_samples`` windows."""
        from fleetfl.tasks.shakespeare_data import load_roles

        return [(key, text) for key, text in load_roles(self.archive).items()
                if len(text) - self.seq_len >= self.min_samples]

    def federated_data(self, num_clients: int, seed: int) -> FederatedDataset:
        return _federated(self, num_clients, seed)

    def partition_stats(self) -> PartitionStats:
        """Client count and windows per client over every eligible role."""
        from fleetfl.tasks.shakespeare_data import load_roles

        roles = load_roles(self.archive)
        sizes = np.array([len(t) - self.seq_len for _, t in self.eligible_roles()])
        pct = {f"p{q}": int(np.percentile(sizes, q)) for q in (0, 10, 50, 90, 100)}
        return PartitionStats(plays=len({play for play, _ in roles}), roles=len(roles),
                              clients=len(sizes), samples=int(sizes.sum()),
                              mean=float(sizes.mean()), std=float(sizes.std()), percentiles=pct)


def _federated(task: ShakespeareTask, num_clients: int, seed: int) -> FederatedDataset:
    roles = task.eligible_roles()
    if num_clients > len(roles):
        raise ValueError(f"federation.num_clients = {num_clients}, but only {len(roles)} roles "
                         f"have >= {task.min_samples} samples (task.params.min_samples)")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(roles), num_clients, replace=False))
    clients = tuple(role_splits(encode(roles[i][1]), task.seq_len, task.max_samples, rng)
                    for i in chosen)
    return FederatedDataset(name="shakespeare", clients=clients,
                            test=concat_splits([test for _, test in clients]),
                            input_shape=(task.seq_len,), num_classes=len(VOCAB))


if __name__ == "__main__":  # python -m fleetfl.tasks.shakespeare: the partition statistics
    import json

    print(json.dumps(ShakespeareTask().partition_stats().to_dict(), indent=2))
