"""Data for checks and examples: synthetic batches inferred from a model's first layer, and a
small real text corpus that needs no download (the Python standard library's own sources)."""

from __future__ import annotations

import pathlib
import sysconfig
from typing import Any

import torch
from torch import nn

Batch = tuple[Any, Any]

#: spatial size of synthetic inputs per conv rank
SPATIAL = {1: (64,), 2: (16, 16), 3: (8, 8, 8)}


#: rows (examples, or tokens of a sequence batch) a synthetic batch multiplies per step
ROWS = 32


def synthetic_input(model: nn.Module, *, batch_size: int | None = None, seq_len: int = 16,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """An input batch for ``model`` from its first layer (see :func:`synthetic_batch`), on the CPU."""
    first = next((m for m in model.modules() if isinstance(m, (nn.Embedding, nn.Linear, nn.Conv1d, nn.Conv2d,
                                                                  nn.Conv3d))), None)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if isinstance(first, nn.Embedding):
        rows = batch_size or max(1, ROWS // seq_len)
        return torch.randint(0, first.num_embeddings, (rows, seq_len), generator=generator)
    batch_size = batch_size or ROWS
    if isinstance(first, nn.Linear):
        return torch.randn(batch_size, first.in_features, generator=generator).to(dtype)
    if isinstance(first, nn.modules.conv._ConvNd):
        return torch.randn(batch_size, first.in_channels, *SPATIAL[len(first.kernel_size)], generator=generator).to(dtype)
    raise ValueError(f"cannot infer an input for {type(model).__name__}: its first layer is not an Embedding, "
                     f"Linear or Conv. Pass example inputs (build / infer_plan: example_inputs=...; coord_check: "
                     f"batch=(inputs, targets); CLI: define batch() in the model file).")


def synthetic_batch(model: nn.Module, *, batch_size: int | None = None, seq_len: int = 16, seed: int = 0,
                    device: str | torch.device = "cpu") -> Batch:
    """``(inputs, targets)`` for ``model``: the input kind comes from its first layer.

    Embedding -> random token ids ``(batch, seq_len)``; Linear -> N(0, 1) features; ConvNd ->
    N(0, 1) images. ``batch_size`` (default): :data:`ROWS` examples, or ``ROWS // seq_len``
    sequences, so a language model's step multiplies as many rows as an MLP's. A coordinate check
    at CPU widths needs few rows: an update's cross-row terms are finite-width noise of relative
    size ``~ rows / sqrt(width)``. Targets: random class ids over the output's last dim (token ids for a
    language model), or N(0, 1) regression targets when the output has a single channel.
    The same seed gives the same inputs at every width (only hidden sizes change).
    """
    gen = torch.Generator().manual_seed(seed)
    x = synthetic_input(model, batch_size=batch_size, seq_len=seq_len, generator=gen).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as err:  # noqa: BLE001 - the guess did not fit: say how to give a real batch
        raise ValueError(f"a synthetic batch of shape {tuple(x.shape)} (from the first layer) does not fit "
                         f"{type(model).__name__}: {type(err).__name__}: {err}. Pass batch=(inputs, targets) "
                         f"(CLI: define batch() in the model file).") from err
    finally:
        model.train(was_training)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{type(model).__name__} returns a {type(out).__name__}, not a tensor of logits, so no "
                        f"targets can be made for it; wrap it to return the logits (HF causal LMs: "
                        f"mupkit.integrations.hf.CausalLM) or pass batch=(inputs, targets) and loss=.")
    classes = out.shape[-1]
    y = torch.randn(out.shape, generator=gen) if classes == 1 else \
        torch.randint(0, classes, out.shape[:-1], generator=gen)
    return x, y.to(device)


def stdlib_corpus(split: str = "train", *, limit: int = 4_000_000, val_fraction: float = 0.1) -> torch.Tensor:
    """Bytes (int64 token ids 0..255) of the standard library's ``.py`` files, read in sorted path
    order, so every machine with the same Python gets the same corpus. The first ``1 -
    val_fraction`` of the bytes is ``"train"``, the rest ``"val"`` (a contiguous, deterministic split).
    """
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r}; use 'train' or 'val'")
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "test" in path.relative_to(root).parts[0]:
            continue
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    data = torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8).long()
    cut = int(len(data) * (1 - val_fraction))
    return data[:cut] if split == "train" else data[cut:]


def token_windows(data: torch.Tensor, count: int, context: int,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` random windows of ``context + 1`` tokens from a 1-D corpus: (inputs, next tokens)."""
    if len(data) <= context + 1:
        raise ValueError(f"a corpus of {len(data)} tokens has no window of context {context} + 1; use a shorter "
                         f"context or a larger corpus (stdlib_corpus(limit=...))")
    start = torch.randint(0, len(data) - context - 1, (count,), generator=generator)
    w = data[start[:, None] + torch.arange(context + 1)]
    return w[:, :-1], w[:, 1:]
