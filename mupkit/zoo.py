"""The one registry of built-in models, used by ``mupkit coord-check``, ``mupkit transfer`` and coord_checks/.

Each :class:`ModelDefinition` in :data:`BUILTIN` says a model's constructor and, for a
coordinate check, its fixed kwargs (which may depend on the parametrization and base width,
e.g. the GPT's attention scale), a default width range spanning 16x, default LRs per optimizer
family ("large", so SP visibly fails) and optionally a batch per optimizer family; and, for an
HP-transfer sweep, its :class:`TransferTask` (widths, LR grid, trainer from :mod:`mupkit.tasks`,
fixed kwargs), or None. The ``umup-transformer`` is :class:`mupkit.unit.TransformerDecoder`
(check it with ``--param umup``), trained on its unit-scaled cross-entropy.

:func:`load_definition` (coordinate check) and :func:`load_task` (transfer) give a built-in
model by name, or a user's model from ``PATH.py:FUNC``.
"""

from __future__ import annotations

import functools
import importlib.util
import pathlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from . import models
from .integrations import hf
from .data import Batch
from .groups import resolve_family
from .optim import get_optimizer
from .rules import FAMILIES
from .tasks import TrainFn, digits, text_lm
from .unit.functional import cross_entropy as unit_cross_entropy
from .unit.modules import TransformerDecoder

#: ``(parametrization, base width) -> fixed constructor kwargs``
KwargsFn = Callable[[str, int], dict[str, Any]]


def _no_kwargs(parametrization: str, base: int) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class TransferTask:
    """What ``mupkit transfer`` needs for a model besides its constructor: default widths and LR
    grid (``log2`` exponents), the trainer (``trainer(steps, batch=..., schedule=...) ->
    train(model, hparams, seed) -> losses``, the knobs of :mod:`mupkit.tasks`) and fixed kwargs
    per parametrization and base width."""

    widths: tuple[int, ...]
    log2_lrs: tuple[int, ...]
    trainer: Callable[..., TrainFn]
    kwargs: KwargsFn = _no_kwargs


@dataclass(frozen=True)
class ModelDefinition:
    """One model of the registry: its constructor, its coordinate-check defaults (widths, LRs,
    fixed kwargs, batch, loss) and its transfer task (None: ``mupkit transfer`` does not offer it)."""

    constructor: Callable[..., torch.nn.Module]
    widths: tuple[int, ...]  # the coordinate check's default widths (16x)
    lr: Mapping[str, float] = field(default_factory=lambda: {"adam": 1e-2, "adamw": 1e-2, "sgd": 0.3,
                                                              "adafactor": 0.1})
    kwargs: KwargsFn = _no_kwargs  # the coordinate check's fixed kwargs
    batch: Callable[[str], Batch | None] | None = None  # optimizer family name -> (inputs, targets) or None
    loss: Callable | None = None
    depth_batch: Callable[[], Batch] | None = None  # for depth checks (None: the synthetic batch)
    transfer: TransferTask | None = None

    def batch_for(self, optimizer: Any, depth: bool = False) -> Batch | None:
        """The definition's batch for ``optimizer`` (a name or class), or None for a synthetic one;
        ``depth``: for a depth check."""
        if depth:
            return self.depth_batch() if self.depth_batch else None
        return self.batch(family_name(optimizer)) if self.batch else None

    def lr_for(self, optimizer: Any) -> float:
        """The definition's default LR for ``optimizer``'s family; 1 for an optimizer that adapts
        its own step size (D-Adaptation, Prodigy: ``lr`` multiplies the estimated ``d``)."""
        cls = get_optimizer(optimizer) if isinstance(optimizer, str) and optimizer.lower() not in FAMILIES \
            else optimizer
        if getattr(cls, "adapts_step_size", False):
            return 1.0
        family = family_name(optimizer)
        if family not in self.lr:
            raise ValueError(f"no default LR for optimizer family {family!r} here; pass lr= (--lr)")
        return self.lr[family]


def family_name(optimizer: Any) -> str:
    """The muP family of an optimizer given by name (mupkit's or a family's) or class."""
    if isinstance(optimizer, str) and optimizer.lower() not in FAMILIES:
        optimizer = get_optimizer(optimizer)
    return resolve_family(optimizer).name


def _token_batch(family: str) -> Batch:
    """Random byte tokens: 2 x 16 for entrywise-normalized optimizers, 1 x 4 for SGD.

    SGD's readout update for token i is a kernel sum over the batch, ``sum_j g_j <h_i, h_j> / m``.
    Random tokens have nearly orthogonal features, so the cross-token terms are noise of relative
    size ``~ tokens / sqrt(width)`` that fades with width (measured: slope -0.2 at 64 tokens,
    -0.02 at 4, widths 64..1024). Few tokens keep that finite-width term below the tolerance.
    """
    rows, length = (1, 4) if family == "sgd" else (2, 16)
    idx = torch.randint(0, 256, (rows, length + 1), generator=torch.Generator().manual_seed(123))
    return idx[:, :-1], idx[:, 1:]


