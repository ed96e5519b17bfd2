"""RandWire: a CNN whose stages are randomly wired graphs (Xie et al., "Exploring Randomly Wired
Neural Networks for Image Recognition", ICCV 2019), sized for 1x8x8 digits.

Each stage is a Watts-Strogatz graph WS(n, k, p) made acyclic by pointing every edge from the
lower to the higher node index. A node aggregates its inputs by a weighted sum with positive
weights ``sigmoid(w)``, then applies ReLU - separable 3x3 convolution - batch norm; nodes
without inputs read the stage input (with the stage's stride), and the stage output is the
mean of the nodes without successors. The irregular wiring is what makes operator order matter
for peak memory, so this is the scheduler's real target. ``set_checkpointing`` trades one extra
forward pass for most of the activations training keeps.

The Watts-Strogatz graph comes from networkx (``connected_watts_strogatz_graph``, as in the
paper's code); networkx is a dependency of torch, so it is always installed with it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def random_dag(nodes: int, k: int, p: float, seed: int) -> list[list[int]]:
    """Predecessors of each node of a connected WS(nodes, k, p) graph, edges low -> high index.

    Node indices are a topological order; a node with no predecessor reads the stage input.
    """
    import networkx as nx

    if nodes < 2 or not 0 < k < nodes or k % 2:
        raise ValueError(f"WS graph needs nodes >= 2 and an even 0 < k < nodes; got {nodes}, {k}")
    graph = nx.connected_watts_strogatz_graph(nodes, k, p, tries=200, seed=seed)
    preds: list[list[int]] = [[] for _ in range(nodes)]
    for a, b in graph.edges():
        lo, hi = min(a, b), max(a, b)
        preds[hi].append(lo)
    return [sorted(ps) for ps in preds]


def sinks(preds: list[list[int]]) -> list[int]:
    """Nodes that no other node reads: the stage output averages them."""
    read = {p for ps in preds for p in ps}
    return [i for i in range(len(preds)) if i not in read]


class SeparableConv(nn.Sequential):
    """Depthwise 3x3 then pointwise 1x1 convolution, no bias (batch norm follows)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, in_channels, 3, stride, 1, groups=in_channels, bias=False),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
        )


class WiredNode(nn.Module):
    """Weighted-sum aggregation of ``fan_in`` inputs, then ReLU - SeparableConv - BatchNorm."""

    def __init__(self, fan_in: int, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.weights = nn.Parameter(torch.zeros(fan_in))  # sigmoid(0) = 1/2 for each input
        self.conv = SeparableConv(in_channels, out_channels, stride)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, inputs: list[torch.Tensor], checkpointing: bool = False) -> torch.Tensor:
        if checkpointing and torch.is_grad_enabled():
            # Recompute the sum and convolutions in backward instead of keeping them. Batch
            # norm stays outside: recomputing it would update its running statistics twice.
            mixed = checkpoint(self._transform, *inputs, use_reentrant=False)
        else:
            mixed = self._transform(*inputs)
        return self.bn(mixed)

    def _transform(self, *inputs: torch.Tensor) -> torch.Tensor:
        w = torch.sigmoid(self.weights)
        total = inputs[0] * w[0]
        for j in range(1, len(inputs)):
            total = total + inputs[j] * w[j]
        return self.conv(torch.relu(total))


class RandomStage(nn.Module):
    """One randomly wired stage: ``in_channels`` -> ``out_channels``, spatial stride ``stride``."""

    def __init__(
        self, preds: list[list[int]], in_channels: int, out_channels: int, stride: int
    ) -> None:
        super().__init__()
        self.preds = [list(p) for p in preds]
        self.sinks = sinks(self.preds)
        self.checkpointing = False
        self.nodes = nn.ModuleList(
            WiredNode(len(p), out_channels, out_channels, 1)
            if p else WiredNode(1, in_channels, out_channels, stride)
            for p in self.preds
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs: list[torch.Tensor] = []
        for node, preds in zip(self.nodes, self.preds, strict=True):
            outs.append(node([outs[j] for j in preds] if preds else [x], self.checkpointing))
        total = outs[self.sinks[0]]
        for j in self.sinks[1:]:
            total = total + outs[j]
        return total / len(self.sinks)


class RandWire(nn.Module):
    """Stem conv, two random stages (the second halves height and width), 1x1 conv head,
    global average pooling, linear classifier.

    Input float32 ``(batch, in_channels, height, width)``; output logits ``(batch,
    num_classes)``. ``graph_seed`` fixes the wiring (shared by every client of a fleet), the
    weights come from the torch RNG.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        *,
        channels: int = 16,
        nodes: int = 32,
        k: int = 4,
        p: float = 0.75,
        graph_seed: int = 0,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        )
        self.stage1 = RandomStage(random_dag(nodes, k, p, graph_seed), channels, channels, 1)
        self.stage2 = RandomStage(
            random_dag(nodes, k, p, graph_seed + 1), channels, 2 * channels, 2
        )
        self.head = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(2 * channels, 4 * channels, 1, bias=False),
            nn.BatchNorm2d(4 * channels),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4 * channels, num_classes),
        )
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                # A float batch counter: federated averaging and the update codec carry
                # floating-point tensors, and with a momentum set batch norm never reads it.
                module.num_batches_tracked = torch.zeros(1)

    def set_checkpointing(self, enabled: bool) -> None:
        """Activation checkpointing in training: each node keeps only its output and its batch
        norm's input, and recomputes the rest in backward (one extra forward pass)."""
        self.stage1.checkpointing = self.stage2.checkpointing = bool(enabled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stage2(self.stage1(self.stem(x))))
