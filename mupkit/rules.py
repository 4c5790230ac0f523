"""Parametrizations as data: tables of width exponents per role and optimizer family.

Every rule is a :class:`Power` ``m_in**a * m_out**b`` of the fan-in and fan-out width
multipliers (``m = dim / base_dim``), so it equals 1 at the base size: muP and SP coincide
there exactly. Tables are written in the Table 8 form of Tensor Programs V (Yang et al. 2022,
App. J: "alternative (equivalent) muP formulation", the one microsoft/mup implements):

=========  ===========  ==============  ==========  ================  ==============  ==============
role       init std     forward mult    Adam LR     SGD LR            Adafactor LR    Muon LR
=========  ===========  ==============  ==========  ================  ==============  ==============
input      1            1               1           m_out             1               (AdamW's)
vector     1            1               1           m_out             1               (AdamW's)
hidden     m_in^-1/2    1               m_in^-1     m_out / m_in      m_in^-1/2       spectral
output     1            m_in^-1         1           m_in              1               (AdamW's)
scalar     1            1               1           1                 1               (AdamW's)
=========  ===========  ==============  ==========  ================  ==============  ==============

and for the ``shampoo`` family (same init and forward multipliers):

=========  ====================  ======================
role       Shampoo LR            Shampoo eps (damping)
=========  ====================  ======================
input      m_out^1/2             m_out^-1/2
vector     1                     m_out^-1
hidden     (m_out / m_in)^1/2    (m_in / m_out)^1/2
output     m_in^1/2              m_in^-1/2
scalar     1                     1
=========  ====================  ======================

The Adafactor column (parameter scaling on) is derived, not tabulated in TP5: its step is
``rho * RMS(W)`` times a gradient-scale-free direction, so its LR exponent is Adam's minus the
init-scale exponent (Everett et al. 2024, Sec. 3; abc-parametrization algebra): hidden
``m_in^-1 / m_in^-1/2``; input and output ``1``. A test checks this identity on every row.

The Muon columns (families ``muon`` and ``muon-rms``, one per ``torch.optim.Muon``
``adjust_lr_fn``) are derived from the spectral condition (:mod:`mupkit.spectral`): a hidden
matrix gets ``[sqrt(A/B) / adjust(A, B)] / [sqrt(A0/B0) / adjust(A0, B0)]`` from its base and
target shapes (1 for ``"original"`` when fan-out >= fan-in, ``m^-1/2`` for a square matrix under
``"match_rms_adamw"``); the other roles are stepped by Muon's AdamW part with the ``adamw``
family's multipliers (:attr:`Family.roles`). See docs/muon.md for the derivation.

The Shampoo table (family ``shampoo``: heavyball's SOAP, Shampoo's eigenbasis with Adam inside;
docs/shampoo.md) follows the one-step argument of Ishikawa & Karakida 2024 (ICLR, Sec. 4; not
checked against their Table 1): once its damping is negligible, a preconditioned matrix steps ``lr * U V^T`` (the gradient's polar factor,
spectral norm 1 whatever the gradient's scale), so the spectral condition gives LR
``sqrt(m_out / m_in)`` for input and hidden matrices and, with the readout's ``1/m_in`` forward
multiplier, ``m_in^1/2`` in this table (``m_in^-1/2`` once absorbed); vectors are stepped by
SOAP's plain Adam (LR 1). The damping (SOAP's ``eps``, a floor on ``sqrt(v)`` in the rotated
basis) must keep a fixed ratio to the gradient's singular values, ``sqrt(m_in / m_out)`` (input
``m_out^-1/2``, hidden 1, readout ``m_in^-1/2`` here, ``m_in^1/2`` once absorbed), and to a
vector's gradient entries, ``m_out^-1``: a fixed eps moves SOAP from Shampoo's regime (signal
normalized, the rest damped) towards Adam's (every rotated coordinate normalized) as width
grows, which no LR rule can follow (:attr:`RoleRule.damping`). These per-role damping exponents
hold where a layer's role sets its gradient's scale; under muP's ``1/d`` attention the query and
key gradients shrink faster than their role's, so ``mupkit.optim.SOAP`` damps relative to each
parameter's own gradient by default and uses this column only with ``damping="absolute"`` (and
the ``param_groups(optimizer=heavyball.SOAP)`` route).

u-muP (:data:`UMUP`) is a table of the same form evaluated at the parameters' own fans (as if
the base width were 1), with the forward multipliers applied by unit-scaled ops.

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
from .spectral import SpectralLR, matrix_fans


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

    ``"muon"``/``"muon-rms"`` updates are orthogonalized (invariant to the gradient's scale, as
    Adam's are), so absorbing ``c`` maps them like AdamW's. ``roles``: the roles the optimizer
    steps with this family's rule (None: every role); Muon orthogonalizes hidden matrices only
    and steps the other roles with :attr:`companion`'s rule (its AdamW part).

    ``"shampoo"`` updates (SOAP: Adam in the eigenbasis of Shampoo's factors) are invariant to
    the gradient's scale once the damping follows it, so absorbing ``c`` maps lr and wd as
    AdamW's; SOAP's eps floors ``sqrt(v)`` in gradient units (``eps_power = -1``).
    """

    name: str
    update: str
    lr_power: int
    wd_power: int
    has_eps: bool
    decoupled_wd: bool
    eps_power: int = -1
    roles: frozenset[Role] | None = None
    companion: str | None = None

    def steps(self, role: Role) -> bool:
        """Whether this family's own rule steps a parameter of ``role`` (else :attr:`companion`'s)."""
        return self.roles is None or role in self.roles


