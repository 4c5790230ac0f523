"""Parametrizations as data: tables of width exponents per role and optimizer family.

Every rule is a :class:`Power` ``m_in**a * m_out**b`` of the fan-in and fan-out width
multipliers (``m = dim / base_dim``), so it equals 1 at the base size: muP and SP coincide
there exactly. Tables are written in the Table 8 form of Tensor Programs V (Yang et al. 2022,
App. J: "alternative (equivalent) muP formulation", the one microsoft/mup implements):

=========  ===========  ==============  ==========  ================  ==============
role       init std     forward mult    Adam LR     SGD LR            Adafactor LR
=========  ===========  ==============  ==========  ================  ==============
input      1            1               1           m_out             1
vector     1            1               1           m_out             1
hidden     m_in^-1/2    1               m_in^-1     m_out / m_in      m_in^-1/2
output     1            m_in^-1         1           m_in              1
scalar     1            1               1           1                 1
=========  ===========  ==============  ==========  ================  ==============

The Adafactor column (parameter scaling on) is derived, not tabulated in TP5: its step is
``rho * RMS(W)`` times a gradient-scale-free direction, so its LR exponent is Adam's minus the
init-scale exponent (Everett et al. 2024, Sec. 3; abc-parametrization algebra): hidden
``m_in^-1 / m_in^-1/2``; input and output ``1``. A test checks this identity on every row.

Init stds are relative to the user's own init at the base size. With the *coupled* weight-
decay policy the WD multiplier is ``1 / lr_mult`` so the per-step decay ``lr * wd`` is
width-invariant (mup 1.0.0 semantics).

A forward multiplier ``c`` on a weight ``W`` is the same model as the weight ``W' = c W``
with no multiplier; training is the same when the optimizer's hyperparameters are mapped by
:func:`absorb` (exact, derivation in its docstring). mupkit absorbs the readout multiplier
this way (giving Table 3's output init ``1/m_in`` and LR ``1/m_in``), so a plain ``nn.Linear``
readout needs no wrapper and no forward cost; a readout tied to an embedding cannot absorb
it and gets an explicit input multiplier instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from .roles import Role


@dataclass(frozen=True)
class Power:
    """The width rule ``m_in**a * m_out**b``."""

    a: float = 0.0
    b: float = 0.0

    def __call__(self, m_in: float, m_out: float) -> float:
        return m_in ** self.a * m_out ** self.b


ONE = Power()


@dataclass(frozen=True)
class Family:
    """How an optimizer's update reacts to reparametrizing a weight ``W' = c W``.

    ``update``: ``"adam"`` for entrywise-normalized updates (Adam, AdamW, RMSprop, Adagrad,
    Lion), ``"sgd"`` for updates proportional to the gradient. ``lr_power`` and ``wd_power``:
    absorbing ``c`` maps ``lr -> lr * c**lr_power`` and ``wd -> wd * c**-wd_power``.
    ``decoupled_wd``: decay ``W -= lr * wd * W`` outside the gradient (AdamW) rather than an L2
    term added to the gradient (torch Adam, SGD). ``eps_power``: absorbing ``c`` maps ``eps ->
    eps * c**eps_power`` (Adam's eps sits in gradient units, ``-1``; Adafactor's ``eps2`` is a
    floor on the parameter RMS, in parameter units, ``+1``).

    ``"adafactor"`` updates are relative to the parameter's RMS (Adafactor with parameter
    scaling; Shazeer & Stern 2018, Sec. 8): ``W' = c W`` steps ``c`` times further by itself, so
    ``lr_power = 0``, and its decay ``W *= 1 - rho wd`` does not involve ``lr``, so ``wd_power = 0``.
    """

    name: str
    update: str
    lr_power: int
    wd_power: int
    has_eps: bool
    decoupled_wd: bool
    eps_power: int = -1


FAMILIES: dict[str, Family] = {
    "adam": Family("adam", "adam", lr_power=1, wd_power=2, has_eps=True, decoupled_wd=False),
    "adamw": Family("adamw", "adam", lr_power=1, wd_power=1, has_eps=True, decoupled_wd=True),
    "sgd": Family("sgd", "sgd", lr_power=2, wd_power=2, has_eps=False, decoupled_wd=False, eps_power=0),
    "adafactor": Family("adafactor", "adafactor", lr_power=0, wd_power=0, has_eps=True, decoupled_wd=True,
                        eps_power=1),
}


@dataclass(frozen=True)
class RoleRule:
    """One row of a parametrization table. ``lr`` is keyed by :attr:`Family.update`."""

    init: Power = ONE
    forward: Power = ONE
    lr: Mapping[str, Power] = field(default_factory=lambda: {"adam": ONE, "sgd": ONE, "adafactor": ONE})
    eps: Power = ONE


@dataclass(frozen=True)
class Parametrization:
    """A named table ``role -> RoleRule``; new parametrizations are new tables."""

    name: str
    rules: Mapping[Role, RoleRule]
    rescales: bool = True  # False (SP): keep the user's init at every size; no width dim required


_VECTOR_LIKE = RoleRule(lr={"adam": ONE, "sgd": Power(b=1), "adafactor": ONE})

MUP = Parametrization("mup", {
    Role.INPUT: _VECTOR_LIKE,
    Role.VECTOR: _VECTOR_LIKE,
    Role.HIDDEN: RoleRule(init=Power(a=-0.5), lr={"adam": Power(a=-1), "sgd": Power(a=-1, b=1),
                                                  "adafactor": Power(a=-0.5)}),
    Role.OUTPUT: RoleRule(forward=Power(a=-1), lr={"adam": ONE, "sgd": Power(a=1), "adafactor": ONE}),
    Role.SCALAR: RoleRule(),
})

SP = Parametrization("sp", {role: RoleRule() for role in Role}, rescales=False)

PARAMETRIZATIONS: dict[str, Parametrization] = {p.name: p for p in (SP, MUP)}


@dataclass(frozen=True)
class Scales:
    """Per-parameter optimizer multipliers for one family."""

    lr: float
    wd: float
    eps: float


def absorbed_init_scale(rule: RoleRule, m_in: float, m_out: float) -> float:
    """Init std relative to the base with the forward multiplier ``c`` absorbed (``W' = c W``)."""
    return rule.init(m_in, m_out) * rule.forward(m_in, m_out)


def scales_for(rule: RoleRule, family: Family, m_in: float, m_out: float, absorbed: float = 1.0) -> Scales:
    """LR, coupled-WD and eps multipliers of one parameter, with forward mult ``absorbed`` folded in.

    For the ``adafactor`` family, ``eps`` scales the RMS floor ``eps2`` and follows the init
    scale, so a zero-initialized tensor steps as its muP init would.
    """
    lr = rule.lr[family.update](m_in, m_out)
    eps = rule.init(m_in, m_out) if family.update == "adafactor" else rule.eps(m_in, m_out)
    return absorb(Scales(lr=lr, wd=1.0 / lr, eps=eps), family, absorbed)


def absorb(scales: Scales, family: Family, c: float) -> Scales:
    """Fold a forward multiplier ``c`` of a weight ``W`` into the optimizer of ``W' = c W``.

    With ``g' = dL/dW'``, the gradient of ``W`` is ``c g'``. Then, step for step:

    * SGD with L2: ``W' <- W' - c^2 lr g' - lr wd W'``: lr ``* c^2``, wd ``* c^-2``;
    * Adam with L2 (``g += wd W``): moments of ``W`` are ``c`` (resp. ``c^2``) times those of
      ``W'`` on ``g' + wd c^-2 W'``, so lr ``* c``, eps ``/ c``, wd ``* c^-2``;
    * AdamW (decay outside the gradient): lr ``* c``, eps ``/ c``, wd ``/ c`` (same ``lr * wd``);
    * Adafactor (step ``rho * RMS(W) * U`` with ``U`` invariant to the gradient's scale): lr and
      wd unchanged, the RMS floor ``eps2 * c``.

    The init std is multiplied by ``c`` separately (``W' = c W``).
    """
    if c == 1.0:
        return scales
    return Scales(lr=scales.lr * c ** family.lr_power,
                  wd=scales.wd * c ** -family.wd_power,
                  eps=scales.eps * c ** family.eps_power)


def get_parametrization(name: str | Parametrization) -> Parametrization:
    if isinstance(name, Parametrization):
        return name
    try:
        return PARAMETRIZATIONS[name]
    except KeyError:
        raise ValueError(f"unknown parametrization {name!r}; choose one of {sorted(PARAMETRIZATIONS)}") from None
