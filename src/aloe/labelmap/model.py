"""The networks: a trunk (given by the task) followed by an output layer.

- :class:`HeadsNet` -- shared trunk + m heads, one ``Linear(d, sum k_i)`` whose slices are the heads;
- :class:`IndependentHeadsNet` -- m fully independent networks (own trunk, own head), the base learners of the
  paper trained side by side; their logits are concatenated so decoders treat both variants alike;
- :class:`SoftmaxNet` -- one-hot softmax; below the full ``(d + 1) N`` budget its output layer is factorised as
  ``Linear(d, r, bias=False)`` then ``Linear(r, N)`` (low-rank softmax).

Losses: :func:`heads_loss` is the sum over heads of the cross-entropies of ``f_i(y)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F


class HeadsNet(nn.Module):
    def __init__(self, trunk: nn.Module, width: int, n_outputs: int):
        super().__init__()
        self.trunk = trunk
        self.out = nn.Linear(width, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.trunk(x))

    def output_params(self) -> int:
        return sum(p.numel() for p in self.out.parameters())


class IndependentHeadsNet(nn.Module):
    def __init__(self, make_trunk: Callable[[], nn.Module], width: int, sizes: list[int]):
        super().__init__()
        self.trunks = nn.ModuleList([make_trunk() for _ in sizes])
        self.heads = nn.ModuleList([nn.Linear(width, k) for k in sizes])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([h(t(x)) for t, h in zip(self.trunks, self.heads)], dim=1)

    def output_params(self) -> int:
        return sum(p.numel() for p in self.heads.parameters())


class SoftmaxNet(nn.Module):
    def __init__(self, trunk: nn.Module, width: int, n_classes: int, rank: int | None = None):
        super().__init__()
        self.trunk = trunk
        if rank is None or rank >= width:
            self.out = nn.Linear(width, n_classes)
        else:
            self.out = nn.Sequential(nn.Linear(width, rank, bias=False), nn.Linear(rank, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.trunk(x))

    def output_params(self) -> int:
        return sum(p.numel() for p in self.out.parameters())


def heads_loss(logits: torch.Tensor, targets: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """``sum_i CE(head_i, f_i(y))`` averaged over the batch; ``targets`` is (batch, m) of head classes."""
    if len(set(sizes)) == 1:
        k = sizes[0]
        return F.cross_entropy(logits.view(-1, len(sizes), k).reshape(-1, k), targets.reshape(-1)) * len(sizes)
    total = logits.new_zeros(())
    for i, z in enumerate(torch.split(logits, list(sizes), dim=1)):
        total = total + F.cross_entropy(z, targets[:, i])
    return total


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