FAMILIES: dict[str, Family] = {
    "adam": Family("adam", "adam", lr_power=1, wd_power=2, has_eps=True, decoupled_wd=False),
    "adamw": Family("adamw", "adam", lr_power=1, wd_power=1, has_eps=True, decoupled_wd=True),
    "sgd": Family("sgd", "sgd", lr_power=2, wd_power=2, has_eps=False, decoupled_wd=False, eps_power=0),
    "adafactor": Family("adafactor", "adafactor", lr_power=0, wd_power=0, has_eps=True, decoupled_wd=True,
                        eps_power=1),
    "muon": Family("muon", "muon", lr_power=1, wd_power=1, has_eps=False, decoupled_wd=True, eps_power=0,
                   roles=frozenset({Role.HIDDEN}), companion="adamw"),
    "muon-rms": Family("muon-rms", "muon-rms", lr_power=1, wd_power=1, has_eps=False, decoupled_wd=True,
                       eps_power=0, roles=frozenset({Role.HIDDEN}), companion="adamw"),
    "shampoo": Family("shampoo", "shampoo", lr_power=1, wd_power=1, has_eps=True, decoupled_wd=True),
}

#: the family of each ``torch.optim.Muon`` ``adjust_lr_fn`` (None is ``"original"``)
MUON_FAMILIES = {None: "muon", "original": "muon", "match_rms_adamw": "muon-rms"}

#: every family's LR rule keyed by :attr:`Family.update`: 1 (tables override per role)
_ALL_ONE = {"adam": ONE, "sgd": ONE, "adafactor": ONE, "muon": ONE, "muon-rms": ONE, "shampoo": ONE}


@dataclass(frozen=True)
class RoleRule:
    """One row of a parametrization table. ``lr`` is keyed by :attr:`Family.update`; a
    :class:`~mupkit.spectral.SpectralLR` rule depends on the matrix's base fans too."""

    init: Power = ONE
    forward: Power = ONE
    lr: Mapping[str, Power | SpectralLR] = field(default_factory=lambda: dict(_ALL_ONE))
    eps: Power = ONE
    #: eps rules of preconditioning families keyed by :attr:`Family.update` (their damping sits
    #: in the gradient's units and must follow its scale); the other families use ``eps``
    damping: Mapping[str, Power] = field(default_factory=dict)


