"""A digits task that notes which Ray node trained it (tests/test_ray_cluster.py).

A user's own task, as the README's cluster section asks: importable on every node. Each time
a client in a Ray actor builds its model (once per training), it appends the actor's Ray node
id to the file ``marks``; the coordinator's own builds (not in an actor) are not noted.
"""

from __future__ import annotations

from torch import nn

from fleetfl.tasks.builtin import DigitsTask


class NodeMarkingDigits(DigitsTask):
    """``DigitsTask`` plus ``marks``: a file the training nodes' ids are appended to."""

    def __init__(self, marks: str = "", **params) -> None:
        super().__init__(**params)
        self.marks = marks

    def build_model(self, seed: int) -> nn.Module:
        import ray

        if self.marks and ray.is_initialized():
            context = ray.get_runtime_context()
            if context.get_actor_id() is not None:  # a simulated client, in a Ray actor
                with open(self.marks, "a", encoding="utf-8") as file:
                    file.write(context.get_node_id() + "\n")
        return super().build_model(seed)