def _image_batch(family: str) -> Batch | None:
    """For the orthogonalizing (Muon) families, 4 random 3x8x8 images: the CNN's hidden convs then
    multiply 64 and 16 rows (batch x positions) per step, no more than their narrower side at the
    smallest width, muP's rank-limited limit that their relative-update law (slope -1/2) is
    stated for (:mod:`mupkit.spectral`); the default synthetic 32x3x16x16 batch gives 2048 and 512
    rows, full-rank updates across the checked widths. Other families: the synthetic batch (None)."""
    if not family.startswith("muon"):
        return None
    gen = torch.Generator().manual_seed(123)
    return torch.randn(4, 3, 8, 8, generator=gen), torch.randint(0, 10, (4,), generator=gen)


def _token_batch_for_depth() -> Batch:
    """32 x 16 random byte tokens: a depth check follows a few steps of a model at depths up to 32,
    and with fewer tokens the deep models fit the batch within those steps (CompleteP's stream
    slope was +0.13 with 2 x 16 tokens, +0.01 with 32 x 16)."""
    idx = torch.randint(0, 256, (32, 17), generator=torch.Generator().manual_seed(123))
    return idx[:, :-1], idx[:, 1:]


def _mup_attention(parametrization: str, base: int) -> dict[str, Any]:
    """muP's 1/d attention pinned to SP's 1/sqrt(d) at the base width; SP keeps 1/sqrt(d)."""
    return {"base_width": None if parametrization == "sp" else base}


def _gpt_check_kwargs(parametrization: str, base: int) -> dict[str, Any]:
    """The GPT in a coordinate check: muP's attention, 16 positions (the check's batches are at
    most 16 tokens long), an input multiplier of 10 and an untied readout.

    The readout is untied so that it can be zero-initialized, as in microsoft/mup's own coordinate
    checks (TP5 App. D.2): a readout tied to the embedding keeps its init, whose output term
    ``W_0 h / m`` (and ``W_0 dh / m``) falls like ``width^-1/2`` and masks the first steps at
    CPU-sized widths. The rules checked are the same for both.
    """
    return {**_mup_attention(parametrization, base), "max_len": 16, "emb_mult": 10.0, "tie": False}


def _gpt_transfer_kwargs(parametrization: str, base: int) -> dict[str, Any]:
    """The GPT in a transfer sweep: muP's attention, 64 positions (:func:`~mupkit.tasks.text_lm`'s
    context), 2 layers, tied readout and no input multiplier (GPT-2 style, as measured in
    examples/transfer_gpt.jsonl; these kwargs are part of each stored trial's identity)."""
    return {**_mup_attention(parametrization, base), "max_len": 64, "depth": 2}


def _hf_kwargs(parametrization: str, base: int) -> dict[str, Any]:
    """HF models from a config: muP's 1/d attention pinned at the base (None under SP), 16
    positions, the readout untied so it can be zero-initialized (as for the built-in GPT)."""
    return {**_mup_attention(parametrization, base), "max_len": 16, "tie": False}


def _umup_kwargs(parametrization: str, base: int) -> dict[str, Any]:
    return {"depth": 2}  # 4 heads: the constructor's default


