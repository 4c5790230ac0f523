"""What the usage traces of the base and delta models say about the forward pass itself.

muP fixes the init, LR and multipliers of the parameters; a forward pass can still scale with
width on its own, and then the plan is wrong without knowing it. Two traces (:mod:`mupkit.trace`)
at the base and delta widths, compared op by op (same module, same op, same occurrence), show:

* **attention at** ``1/sqrt(d)`` while the head dim ``d`` scales: muP scales attention logits by
  ``1/d`` (Tensor Programs V, Sec. 4 and App. B: after training queries and keys correlate, so
  ``q.k`` grows like ``d``). A fused attention call's scale, or an eager ``(q @ k^T) * c``, whose
  width exponent is ``-1/2`` is reported; ``-1`` (e.g. :func:`mupkit.nn.attention_scale`) is muP's;
* **width-dependent constants**: any other floating-point constant an op receives that differs
  between the two traces (T5's ``d_model**-0.5`` before a tied readout, a positional embedding
  scaled by ``dim**-0.5``, a hand-made readout multiplier ``1/width``): a multiplier the plan
  does not know about, applied on top of the plan's own.

The exponent of a constant ``c`` is ``log(c_delta / c_base) / log(m)``, with ``m`` the delta's
width multiplier (the head-dim ratio for attention calls). A divisor is turned into a factor first.
"""

from __future__ import annotations

import math

from .shapes import name_template
from .trace import Trace

#: width exponents of an attention logit scale: muP's ``1/d`` (TP5 Sec. 4; what
#: :func:`mupkit.nn.attention_scale` gives) and SP's ``1/sqrt(d)``; and how close a measured one must be
MUP_ATTENTION_EXPONENT, SP_ATTENTION_EXPONENT, EXPONENT_TOLERANCE = -1.0, -0.5, 0.05


class ForwardScalingWarning(UserWarning):
    """The forward pass scales something with width that the plan does not account for."""


def _exponent(base: float, delta: float, ratio: float) -> float | None:
    if base == delta or base == 0 or delta == 0 or (base > 0) != (delta > 0) or ratio == 1.0:
        return None
    return math.log(delta / base) / math.log(ratio)


def _near(exponent: float | None, law: float) -> bool:
    return exponent is not None and abs(exponent - law) < EXPONENT_TOLERANCE


def _where(module: str) -> str:
    return f"module {module!r}" if module else "the model's own forward"


def forward_notes(base: Trace, delta: Trace, width_ratio: float) -> list[str]:
    """One sentence per width-dependent scale the forward applies (see the module docstring)."""
    notes = []
    delta_calls = {(a.module, a.occurrence): a for a in delta.attention}
    seen_attention = set()
    for a in base.attention:
        d = delta_calls.get((a.module, a.occurrence))
        where = name_template(a.module)
        if d is None or d.head_dim == a.head_dim or where in seen_attention:
            continue
        e = _exponent(a.scale, d.scale, d.head_dim / a.head_dim)
        if _near(e, MUP_ATTENTION_EXPONENT):
            continue
        seen_attention.add(where)
        law = "a constant" if e is None else "1/sqrt(d)" if _near(e, SP_ATTENTION_EXPONENT) else f"d^{e:+.2f}"
        notes.append(f"attention in {_where(where)} scales its logits by {law} while the head dim d scales "
                     f"({a.head_dim} -> {d.head_dim}); muP needs 1/d: pass scale=mupkit.nn.attention_scale(d, "
                     f"base_head_dim) (HF models: mupkit.integrations.hf.mup_attention(model, base_head_dim)).")
    seen = set()
    for key, c in base.constants.items():
        other = delta.constants.get(key)
        if other is None or len(other.values) != len(c.values) or other.values == c.values:
            continue
        module, op, _ = key
        module = name_template(module)
        divides = op.startswith("aten.div")
        for vb, vd in zip(c.values, other.values):
            fb, fd = (1 / vb, 1 / vd) if divides and vb and vd else (vb, vd)
            e = _exponent(fb, fd, width_ratio)
            if e is None or (module, op, round(e, 2)) in seen:
                continue
            if c.logits and _near(e, MUP_ATTENTION_EXPONENT):
                continue  # muP's 1/d attention law in an eager attention
            seen.add((module, op, round(e, 2)))
            if c.logits and _near(e, SP_ATTENTION_EXPONENT):
                notes.append(f"attention logits in {_where(module)} are scaled by 1/sqrt(d) ({op}: {fb:.4g} at the "
                             f"base, {fd:.4g} at the delta width); muP needs 1/d: use mupkit.nn.attention_scale(d, "
                             f"base_head_dim) there (HF models: mupkit.integrations.hf.mup_attention).")
            else:
                notes.append(f"{op} in {_where(module)} multiplies by a constant that scales like width^{e:+.2g} "
                             f"({fb:.4g} at the base, {fd:.4g} at the delta width): a width-dependent multiplier "
                             f"the plan does not know about, applied on top of muP's. Make it a constant (its base "
                             f"value), unless it is meant to scale.")
    return notes
