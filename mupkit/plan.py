"""The scaling plan: an immutable mapping parameter FQN -> :class:`ParamSpec`.

The plan is plain data, stored on the root module (``module._mupkit_plan``), never as
attributes on tensors, so it follows ``copy.deepcopy``, pickling, DDP (``module.``),
``torch.compile`` (``_orig_mod.``) and FSDP2 ``fully_shard`` (new DTensor parameters, same
names). :func:`plan_of` finds it through those wrappers.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Mapping

from torch import nn

from .roles import Role
from .rules import DepthRule, RoleRule, Scales, family_scales
from .shapes import ParamShapes, width_multipliers

PLAN_ATTR = "_mupkit_plan"


@dataclass(frozen=True)
class ParamSpec:
    """Everything mupkit decided about one parameter.

    ``init_scale``: the parametrization's init std relative to the user's init at the base
    size (absorbed forward multipliers included); ``base_init_std``: that base std, measured
    from the user's constructor (``None`` when the init is constant, e.g. zeros or ones, or
    unknown); ``scales``: family -> LR/WD/eps multipliers (see :mod:`mupkit.rules`).
    ``absorbed``: the forward multiplier folded into this parameter (``W' = c W``: a readout's
    ``1/m_in``, a residual branch's ``m_L^-alpha``), part of ``init_scale``; it scales the whole
    tensor, mean included, where the init-std rule scales only the deviation from the mean.
    ``block``: the name template (``blocks.*.mlp.0.weight``) of a parameter in a repeated block,
    ``m_depth = L / L_base`` of its container, ``branch_output``: it ends a residual branch and
    carries the branch multiplier in its init and LR. ``op_forward``: the forward multiplier
    the parameter's own unit-scaled op applies (u-muP's ``A_W``; never absorbed).
    ``role_source``: where the role's axes came from (``trace``, ``module type``, ``shape``,
    ``layouts=``, ``unit module``).
    """

    name: str
    role: Role
    base: tuple[int, ...]
    target: tuple[int, ...]
    infinite: tuple[bool, ...]
    m_in: float
    m_out: float
    init_scale: float
    scales: Mapping[str, Scales]
    base_init_std: float | None = None
    fan_out_axis: int | None = None
    fan_in_axis: int | None = None
    aliases: tuple[str, ...] = ()
    tied_readouts: tuple[str, ...] = ()
    block: str | None = None
    m_depth: float = 1.0
    branch_output: bool = False
    absorbed: float = 1.0
    op_forward: float = 1.0
    role_source: str = ""

    @property
    def init_std(self) -> float | None:
        """Target init std: ``base_init_std * init_scale`` (None when constant or unknown)."""
        return None if self.base_init_std is None else self.base_init_std * self.init_scale

    @property
    def multipliers(self) -> tuple[float, ...]:
        return width_multipliers(self.base, self.target, self.infinite)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["role"] = self.role.value
        d["scales"] = {fam: asdict(s) for fam, s in self.scales.items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ParamSpec":
        d = dict(d)
        d["role"] = Role(d["role"])
        d["scales"] = {fam: Scales(**s) for fam, s in d["scales"].items()}
        for key in ("base", "target", "infinite", "aliases", "tied_readouts"):
            d[key] = tuple(d[key])
        return cls(**d)


def make_spec(name: str, shapes: ParamShapes, role: Role, rule: RoleRule, *, m_in: float, m_out: float,
              init_scale: float, absorbed: float, lr_absorbed: float | None = None, depth: DepthRule | None = None,
              m_depth: float = 1.0, **fields: Any) -> ParamSpec:
    """The one way a :class:`ParamSpec` is made: ``rule`` at ``(m_in, m_out)`` gives the LR /
    WD / eps multipliers of every optimizer family (:func:`mupkit.rules.family_scales`; the
    spectral rule of a Muon-stepped matrix from its base shape and fan axes), with the forward multiplier ``absorbed``
    folded in (:func:`mupkit.rules.absorb`; ``lr_absorbed`` when the optimizer sees another
    factor, e.g. a u-muP bias under its weight's ``A_W``) and the depth rule inside blocks."""
    scales = family_scales(rule, role, shapes.base, (fields.get("fan_out_axis"), fields.get("fan_in_axis")),
                           m_in, m_out, absorbed=absorbed if lr_absorbed is None else lr_absorbed, depth=depth,
                           m_depth=m_depth)
    return ParamSpec(name=name, role=role, base=shapes.base, target=shapes.target, infinite=shapes.infinite,
                     m_in=m_in, m_out=m_out, init_scale=init_scale, scales=scales, absorbed=absorbed,
                     m_depth=m_depth, **fields)


@dataclass(frozen=True)
class DepthInfo:
    """How base and target differ in depth: block containers ``{FQN: (L_base, L)}``, the depth
    rule's ``alpha`` (None: no rule), the module templates whose weights carry the branch
    multiplier, the constructor kwargs that set the depth, and whether u-muP's modules scale
    the branches themselves."""

    blocks: Mapping[str, tuple[int, int]]
    alpha: float | None = None
    branch_outputs: tuple[str, ...] = ()
    kwargs: tuple[str, ...] = ()
    unit_scaled: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"blocks": {c: list(v) for c, v in self.blocks.items()}, "alpha": self.alpha,
                "branch_outputs": list(self.branch_outputs), "kwargs": list(self.kwargs),
                "unit_scaled": self.unit_scaled}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DepthInfo":
        return cls({c: tuple(v) for c, v in d["blocks"].items()}, d.get("alpha"), tuple(d.get("branch_outputs", ())),
                   tuple(d.get("kwargs", ())), bool(d.get("unit_scaled", False)))


