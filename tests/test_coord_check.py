"""Minimal coordinate checks and "wider is better" (the full coord-check tool is a later issue).

Pass: under muP every module's mean |output| after 1-4 steps has |slope| <= 0.1 in log-log
against width over a 16x range (64..1024). Fail: SP shows a slope >= 0.5 on the same model.
Step 0 (init) is not judged: the readout (tied or not) shrinks like 1/sqrt(width) there by
design (Tensor Programs V, Table 8; mup README "Coord Check").
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mupkit
from mupkit import models

from coord import slopes

WIDTHS = [64, 128, 256, 512, 1024]


def worst(s: dict, steps=range(1, 5)) -> tuple[float, tuple]:
    return max((abs(v), k) for k, v in s.items() if k[1] in steps)


@pytest.fixture(scope="module")
def mlp_batch():
    g = torch.Generator().manual_seed(123)
    return torch.randn(32, 64, generator=g), torch.randint(0, 10, (32,), generator=g)


@pytest.mark.parametrize("optim,lr", [("adam", 1e-2), ("sgd", 1.0)])
def test_mlp_coord_check_mup_flat_sp_grows(mlp_batch, optim, lr):
    mup = slopes(models.mlp, WIDTHS, base=64, param="mup", optim=optim, lr=lr, batch=mlp_batch,
                 loss_fn=F.cross_entropy)
    sp = slopes(models.mlp, WIDTHS, base=64, param="sp", optim=optim, lr=lr, batch=mlp_batch,
                loss_fn=F.cross_entropy)
    assert worst(mup)[0] <= 0.1, worst(mup)
    assert worst(sp)[0] >= 0.5, worst(sp)


def lm_loss(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def test_transformer_coord_check_mup_flat_sp_grows():
    """Pre-LN GPT, GELU, tied embeddings, 1/d attention (4 heads, head dim 16..256), Adam."""
    g = torch.Generator().manual_seed(123)
    idx = torch.randint(0, 256, (4, 17), generator=g)
    batch = idx[:, :-1], idx[:, 1:]
    common = dict(batch=batch, loss_fn=lm_loss, optim="adam", lr=1e-2, seeds=(0, 1, 2))
    mup = slopes(models.gpt, WIDTHS, base=64, param="mup", base_width=64, max_len=16, emb_mult=10.0, **common)
    sp = slopes(models.gpt, WIDTHS, base=64, param="sp", base_width=None, max_len=16, emb_mult=10.0, **common)
    assert worst(mup)[0] <= 0.1, worst(mup)
    assert worst(sp)[0] >= 0.5, worst(sp)


def test_wider_is_better_under_mup():
    """Same data, same LR, 200 Adam steps: training loss falls with width (mup's MLPTrainCase)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 64, generator=g), torch.randint(0, 10, (256,), generator=g)
    losses = {}
    for width in (64, 256, 1024):
        torch.manual_seed(0)
        model = mupkit.build(models.mlp, base=dict(width=64), delta=dict(width=128), target=dict(width=width))
        opt = mupkit.optim.Adam(mupkit.param_groups(model), lr=3e-3)
        for _ in range(200):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
        losses[width] = loss.item()
    assert losses[64] > losses[256] > losses[1024], losses
