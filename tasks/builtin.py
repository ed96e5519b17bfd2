"""The built-in tasks, written on the public :class:`~fleetfl.tasks.task.Task` API.

* ``digits``: scikit-learn's 8×8 digits (1,797 images, 10 classes, shipped with
  scikit-learn), split over clients with Dirichlet label skew; models ``cnn`` (default),
  ``logreg``, ``randwire``.
* ``synthetic``: the FedProx paper's Synthetic(α, β) (60 features, 10 classes, one user per
  client); model ``logreg``.

Their ``[task.params]`` are the keyword arguments of the classes below. Data loading is
memoized per process (:func:`fleetfl.tasks.registry.load_federated`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fleetfl.tasks.data import FederatedDataset
from fleetfl.tasks.shakespeare import ShakespeareTask
from fleetfl.tasks.task import Task

if TYPE_CHECKING:
    from torch import nn

DIGITS_MODELS = ("cnn", "logreg", "randwire")
SYNTHETIC_MAX = 100.0  # the FedProx paper's alpha, beta are 0, 0.5 and 1


def _flag(name: str, value: bool) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def _non_negative(name: str, value: float) -> float:
    if not (isinstance(value, int | float) and not isinstance(value, bool) and value >= 0):
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    return float(value)


class DigitsTask(Task):
    """scikit-learn's digits, Dirichlet(``partition_alpha``) label skew (or ``iid``)."""

    input_shape = (1, 8, 8)
    num_classes = 10

    def __init__(self, model: str = "cnn", partition_alpha: float = 0.5,
                 iid: bool = False) -> None:
        if model not in DIGITS_MODELS:
            raise ValueError(f"model {model!r} is not one of {', '.join(DIGITS_MODELS)}")
        if not _non_negative("partition_alpha", partition_alpha) > 0:
            raise ValueError(f"partition_alpha must be > 0, got {partition_alpha}")
        self.model, self.partition_alpha = model, float(partition_alpha)
        self.iid = _flag("iid", iid)

    def build_model(self, seed: int) -> nn.Module:
        from fleetfl.tasks.models import build_model

        return build_model(self.model, self.input_shape, self.num_classes, seed=seed)

    def federated_data(self, num_clients: int, seed: int) -> FederatedDataset:
        from fleetfl.tasks.registry import load_federated

        return load_federated("digits", num_clients=num_clients, seed=seed, iid=self.iid,
                              partition_alpha=self.partition_alpha)


class SyntheticTask(Task):
    """The FedProx paper's Synthetic(``alpha``, ``beta``), or Synthetic-IID (``iid``)."""

    input_shape = (60,)
    num_classes = 10

    def __init__(self, alpha: float = 1.0, beta: float = 1.0, iid: bool = False,
                 model: str = "logreg") -> None:
        if model != "logreg":
            raise ValueError(f"model {model!r}: the synthetic dataset has 60 features; use "
                             f"'logreg'")
        self.alpha = _non_negative("alpha", alpha)
        self.beta = _non_negative("beta", beta)
        for key, value in (("alpha", self.alpha), ("beta", self.beta)):
            if value > SYNTHETIC_MAX:  # exp() of the logits overflows far below 1e308
                raise ValueError(f"{key} must be <= {SYNTHETIC_MAX:g}, got {value:g}")
        self.iid, self.model = _flag("iid", iid), model

    def build_model(self, seed: int) -> nn.Module:
        from fleetfl.tasks.models import build_model

        return build_model(self.model, self.input_shape, self.num_classes, seed=seed)

    def federated_data(self, num_clients: int, seed: int) -> FederatedDataset:
        from fleetfl.tasks.registry import load_federated

        return load_federated("synthetic", num_clients=num_clients, seed=seed,
                              alpha=self.alpha, beta=self.beta, iid=self.iid)


BUILTIN_TASKS: dict[str, type[Task]] = {"digits": DigitsTask, "synthetic": SyntheticTask,
                                        "shakespeare": ShakespeareTask}
# Keyword arguments each built-in takes: the keys of [task] before the Task API mapped here.
BUILTIN_PARAMS: dict[str, tuple[str, ...]] = {"digits": ("model", "partition_alpha", "iid"),
                                              "synthetic": ("alpha", "beta", "iid", "model"),
                                              "shakespeare": ("model",)}