@dataclass(frozen=True)
class DepthRule:
    """The depth rules for parameters of repeated residual blocks, ``m_L = L / L_base``.

    The alpha-family of CompleteP (Dey et al. 2025, Table 1), which contains Depth-muP (Yang et
    al. 2023, TP VI; Bordelon et al. 2023) at ``alpha = 1/2`` and CompleteP at ``alpha = 1``:

    * each residual branch is multiplied by ``m_L^-alpha`` (folded into the branch's last layer);
    * LR of every parameter inside the blocks (weights, biases, norm gains): ``m_L^(alpha - 1)``
      for entrywise-normalized and parameter-relative updates (Adam, AdamW, Adafactor); for SGD,
      whose gradient already carries the branch multiplier, ``m_L^(2 alpha - 1)`` (the same
      per-block contribution ``1/L``; TP VI: no depth factor at ``alpha = 1/2``);
    * Adam eps: ``m_N^-1 m_L^-alpha`` inside the blocks (``m_N`` the parameter's width
      multiplier), ``m_N^-1`` elsewhere: the table's muP column, applied to every group as
      nanoGPT-mup does, and also when base and target have the same depth (plain ``"mup"`` keeps
      eps fixed, as microsoft/mup does);
    * no depth factor on init: the init is the user's, measured at the base depth;
    * weight decay: no depth factor (the table's hidden WD ``lambda m_N`` at every alpha), so the
      coupled per-step decay ``lr * wd`` goes like ``m_L^(alpha - 1)`` inside the blocks, as the
      LR does (depth-independent at ``alpha = 1``).
    """

    alpha: float
    #: unit-scaled residuals (u-muP): the branch weight ``tau`` is applied in the forward only
    #: (:func:`mupkit.unit.functional.residual_add`), so SGD's gradient does not carry it and takes
    #: Adam's ``m_L^(alpha - 1)``; gradients are unit-scaled, so eps keeps no width or depth factor
    unit_scaled: bool = False

    def branch_multiplier(self, m_depth: float) -> float:
        return m_depth ** -self.alpha

    def lr(self, update: str, m_depth: float) -> float:
        sgd_carries_branch = update == "sgd" and not self.unit_scaled
        return m_depth ** ((2 * self.alpha - 1) if sgd_carries_branch else (self.alpha - 1))

    def eps(self, m_width: float, m_depth: float) -> float:
        return 1.0 if self.unit_scaled else m_width ** -1 * m_depth ** -self.alpha

    @property
    def block_update_exponent(self) -> float:
        """The per-block relative update ``||dW|| / ||W||`` goes like ``m_L^(alpha - 1)``: each block
        adds ``m_L^-alpha`` times it, ``1/L`` of the stream's change (what a depth coordinate check expects)."""
        return self.alpha - 1


DEPTH_RULES: dict[str, DepthRule] = {"depth-mup": DepthRule(0.5), "completep": DepthRule(1.0)}


@dataclass(frozen=True)
class Parametrization:
    """A named table ``role -> RoleRule``; new parametrizations are new tables.

    ``depth``: the rule for repeated residual blocks when base and target differ in depth
    (``None``: depth is not scaled; ``"auto"`` is resolved per model, see :func:`auto_depth`).
    """

    name: str
    rules: Mapping[Role, RoleRule]
    rescales: bool = True  # False (SP): keep the user's init at every size; no width dim required
    depth: DepthRule | str | None = None
    #: rules evaluated at the parameter's own fans, as if the base width were 1 (u-muP has no base
    #: shapes); ``forward`` is then applied by the unit-scaled op or absorbed into a plain layer
    absolute: bool = False
    #: default weight-decay policy for decoupled decay (:func:`mupkit.param_groups`): ``coupled``
    #: (mup's ``lr * wd`` at the base) or ``independent`` of the peak LR (u-muP, Sec. 4.4)
    weight_decay_policy: str = "coupled"


