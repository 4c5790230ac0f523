"""A user model for the CLI tests: a shared layer called twice, tuple/dict/None outputs."""

import torch
from torch import nn


class TwoTower(nn.Module):
    def __init__(self, width: int = 32, d_in: int = 16):
        super().__init__()
        self.embed = nn.Linear(d_in, width)
        self.shared = nn.Linear(width, width)  # called twice per forward
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        h = torch.relu(self.embed(x))
        h = torch.relu(self.shared(h))
        h = torch.relu(self.shared(h))
        return {"logits": self.head(h), "aux": None, "pair": (h, None)}


def make(width: int = 32) -> TwoTower:
    return TwoTower(width)


def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(32, 16, generator=g), torch.randint(0, 10, (32,), generator=g)


def loss(out, y):
    return nn.functional.cross_entropy(out["logits"], y)
