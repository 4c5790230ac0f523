"""A readable table of what mupkit decided for every parameter."""

from __future__ import annotations

from torch import nn

from .plan import ParamSpec, Plan, plan_of
from .rules import FAMILIES

COLUMNS = ("name", "role", "shape", "m_in", "m_out", "m_L", "init std", "fwd mult", "Adam LR x", "SGD LR x",
           "Adafactor LR x", "Muon LR x", "Shampoo LR / eps x", "AdamW WD x", "Adam eps x", "role from")


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def _muon(spec: ParamSpec) -> str:
    """The Muon LR multiplier of a hidden matrix (``"original"``, then ``"match_rms_adamw"``), or
    who steps the parameter instead."""
    if not FAMILIES["muon"].steps(spec.role):
        return "(AdamW part)"
    if "muon" not in spec.scales:
        return "(no rule)"
    return f"{_fmt(spec.scales['muon'].lr)} / {_fmt(spec.scales['muon-rms'].lr)}"


def _shampoo(spec: ParamSpec) -> str:
    """The ``shampoo`` family's LR and damping (eps) multipliers, or ``(no rule)`` (u-muP)."""
    if "shampoo" not in spec.scales:
        return "(no rule)"
    return f"{_fmt(spec.scales['shampoo'].lr)} / {_fmt(spec.scales['shampoo'].eps)}"


def explain_rows(plan: Plan) -> list[tuple[str, ...]]:
    """One row per parameter, in the plan's order (see :data:`COLUMNS`)."""
    rows = []
    for name, s in plan.items():
        fwd = "1" + "".join(f" (x{plan.input_multipliers[m]:.4g} at {m})" for m in s.tied_readouts
                            if m in plan.input_multipliers)
        fwd += "".join(f" (x{f:.4g} on the output of {m or 'the model'})" for m, f in plan.output_multipliers.items()
                       if s.tied_readouts and name in plan.readouts)
        if s.op_forward != 1.0:
            fwd = f"{s.op_forward:.4g} (in op)"
        elif s.absorbed != 1.0 and not s.branch_output:
            fwd = f"{s.absorbed:.4g} (absorbed)"
        if s.branch_output:
            fwd += f" (branch x{s.absorbed:.4g}, absorbed)"
        role = s.role.value + (" (tied readout)" if s.tied_readouts else "")
        if s.role.value == "output" and plan.readouts and name not in plan.readouts:
            role += " (not the model output)"
        rows.append((name, role, "x".join(map(str, s.target)) or "()", _fmt(s.m_in), _fmt(s.m_out),
                     _fmt(s.m_depth) if s.block else "-", _fmt(s.init_std), fwd, _fmt(s.scales["adam"].lr),
                     _fmt(s.scales["sgd"].lr), _fmt(s.scales["adafactor"].lr), _muon(s), _shampoo(s),
                     _fmt(s.scales["adamw"].wd), _fmt(s.scales["adam"].eps), s.role_source or "-"))
    return rows


def explain(model_or_plan: nn.Module | Plan) -> str:
    """The plan as an aligned text table: ``print(mupkit.explain(model))``.

    Multipliers are relative to the base model; init std is the absolute target std ("-" for
    constant inits, e.g. norm gains, which are never rescaled). A readout's ``1/m_in`` forward
    multiplier is absorbed into its init and LR (shown in its row) unless the readout is tied to
    an embedding, in which case the multiplier is applied to the readout's input (shown as
    ``x... at <module>``). With depth scaling, ``m_L = L / L_base`` for parameters of repeated
    blocks, and the last layer of each residual branch shows its absorbed branch multiplier.
    "Muon LR x": the spectral multiplier of a hidden matrix under ``mupkit.optim.Muon`` for
    ``adjust_lr_fn`` ``"original"`` / ``"match_rms_adamw"``, ``[sqrt(A/B)/adjust(A,B)] /
    [sqrt(A0/B0)/adjust(A0,B0)]`` (:mod:`mupkit.spectral`); the other roles are stepped by Muon's
    AdamW part with the AdamW multipliers. "Shampoo LR / eps x": the ``shampoo`` family's LR and
    per-role damping multipliers (heavyball's SOAP; the table and its derivation:
    :mod:`mupkit.rules`, docs/shampoo.md); ``mupkit.optim.SOAP``'s default relative damping
    follows each parameter's gradient instead of the eps multiplier.
    An ``output`` parameter that does not produce the model's output (an MoE router) says so;
    "role from" is where its axes came from (the usage trace, ``layouts=``, the module type, or
    the shape alone). Warnings about the forward (attention at ``1/sqrt(d)``, width-dependent
    constants) close the table.
    """
    plan = model_or_plan if isinstance(model_or_plan, Plan) else plan_of(model_or_plan)
    rows = [COLUMNS, *explain_rows(plan)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    sizes = plan.sizes
    head = f"mupkit plan: {plan.parametrization}"
    if plan.parametrization == "umup":
        head += ("  (absolute: m_in/m_out are the fans, as if the base width were 1; ops carry the forward "
                 "multipliers and unit-scale every gradient)")
    if sizes:
        head += f"  base={sizes.get('base')}  target={sizes.get('target')}"
    depth = plan.depth
    if depth is not None:
        blocks = ", ".join(f"{c}: {lb} -> {l} blocks" for c, (lb, l) in depth.blocks.items())
        if depth.unit_scaled:
            head += (f"\ndepth: {blocks}; u-muP: residual taus ~ L^-1/2 in the modules, LR x L^-1/2 inside blocks "
                     f"(L in layers)")
        elif depth.alpha is None:
            head += f"\ndepth: {blocks}; no depth rule (plain {plan.parametrization}): branches are not scaled"
        else:
            head += (f"\ndepth: {blocks}; alpha = {depth.alpha:g} (branch x m_L^-alpha, LR x m_L^(alpha-1) "
                     f"inside blocks); branch outputs {', '.join(depth.branch_outputs)}")
            if plan.parametrization.endswith("+depth"):  # the rule was chosen from the block structure
                chosen = "CompleteP" if depth.alpha == 1.0 else "Depth-muP"
                head += (f"\n{chosen} chosen by '+depth': CompleteP (Dey et al. 2025) for blocks with multi-layer "
                         f"branches (transformer layers), where Depth-muP's theory breaks down (Yang et al. 2023), "
                         f"Depth-muP for one-layer branches.")
    notes = [f"warning: {note}" for note in plan.notes]
    return "\n".join([head, *lines, *notes])