@dataclass(frozen=True)
class Plan(Mapping[str, ParamSpec]):
    """Immutable mapping FQN -> :class:`ParamSpec`, plus what the forward needs beyond it.

    ``input_multipliers`` / ``output_multipliers``: module FQN -> factor applied to the module's
    first input / output (a readout tied to an embedding, whose ``1/m_in`` cannot be absorbed
    into the shared weight). ``depth``: a :class:`DepthInfo` when base and target differ in
    depth. What the usage trace (:mod:`mupkit.trace`) saw: ``readouts``, the parameters whose
    contraction produces the model's output; ``output_modules``, the module calls returning it
    (a readout layer and the wrappers around it); ``constant_modules``, modules whose outputs
    depend on no parameter (rotary tables); ``notes``, warnings about the forward (attention
    at ``1/sqrt(d)``, width-dependent constants).
    """

    parametrization: str
    specs: Mapping[str, ParamSpec]
    input_multipliers: Mapping[str, float] = field(default_factory=dict)
    sizes: Mapping[str, Any] = field(default_factory=dict)
    depth: DepthInfo | None = None
    output_multipliers: Mapping[str, float] = field(default_factory=dict)
    readouts: tuple[str, ...] = ()
    output_modules: tuple[str, ...] = ()
    constant_modules: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def __getitem__(self, name: str) -> ParamSpec:
        return self.specs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    @property
    def at_base(self) -> bool:
        """True when every width multiplier is 1 (the target is the base model)."""
        return all(m == 1.0 for s in self.specs.values() for m in s.multipliers) and \
            all(s.m_depth == 1.0 for s in self.specs.values())

    def to_json(self, path: str | None = None) -> str:
        """Serialize (``sizes`` values that JSON cannot hold are stored as their ``repr``)."""
        text = json.dumps({"format": "mupkit-plan/1", "parametrization": self.parametrization,
                           "sizes": self.sizes, "input_multipliers": dict(self.input_multipliers),
                           "output_multipliers": dict(self.output_multipliers),
                           "depth": None if self.depth is None else self.depth.to_dict(),
                           "readouts": list(self.readouts), "output_modules": list(self.output_modules),
                           "constant_modules": list(self.constant_modules), "notes": list(self.notes),
                           "specs": [s.to_dict() for s in self.specs.values()]}, indent=1, default=repr)
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str) -> "Plan":
        text = text_or_path
        if not text_or_path.lstrip().startswith("{"):
            with open(text_or_path) as f:
                text = f.read()
        d = json.loads(text)
        if d.get("format") != "mupkit-plan/1":
            raise ValueError(f"not a mupkit plan file (format {d.get('format')!r}, expected 'mupkit-plan/1')")
        specs = {s["name"]: ParamSpec.from_dict(s) for s in d["specs"]}
        depth = d.get("depth") or None  # files written before DepthInfo hold {} for "no depth"
        return cls(d["parametrization"], specs, d["input_multipliers"], d["sizes"],
                   None if depth is None else DepthInfo.from_dict(depth), d.get("output_multipliers", {}),
                   tuple(d.get("readouts", ())), tuple(d.get("output_modules", ())),
                   tuple(d.get("constant_modules", ())), tuple(d.get("notes", ())))


_WRAPPER_ATTRS = ("module", "_orig_mod")  # DDP / DataParallel, torch.compile


def plan_owner(model: nn.Module) -> nn.Module:
    """The module that carries the plan, looking through DDP, DataParallel and torch.compile."""
    seen = model
    while vars(seen).get(PLAN_ATTR) is None:  # not getattr: torch.compile forwards attribute lookups
        inner = next((getattr(seen, a) for a in _WRAPPER_ATTRS if isinstance(getattr(seen, a, None), nn.Module)),
                     None)
        if inner is None:
            raise ValueError(f"{type(model).__name__} has no mupkit plan. Create the model with "
                             f"mupkit.build(...), or call mupkit.parametrize(model, plan) on it first.")
        seen = inner
    return seen


def plan_of(model: nn.Module) -> Plan:
    """The plan attached to ``model`` (through DDP ``module.``, ``torch.compile`` and FSDP2)."""
    return getattr(plan_owner(model), PLAN_ATTR)


def has_plan(model: nn.Module) -> bool:
    try:
        plan_owner(model)
    except ValueError:
        return False
    return True
