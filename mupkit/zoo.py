"""Ready-made coordinate-check definitions for the built-in models (used by the CLI and coord_checks/).

Each definition fixes what a check of that model needs besides the widths: the constructor,
its fixed kwargs (which may depend on the parametrization and base width, e.g. the GPT's
attention scale), a default width range spanning 16x, default LRs per optimizer family
("large", so SP visibly fails), and optionally a batch.
"""

from __future__ import annotations

import importlib.util
import pathlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from . import models
from .data import Batch


@dataclass(frozen=True)
class CheckDefinition:
    constructor: Callable[..., torch.nn.Module]
    widths: tuple[int, ...]
    lr: Mapping[str, float] = field(default_factory=lambda: {"adam": 1e-2, "adamw": 1e-2, "sgd": 0.3})
    kwargs: Callable[[str, int], dict[str, Any]] = lambda parametrization, base: {}
    batch: Callable[[], Batch] | None = None
    loss: Callable | None = None


def _token_batch() -> Batch:
    idx = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(123))
    return idx[:, :-1], idx[:, 1:]


def _gpt_kwargs(parametrization: str, base: int) -> dict[str, Any]:
    """1/d attention pinned to SP at the base width under muP; plain 1/sqrt(d) under SP."""
    return {"base_width": None if parametrization == "sp" else base, "max_len": 16, "emb_mult": 10.0}


BUILTIN: dict[str, CheckDefinition] = {
    "mlp": CheckDefinition(models.mlp, (64, 128, 256, 512, 1024), lr={"adam": 1e-2, "adamw": 1e-2, "sgd": 1.0}),
    "cnn": CheckDefinition(models.cnn, (32, 64, 128, 256, 512), lr={"adam": 3e-3, "adamw": 3e-3, "sgd": 0.3}),
    "resmlp": CheckDefinition(models.resmlp, (64, 128, 256, 512, 1024)),
    "transformer": CheckDefinition(models.gpt, (64, 128, 256, 512, 1024), kwargs=_gpt_kwargs, batch=_token_batch),
}
BUILTIN["resnet"] = BUILTIN["resmlp"]
BUILTIN["gpt"] = BUILTIN["transformer"]


def load_definition(spec: str) -> CheckDefinition:
    """A built-in name, or ``path.py:func``: ``func(width=..., **kwargs)`` builds the model.

    The file may also define ``batch() -> (inputs, targets)`` and ``loss(output, targets)``;
    without them the batch is synthesized from the model's first layer.
    """
    if spec in BUILTIN:
        return BUILTIN[spec]
    path, sep, func = spec.rpartition(":")
    if not sep or not path.endswith(".py"):
        raise ValueError(f"--model {spec!r}: use one of {sorted(BUILTIN)} or PATH.py:FUNC")
    file = pathlib.Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--model {spec!r}: no file {file}")
    module_spec = importlib.util.spec_from_file_location(f"mupkit_user_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not callable(getattr(module, func, None)):
        raise ValueError(f"--model {spec!r}: {file} has no function {func!r}")
    return CheckDefinition(getattr(module, func), (64, 128, 256, 512, 1024), batch=getattr(module, "batch", None),
                           loss=getattr(module, "loss", None))