BUILTIN: dict[str, ModelDefinition] = {
    "mlp": ModelDefinition(models.mlp, (64, 128, 256, 512, 1024),
                           lr={"adam": 1e-2, "adamw": 1e-2, "sgd": 1.0, "adafactor": 0.1, "muon": 0.02,
                               "shampoo": 0.01},
                           transfer=TransferTask((64, 128, 256, 512, 1024), tuple(range(-14, -3)),
                                                 lambda steps, **knobs: digits(steps=steps, **knobs))),
    "cnn": ModelDefinition(models.cnn, (32, 64, 128, 256, 512),
                           lr={"adam": 3e-3, "adamw": 3e-3, "sgd": 0.3, "adafactor": 0.03, "muon": 0.02,
                               "shampoo": 0.01},
                           batch=_image_batch,
                           transfer=TransferTask((16, 32, 64, 128), tuple(range(-13, -3)),
                                                 lambda steps, **knobs: digits(steps=steps, images=True, **knobs),
                                                 kwargs=lambda parametrization, base: {"in_channels": 1})),
    "resmlp": ModelDefinition(models.resmlp, (64, 128, 256, 512, 1024)),
    "transformer": ModelDefinition(models.gpt, (64, 128, 256, 512, 1024),
                                   lr={"adam": 3e-3, "adamw": 3e-3, "sgd": 0.3, "adafactor": 0.03, "muon": 0.02,
                                       "shampoo": 0.01},
                                   kwargs=_gpt_check_kwargs, batch=_token_batch, depth_batch=_token_batch_for_depth,
                                   transfer=TransferTask((64, 128, 256, 512), tuple(range(-13, -4)),
                                                         lambda steps, **knobs: text_lm(steps=steps, **knobs),
                                                         kwargs=_gpt_transfer_kwargs)),
    "umup-transformer": ModelDefinition(
        TransformerDecoder, (64, 128, 256, 512, 1024), lr={"adam": 0.1, "adamw": 0.1, "sgd": 0.1, "adafactor": 0.03},
        kwargs=_umup_kwargs, batch=_token_batch,
        loss=lambda logits, targets: unit_cross_entropy(logits.flatten(0, -2), targets.flatten()),
        transfer=TransferTask((64, 128, 256, 512), tuple(range(-5, 3)),
                              lambda steps, **knobs: text_lm(steps=steps, **knobs),
                              kwargs=_umup_kwargs)),
}
for _name, _constructor in (("hf-gpt2", hf.gpt2), ("hf-llama", hf.llama)):
    BUILTIN[_name] = ModelDefinition(_constructor, (64, 128, 256, 512, 1024), lr={"adam": 1e-3, "adamw": 1e-3,
                                     "sgd": 0.3, "adafactor": 0.03, "muon": 0.02, "shampoo": 0.01}, kwargs=_hf_kwargs,
                                     batch=_token_batch)
BUILTIN["resnet"] = BUILTIN["resmlp"]
BUILTIN["gpt"] = BUILTIN["transformer"]


def transfer_models() -> list[str]:
    """The built-in names ``mupkit transfer`` offers (those with a transfer task)."""
    return sorted(name for name, definition in BUILTIN.items() if definition.transfer)


def load_module(path: str) -> Any:
    """Import a user's ``.py`` file (for ``--model PATH.py:FUNC``)."""
    file = pathlib.Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--model: no file {file}")
    module_spec = importlib.util.spec_from_file_location(f"mupkit_user_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _load_user(spec: str, names: list[str]) -> tuple[Any, Callable[..., torch.nn.Module]]:
    """``PATH.py:FUNC``: the imported file and its ``FUNC``; ``names``: the built-ins, for the error."""
    path, sep, func = spec.rpartition(":")
    if not sep or not path.endswith(".py"):
        raise ValueError(f"--model {spec!r}: use one of {names} or PATH.py:FUNC")
    module = load_module(path)
    if not callable(getattr(module, func, None)):
        raise ValueError(f"--model {spec!r}: {path} has no function {func!r}")
    return module, getattr(module, func)


def load_definition(spec: str) -> ModelDefinition:
    """A built-in name, or ``path.py:func``: ``func(width=..., **kwargs)`` builds the model.

    The file may also define ``batch() -> (inputs, targets)`` and ``loss(output, targets)``;
    without them the batch is synthesized from the model's first layer.
    """
    if spec in BUILTIN:
        return BUILTIN[spec]
    module, constructor = _load_user(spec, sorted(BUILTIN))
    user_batch = getattr(module, "batch", None)
    return ModelDefinition(constructor, (64, 128, 256, 512, 1024),
                           batch=(lambda family: user_batch()) if user_batch else None,
                           loss=getattr(module, "loss", None))


def load_task(spec: str) -> ModelDefinition:
    """A built-in name with a transfer task, or ``path.py:func``: ``func(width=...)`` builds the
    model and the file defines ``train(model, hparams, seed) -> losses``. The definition's
    :attr:`~ModelDefinition.transfer` is set."""
    if spec in BUILTIN and BUILTIN[spec].transfer is not None:
        return BUILTIN[spec]
    module, constructor = _load_user(spec, transfer_models())
    train = getattr(module, "train", None)
    if not callable(train):
        raise ValueError(f"--model {spec!r}: {spec.rpartition(':')[0]} must define train(model, hparams, seed) -> "
                         f"losses, the training run each sweep point makes")
    return ModelDefinition(constructor, (64, 128, 256, 512, 1024),
                           transfer=TransferTask((64, 128, 256, 512), tuple(range(-12, -3)),
                                                 functools.partial(_user_trainer, spec, train)))


def _user_trainer(spec: str, train: TrainFn, steps: int, **knobs: Any) -> TrainFn:
    """A user file's ``train``: it sets its own steps, batch and schedule, so other knobs are refused."""
    if knobs:
        raise ValueError(f"--model {spec!r}: its train(model, hparams, seed) sets its own training knobs; "
                         f"{sorted(knobs)} (--batches, --schedule, --optim) apply to built-in models only")
    return train