MUP = Parametrization("mup", {
    Role.INPUT: RoleRule(lr={**_ALL_ONE, "sgd": Power(b=1), "shampoo": Power(b=0.5)},
                         damping={"shampoo": Power(b=-0.5)}),
    Role.VECTOR: RoleRule(lr={**_ALL_ONE, "sgd": Power(b=1)}, damping={"shampoo": Power(b=-1)}),
    Role.HIDDEN: RoleRule(init=Power(a=-0.5), lr={"adam": Power(a=-1), "sgd": Power(a=-1, b=1),
                                                  "adafactor": Power(a=-0.5), "muon": SpectralLR("original"),
                                                  "muon-rms": SpectralLR("match_rms_adamw"),
                                                  "shampoo": Power(a=-0.5, b=0.5)},
                          damping={"shampoo": Power(a=0.5, b=-0.5)}),
    Role.OUTPUT: RoleRule(forward=Power(a=-1), lr={**_ALL_ONE, "sgd": Power(a=1), "shampoo": Power(a=0.5)},
                          damping={"shampoo": Power(a=-0.5)}),
    Role.SCALAR: RoleRule(),
})

SP = Parametrization("sp", {role: RoleRule() for role in Role}, rescales=False)


def _same_for_every_family(p: Power) -> dict[str, Power]:
    return {"adam": p, "sgd": p, "adafactor": p}


#: u-muP (Blake et al. 2024, Table 2 and Sec. 4.4), absolute fans: ``A_W`` (forward), ``B_W = 1``
#: (init: unit variance), Adam LR ``C_W``: embedding ``fan_out^-1/2`` (u-muP's empirical rule,
#: replacing muP's 1), hidden ``fan_in^-1/2``, readout, biases and gains 1. Every op is unit-scaled
#: in both passes, so gradients are Theta(1) and an SGD or Adafactor step (``RMS(W) = 1``) has the
#: same size as Adam's: one column for all families (graphcore's ``lr_scale_func_sgd(None)`` is
#: its Adam function). Depth: the residual taus scale branches like ``L^-1/2`` (in the modules)
#: and every parameter of a repeated block gets LR ``x L^-1/2`` (Depth-muP), ``L`` in layers.
UMUP = Parametrization("umup", {
    Role.INPUT: RoleRule(lr=_same_for_every_family(Power(b=-0.5))),
    Role.VECTOR: RoleRule(),
    Role.HIDDEN: RoleRule(forward=Power(a=-0.5), lr=_same_for_every_family(Power(a=-0.5))),
    Role.OUTPUT: RoleRule(forward=Power(a=-1)),
    Role.SCALAR: RoleRule(),
}, depth=DepthRule(0.5, unit_scaled=True), absolute=True, weight_decay_policy="independent")

PARAMETRIZATIONS: dict[str, Parametrization] = {p.name: p for p in (SP, MUP, UMUP)}


@dataclass(frozen=True)
class Scales:
    """Per-parameter optimizer multipliers for one family."""

    lr: float
    wd: float
    eps: float


def absorbed_init_scale(rule: RoleRule, m_in: float, m_out: float) -> float:
    """Init std relative to the base with the forward multiplier ``c`` absorbed (``W' = c W``)."""
    return rule.init(m_in, m_out) * rule.forward(m_in, m_out)


def scales_for(rule: RoleRule, family: Family, m_in: float, m_out: float, absorbed: float = 1.0,
               depth: DepthRule | None = None, m_depth: float = 1.0,
               base_fans: tuple[int, int] | None = None) -> Scales:
    """LR, coupled-WD and eps multipliers of one parameter, with forward mult ``absorbed`` folded in.

    For the ``adafactor`` family, ``eps`` scales the RMS floor ``eps2`` and follows the init
    scale, so a zero-initialized tensor steps as its muP init would. ``depth``/``m_depth``: the
    parametrization's depth rule and the parameter's depth multiplier (1 outside repeated
    blocks; ``absorbed`` includes the branch multiplier when the parameter ends a branch).
    ``base_fans``: ``(fan_out, fan_in)`` of the base matrix, for a spectral (Muon) rule.
    """
    lr_rule = rule.lr[family.update]
    if isinstance(lr_rule, SpectralLR):
        if base_fans is None:
            raise ValueError(f"the {family.name!r} rule needs the matrix's base fans (base_fans=)")
        lr = lr_rule.at(base_fans, m_in, m_out)
    else:
        lr = lr_rule(m_in, m_out)
    wd = 1.0 / lr  # coupled: lr * wd as at the base width; the depth rule adds no WD factor
    eps = rule.init(m_in, m_out) if family.update == "adafactor" else \
        rule.damping.get(family.update, rule.eps)(m_in, m_out)
    if depth is not None:
        lr *= depth.lr(family.update, m_depth)
        if family.update == "adam":
            eps = depth.eps(max(m_in, m_out), m_depth)
    return absorb(Scales(lr=lr, wd=wd, eps=eps), family, absorbed)


