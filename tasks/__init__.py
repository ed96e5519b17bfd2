"""Tasks: datasets, partitioning and models shared by coordinator and client."""

from fleetfl.tasks.data import FederatedDataset, Split
from fleetfl.tasks.digits import load_digits_federated
from fleetfl.tasks.models import (
    MODEL_NAMES,
    DigitsCNN,
    LogisticRegression,
    build_model,
    forward_flops_per_sample,
    training_flops_per_sample,
)
from fleetfl.tasks.partition import dirichlet_label_partition, iid_partition
from fleetfl.tasks.registry import DATASET_NAMES, load_federated
from fleetfl.tasks.synthetic import generate_synthetic

__all__ = [
    "DATASET_NAMES",
    "MODEL_NAMES",
    "DigitsCNN",
    "FederatedDataset",
    "LogisticRegression",
    "Split",
    "build_model",
    "dirichlet_label_partition",
    "forward_flops_per_sample",
    "generate_synthetic",
    "iid_partition",
    "load_digits_federated",
    "load_federated",
    "training_flops_per_sample",
]