def family_scales(rule: RoleRule, role: Role, base: tuple[int, ...], fan_axes: tuple[int | None, int | None],
                  m_in: float, m_out: float, absorbed: float = 1.0, depth: DepthRule | None = None,
                  m_depth: float = 1.0) -> dict[str, Scales]:
    """:func:`scales_for` of every family for one parameter. A family that does not step
    ``role`` itself (Muon: only hidden matrices) gets its companion's multipliers (AdamW's), as
    its optimizer steps the parameter with the companion's rule; a family that would step it but
    has no rule for it (a table without a Muon column, a hidden tensor that is not one matrix)
    is left out, so an optimizer of that family refuses the parameter instead of guessing."""
    out = {}
    fans = matrix_fans(base, *fan_axes)
    for name, family in FAMILIES.items():
        stepped_by = family if family.steps(role) else FAMILIES[family.companion]
        lr_rule = rule.lr.get(stepped_by.update)
        if lr_rule is None or (isinstance(lr_rule, SpectralLR) and fans is None):
            continue
        out[name] = scales_for(rule, stepped_by, m_in, m_out, absorbed=absorbed, depth=depth, m_depth=m_depth,
                               base_fans=fans)
    return out


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


#: accepted names: a width parametrization, a depth rule (with muP in width), or ``width+depth``;
#: ``+depth`` picks the depth rule per model (:func:`auto_depth`)
DEPTH_NAMES = (*DEPTH_RULES, "depth")


def get_parametrization(name: str | Parametrization) -> Parametrization:
    """``"sp"``, ``"mup"``, ``"depth-mup"``, ``"completep"``, or ``"<width>+<depth>"`` such as
    ``"mup+completep"``; ``"mup+depth"`` chooses CompleteP or Depth-muP from the block structure."""
    if isinstance(name, Parametrization):
        return name
    width, _, depth = name.partition("+")
    if not depth and width in DEPTH_NAMES:
        width, depth = "mup", width
    if width not in PARAMETRIZATIONS or (depth and depth not in DEPTH_NAMES):
        raise ValueError(f"unknown parametrization {name!r}; choose one of {sorted(PARAMETRIZATIONS)}, "
                         f"{sorted(DEPTH_RULES)}, or '<width>+<depth>' with depth in {list(DEPTH_NAMES)} "
                         f"(e.g. 'mup+completep').")
    base = PARAMETRIZATIONS[width]
    if not depth:
        return base
    if not base.rescales:
        raise ValueError(f"{name!r}: depth rules build on muP's width rules; use 'mup+{depth}'.")
    if base.absolute:
        raise ValueError(f"{name!r}: u-muP has its own depth rule (residual taus ~ L^-1/2 and LR x L^-1/2, "
                         f"Depth-muP, in mupkit.unit.DepthModuleList blocks); use 'umup', or 'mup+{depth}'.")
    rule = "auto" if depth == "depth" else DEPTH_RULES[depth]
    return Parametrization(f"{width}+{depth}", base.rules, base.rescales, rule)


def auto_depth(layers_per_branch: int) -> DepthRule:
    """CompleteP (``alpha = 1``) for branches with more than one weight layer, such as
    transformer attention and MLP branches, where Depth-muP's theory breaks down (TP VI: a
    unique optimal limit exists only for one-layer blocks); Depth-muP (``alpha = 1/2``) otherwise."""
    return DEPTH_RULES["completep" if layers_per_branch > 1 else "depth-mup"]
