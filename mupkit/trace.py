"""Usage trace: how one forward of the model uses each parameter.

mupkit runs the base model once on the CPU (eval mode, no grad) on a small batch, under a
:class:`~torch.utils._python_dispatch.TorchDispatchMode`, so it sees the aten ops every
``nn.Linear``, ``F.linear``, ``@``, ``einsum``, convolution, embedding lookup or expert
``bmm`` decomposes into, whatever module (or none) holds the parameter. Tensors are sorted into
three kinds:

* *weight-space*: computed from parameters (and constants) only: a parameter, ``W.t()``,
  ``W.to(bf16)``, ``W.view(E, d, f)``, ``torch.cat([Wq, Wk])``. Each carries, per parameter,
  which parameter axes every one of its axes covers, so views, transposes, reshapes and casts
  never lose track of a parameter's fan-in and fan-out;
* *activations*: computed from the model's inputs;
* constants (buffers, ``arange``, masks): neither.

An op that takes both a weight-space tensor and an activation is a *use* of the parameters
behind it. Contractions (``mm``, ``addmm``, ``bmm``, ``baddbmm``, ``convolution``,
``_grouped_mm``) give each axis a part: ``contracted`` (fan-in), ``kept`` (fan-out) or
``batch`` (an expert index); lookups (``embedding``, ``index``, ``index_select``) give the
looked-up axis the fan-in part and the rest fan-out, unless the picked rows are then
contracted with an activation (``W[expert_ids] @ x``: the pick was an expert selection, a
batch axis); an op whose weight operand broadcasts to its output is ``elementwise`` (gains,
biases, positional tables, norms); any other op (a fused kernel) is not read, and the module
type decides. Tensor Programs V's roles (Sec. 4: which of fan-in and fan-out grow with width)
follow from these parts and the width dims: see :func:`mupkit.roles.assign_roles`.

The trace also records what later steps need: which contraction produces the model's output
(the readout, through views, casts and constant multipliers), which module calls return that
output (wrappers), which module outputs depend on no parameter (rotary tables), the residual
adds and the parameters each activation is linear in (for depth, :mod:`mupkit.depth`),
attention calls with their head dim and scale, and every floating-point constant an op
receives, keyed by module and occurrence so two traces (base and delta) can be compared for
width-dependent constants.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten

#: parts an axis plays in a use
CONTRACTED, KEPT, BATCH, LOOKUP = "contracted", "kept", "batch", "lookup"

#: axis map of a weight-space tensor: parameter FQN -> per tensor axis, the parameter axes it covers
AxisMap = dict[str, tuple[frozenset, ...]]

_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.alias.default,
          aten._reshape_alias.default, aten.view.dtype}
_COPIES = {aten._to_copy.default, aten.clone.default, aten.contiguous.default, aten.detach.default,
           aten.lift_fresh.default, aten.lift_fresh_copy.default, aten._conj.default, aten.to.dtype,
           aten.to.device, aten.to.dtype_layout}
_LOOKUPS = {aten.embedding.default, aten.index_select.default, aten.index.Tensor, aten._embedding_bag.default,
            aten.embedding_bag.default, aten._embedding_bag_forward_only.default}
_ADDS = {aten.add.Tensor, aten.add_.Tensor}
_SDPA = {aten._scaled_dot_product_flash_attention_for_cpu.default, aten._scaled_dot_product_flash_attention.default,
         aten._scaled_dot_product_efficient_attention.default, aten._scaled_dot_product_cudnn_attention.default,
         aten._scaled_dot_product_attention_math.default, aten.scaled_dot_product_attention.default,
         aten._scaled_dot_product_fused_attention_overrideable.default}
#: ops through which a tensor is still "the same values up to a constant factor"
_SCALINGS = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.mul_.Tensor,
             aten.div_.Tensor, aten.neg.default}
_PASSING = _VIEWS | _COPIES | _SCALINGS | {aten.t.default, aten.transpose.int, aten.permute.default,
                                           aten.expand.default, aten.unsqueeze.default, aten.squeeze.dim,
                                           aten.squeeze.default, aten.slice.Tensor, aten.select.int,
                                           aten.dropout.default, aten.native_dropout.default}
_MATMULS = {aten.mm.default, aten.bmm.default, aten.baddbmm.default, aten.matmul.default}
#: parameter-free elementwise ops a residual stream may pass between blocks (ResNet's ReLU after the add)
_STREAM_OPS = _VIEWS | _COPIES | {aten.dropout.default, aten.native_dropout.default, aten.relu.default,
                                  aten.relu_.default, aten.gelu.default, aten.silu.default, aten.tanh.default,
                                  aten.leaky_relu.default, aten.elu.default, aten.hardtanh.default,
                                  aten.clamp.default}
#: ops linear in each activation operand: a branch stays homogeneous in its parameters through them
_LINEAR = _PASSING | _ADDS | {aten.sub.Tensor, aten.sum.dim_IntList, aten.sum.default, aten.mean.dim,
                             aten.index_add.default, aten.index_add_.default, aten.scatter_add.default,
                             aten.scatter_add_.default, aten.cat.default, aten.stack.default,
                             aten.index_put_.default, aten.index_put.default, aten.index.Tensor,
                             aten.index_select.default, aten.mul.Tensor, aten.mul_.Tensor, aten.div.Tensor}


@dataclass(frozen=True)
class Use:
    """One op that used a parameter: its parts per parameter axis, the op and the module."""

    param: str
    op: str
    module: str
    parts: tuple[str | None, ...]  # per parameter axis: CONTRACTED / KEPT / BATCH / LOOKUP / None
    kind: str  # "contraction" | "lookup" | "elementwise"
    index: int  # position of the op in the trace

    def axes(self, part: str) -> tuple[int, ...]:
        return tuple(i for i, p in enumerate(self.parts) if p == part)


@dataclass(frozen=True)
class Attention:
    """A fused attention call: its module, occurrence, head dim and the logit scale it applies."""

    module: str
    occurrence: int
    head_dim: int
    scale: float


@dataclass(frozen=True)
class Constant:
    """The floating-point constants one op received; ``logits``: the op scales a product of two
    activations (eager attention's ``q @ k^T * scaling``)."""

    values: tuple[float, ...]
    logits: bool = False


@dataclass
class Trace:
    """What one forward showed (see the module docstring)."""

    uses: dict[str, list[Use]] = field(default_factory=dict)
    output_uses: tuple[int, ...] = ()  # indices of the contraction uses that produce the model output
    output_modules: tuple[str, ...] = ()  # module calls whose output is (a view or multiple of) that output
    constant_modules: tuple[str, ...] = ()  # modules whose outputs depend on no parameter
    constants: dict[tuple[str, str, int], Constant] = field(default_factory=dict)  # (module, op, occurrence)
    attention: list[Attention] = field(default_factory=list)
    adds: list[tuple[int, int, int, int]] = field(default_factory=list)  # (id a, id b, id out, op index)
    producers: dict[int, int] = field(default_factory=dict)  # activation id -> index of the use producing it
    branch_params: dict[int, frozenset] = field(default_factory=dict)  # activation id -> params it is linear in
    unary: dict[int, int] = field(default_factory=dict)  # activation id -> the one activation it transforms
    entered: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # module -> (input id, op index) per call
    keep: list[Any] = field(default_factory=list)  # keeps traced tensors alive so ids stay unique

    def uses_of(self, name: str) -> list[Use]:
        return self.uses.get(name, [])

    def use_at(self, index: int) -> Use:
        """The contraction or lookup at op ``index`` (the use whose product that op's output is)."""
        return next(u for us in self.uses.values() for u in us if u.index == index and u.kind != "elementwise")


def _reshape_axes(in_shape: Sequence[int], out_shape: Sequence[int],
                  axes: Sequence[frozenset]) -> tuple[frozenset, ...]:
    """Axis map through a reshape: each output axis covers the parameter axes of the input axes
    it is made of (groups of equal size product, size-1 axes dropped or new)."""
    out: list[frozenset] = [frozenset()] * len(out_shape)
    i = j = 0
    n_in, n_out = len(in_shape), len(out_shape)
    while i < n_in or j < n_out:
        while i < n_in and in_shape[i] == 1:
            i += 1
        while j < n_out and out_shape[j] == 1:
            j += 1
        if i >= n_in or j >= n_out:
            break
        gi, gj = [i], [j]
        pi, pj = in_shape[i], out_shape[j]
        while pi != pj:
            if pi < pj:
                i += 1
                if i >= n_in:
                    break
                gi.append(i)
                pi *= in_shape[i]
            else:
                j += 1
                if j >= n_out:
                    break
                gj.append(j)
                pj *= out_shape[j]
        covered = frozenset().union(*(axes[k] for k in gi if k < n_in))
        for k in gj:
            if k < n_out and out_shape[k] != 1:
                out[k] = covered
        i, j = gi[-1] + 1, gj[-1] + 1
    return tuple(out)


def _dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _propagate(func, args, kwargs, inputs: Sequence[AxisMap | None], tensors: Sequence[torch.Tensor],
               out: Any) -> AxisMap | list[AxisMap] | None:
    """The axis map of a weight-space op's output, or None when the op is not understood."""
    first, x = inputs[0], tensors[0]
    if func in _VIEWS or func in (aten.expand.default, aten.squeeze.dim, aten.squeeze.default,
                                  aten.squeeze.dims, aten.unsqueeze.default, aten.flatten.using_ints,
                                  aten.unflatten.int):
        if first is None or not isinstance(out, torch.Tensor):
            return None
        if func is aten.expand.default:
            lead = out.dim() - x.dim()
            return {p: (frozenset(),) * lead + tuple(a if x.shape[k] == out.shape[lead + k] else frozenset()
                                                     for k, a in enumerate(ax)) for p, ax in first.items()}
        return {p: _reshape_axes(x.shape, out.shape, ax) for p, ax in first.items()}
    if func in (aten.t.default, aten.numpy_T.default, aten.permute.default, aten.transpose.int):
        if first is None:
            return None
        order = list(range(x.dim()))
        if func is aten.permute.default:
            order = [_dim(d, x.dim()) for d in args[1]]
        elif func is aten.transpose.int:
            a, b = _dim(args[1], x.dim()), _dim(args[2], x.dim())
            order[a], order[b] = order[b], order[a]
        else:
            order = order[::-1]
        return {p: tuple(ax[k] for k in order) for p, ax in first.items()}
    if func in (aten.select.int, aten.slice.Tensor, aten.narrow.default):
        if first is None:
            return None
        if func is aten.select.int:
            d = _dim(args[1], x.dim())
            return {p: ax[:d] + ax[d + 1:] for p, ax in first.items()}
        return dict(first)
    if func in (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int,
                aten.unsafe_split.Tensor):
        if first is None or not isinstance(out, (list, tuple)):
            return None
        if func is aten.unbind.int:
            d = _dim(args[1] if len(args) > 1 else 0, x.dim())
            return [{p: ax[:d] + ax[d + 1:] for p, ax in first.items()} for _ in out]
        return [dict(first) for _ in out]
    if func in (aten.cat.default, aten.stack.default):
        parts = args[0]
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        maps = [m for m in inputs if m is not None]
        merged: AxisMap = {}
        for m in maps:
            for p, ax in m.items():
                if func is aten.stack.default:
                    d = _dim(dim, len(ax) + 1)
                    ax = ax[:d] + (frozenset(),) + ax[d:]
                old = merged.get(p)
                merged[p] = ax if old is None else tuple(a | b for a, b in zip(old, ax))
        return merged if len(parts) else None
    if isinstance(out, torch.Tensor) and func not in _LOOKUPS:
        # elementwise among weight-space tensors and constants: right-aligned broadcasting
        merged = {}
        for m, t in zip(inputs, tensors):
            if m is None:
                continue
            lead = out.dim() - t.dim()
            if lead < 0 or any(t.shape[k] not in (1, out.shape[lead + k]) for k in range(t.dim())):
                return None
            for p, ax in m.items():
                ax = (frozenset(),) * lead + tuple(a if t.shape[k] == out.shape[lead + k] else frozenset()
                                                   for k, a in enumerate(ax))
                old = merged.get(p)
                merged[p] = ax if old is None else tuple(a | b for a, b in zip(old, ax))
        return merged
    return None


def _gathered_axes(func, args, weight: torch.Tensor, out: torch.Tensor, axes: AxisMap) -> AxisMap:
    """Axis map of ``W[ids]`` / ``embedding(W, ids)`` / ``index_select(W, dim, ids)``: the index
    axes cover the picked axis (a batch axis if the picks are contracted later), the rest keep theirs."""
    if func is aten.index_select.default:
        return dict(axes)
    picked = out.dim() - (weight.dim() - 1)
    return {p: (ax[0],) * picked + ax[1:] for p, ax in axes.items()}


def _broadcasts(t: torch.Tensor, out: torch.Tensor | None) -> bool:
    """``t`` broadcasts to ``out`` (right-aligned): an elementwise operand of the op."""
    if out is None or t.dim() > out.dim():
        return False
    return all(a in (1, b) for a, b in zip(t.shape[::-1], out.shape[::-1]))


def _contraction_parts(func, args, position: int, ndim: int) -> tuple[str | None, ...] | None:
    """Per axis of the weight operand at ``position``: its part in the contraction op, or None
    when ``func`` is not a contraction."""
    if func in (aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
                aten._grouped_mm.default):
        pos = position - (1 if func in (aten.addmm.default, aten.baddbmm.default) else 0)
        if pos not in (0, 1):
            return None
        parts = [KEPT] * ndim
        parts[ndim - 1 if pos == 0 else ndim - 2] = CONTRACTED
        for k in range(ndim - 2):
            parts[k] = BATCH
        return tuple(parts)
    if func in (aten.convolution.default, aten._convolution.default, aten.conv2d.default,
                aten.conv1d.default, aten.conv3d.default) and position == 1:
        transposed = bool(args[6]) if func in (aten.convolution.default, aten._convolution.default) else False
        parts = [None] * ndim
        parts[0], parts[1] = (CONTRACTED, KEPT) if transposed else (KEPT, CONTRACTED)
        return tuple(parts)
    return None


class _Tracer(TorchDispatchMode):
    """Records uses, activations' producers, adds, attention calls and constants (see :class:`Trace`)."""

    def __init__(self, params: Mapping[str, torch.Tensor]):
        super().__init__()
        self.trace = Trace()
        self.weights: dict[int, AxisMap] = {id(p): {n: tuple(frozenset({k}) for k in range(p.dim()))}
                                             for n, p in params.items()}
        self.ndims = {n: p.dim() for n, p in params.items()}
        self.activations: set[int] = set()
        self.param_dependent: set[int] = set()  # activations that depend on some parameter
        self.logits: set[int] = set()  # products of two activations (attention logits), through views
        self.gathered: dict[int, AxisMap] = {}  # weight rows picked by activation indices (W[expert_ids])
        self.gathered_at: dict[int, int] = {}  # ... and the op index of the pick
        self.stack: list[str] = [""]
        self.occurrence: dict[tuple[str, str], int] = {}
        self.index = 0
        self.keep = self.trace.keep
        self.keep.extend(params.values())

    def mark_input(self, x: Any) -> None:
        for t in tree_flatten(x)[0]:
            if isinstance(t, torch.Tensor):
                self.activations.add(id(t))
                self.keep.append(t)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        self.keep.extend(outs)
        self.index += 1
        module = self.stack[-1]
        acts = [t for t in tensors if id(t) in self.activations]
        maps = [self.weights.get(id(t), self.gathered.get(id(t))) for t in tensors]
        if func in _SDPA:
            self._attention(args, kwargs, module)
        else:
            self._constants(func, flat, acts, module)
        if not acts:
            if any(m is not None for m in maps):
                self._weight_space(func, args, kwargs, tensors, maps, out)
            return out
        self.activations.update(id(t) for t in outs)
        weighted = any(id(t) in self.weights for t in tensors)
        if weighted or any(id(t) in self.param_dependent for t in acts):
            self.param_dependent.update(id(t) for t in outs)
        first = outs[0] if outs else None
        produced = self._record_uses(func, args, tensors, maps, module, first) \
            if any(m is not None for m in maps) else None
        if first is None:
            return out
        if produced is not None:
            self.trace.producers[id(first)] = produced
        single = len(acts) == 1 and all(t is acts[0] or (id(t) not in self.weights and t.numel() == 1)
                                        for t in tensors)
        if produced is None and single and func in _PASSING:
            self._pass_through(func, args, kwargs, acts[0], maps, first, out)
        if single and func in _STREAM_OPS and first.shape == acts[0].shape:
            self.trace.unary[id(first)] = id(acts[0])  # relu, dropout, casts: the same stream, transformed
        self._branch_params(func, tensors, maps, first, produced)
        if not weighted and len(acts) == 2 and func in _MATMULS:
            self.logits.add(id(first))  # a product of two activations: attention-like logits
        if func in _ADDS and len(tensors) >= 2 and all(id(t) in self.activations for t in tensors[:2]):
            self.trace.adds.append((id(tensors[0]), id(tensors[1]), id(first), self.index))
        return out

    def _pass_through(self, func, args, kwargs, source, maps, first, out) -> None:
        """A view, cast or constant multiple of one activation keeps what it was (see :class:`Trace`)."""
        if id(source) in self.trace.producers:
            self.trace.producers[id(first)] = self.trace.producers[id(source)]
        if id(source) in self.logits and func not in _SCALINGS:
            self.logits.add(id(first))
        if id(source) in self.gathered:
            moved = _propagate(func, args, kwargs, [self.gathered[id(source)]], [source], out)
            if isinstance(moved, dict) and moved:
                self.gathered[id(first)] = moved
                self.gathered_at[id(first)] = self.gathered_at[id(source)]

    def _branch_params(self, func, tensors, maps, first, produced) -> None:
        """The parameters ``first`` is jointly homogeneous of degree 1 in (scaling them all by
        ``c`` scales it by ``c``): a contraction's weight and bias; a norm's gain and bias; kept
        through linear ops (views, sums, products with an independent activation, index_add)."""
        weights = {n for m in maps if m is not None for n in m}
        if produced is not None or (weights and func not in _LINEAR):
            self.trace.branch_params[id(first)] = frozenset(weights)
            return
        carried = {self.trace.branch_params[id(t)] for t in tensors if id(t) in self.trace.branch_params}
        if func in _LINEAR and len(carried) == 1:
            (params,) = carried
            self.trace.branch_params[id(first)] = params | frozenset(weights)

    def _constants(self, func, flat, acts, module) -> None:
        """Record the floating-point constants (Python floats, one-element constant tensors) an op gets."""
        values = tuple(float(a) if isinstance(a, float) else float(a.detach().double().item()) for a in flat
                       if (isinstance(a, float) and math.isfinite(a)) or (
                           isinstance(a, torch.Tensor) and a.numel() == 1 and a.dtype.is_floating_point
                           and id(a) not in self.activations and id(a) not in self.weights and a.device.type != "meta"))
        if not values:
            return
        key = (module, str(func))
        occurrence = self.occurrence.get(key, 0)
        self.occurrence[key] = occurrence + 1
        logits = func in _SCALINGS and any(id(t) in self.logits for t in acts)
        self.trace.constants[(module, str(func), occurrence)] = Constant(values, logits)

    def _weight_space(self, func, args, kwargs, tensors, maps, out) -> None:
        result = _propagate(func, args, kwargs, maps, tensors, out)
        outs = out if isinstance(out, (list, tuple)) else [out]
        results = result if isinstance(result, list) else [result] * len(outs)
        for t, m in zip(outs, results):
            if isinstance(t, torch.Tensor) and m:
                self.weights[id(t)] = m

    def _record_uses(self, func, args, tensors, maps, module, out) -> int | None:
        """Record a use for every parameter behind a weight-space (or gathered) operand; returns the
        op index when it is a contraction or lookup (its output is then that use's product)."""
        produced = None
        weighted = any(id(t) in self.weights for t in tensors)
        for t, m in zip(tensors, maps):
            if m is None or (weighted and id(t) not in self.weights):
                continue  # an embedding's output times a weight: the picked rows were activations after all
            position = next((k for k, a in enumerate(args) if a is t), None)
            parts_per_axis = _contraction_parts(func, args, position, t.dim()) if position is not None else None
            kind = "contraction"
            if parts_per_axis is None and func in _LOOKUPS and position == 0 and id(t) in self.weights:
                parts_per_axis = (LOOKUP,) + (KEPT,) * (t.dim() - 1)
                kind = "lookup"
                if out is not None:  # rows picked by indices: contracted later, they were a selection
                    self.gathered[id(out)] = _gathered_axes(func, args, t, out, m)
                    self.gathered_at[id(out)] = self.index
            if parts_per_axis is None:
                if id(t) not in self.weights or not _broadcasts(t, out):
                    continue  # an opaque fused op (e.g. a fused encoder layer): roles fall back to the module type
                kind = "elementwise"
                parts_per_axis = (KEPT,) * t.dim()
            if id(t) in self.gathered and kind == "contraction":  # W[ids] @ x: drop the pick's lookup use
                picked = self.gathered_at[id(t)]
                for name in m:
                    self.trace.uses[name] = [u for u in self.trace.uses.get(name, []) if u.index != picked]
            for name, axes in m.items():
                parts: list[str | None] = [None] * self.ndims[name]
                for part, covered in zip(parts_per_axis, axes):
                    for k in covered:
                        if parts[k] is None or part == CONTRACTED:
                            parts[k] = BATCH if part == LOOKUP and kind == "contraction" else part
                use = Use(name, str(func.overloadpacket.__name__), module, tuple(parts), kind, self.index)
                self.trace.uses.setdefault(name, []).append(use)
                if kind != "elementwise":
                    produced = self.index
        return produced

    def _attention(self, args, kwargs, module) -> None:
        key = (module, "attention")
        occurrence = self.occurrence.get(key, 0)
        self.occurrence[key] = occurrence + 1
        head_dim = args[0].shape[-1]
        scale = kwargs.get("scale")
        self.trace.attention.append(Attention(module, occurrence, head_dim,
                                              1.0 / math.sqrt(head_dim) if scale is None else float(scale)))


def run_trace(model: nn.Module, inputs: Any) -> Trace:
    """Trace one forward of ``model`` on ``inputs`` (a tensor, a tuple of positional args, or a
    dict of keyword args) in eval mode without grad; raises what the forward raises."""
    params = dict(model.named_parameters())
    tracer = _Tracer(params)
    names = {id(m): n for n, m in model.named_modules()}
    module_outputs: list[tuple[str, Any]] = []

    def enter(module, args):
        name = names.get(id(module))
        if name is None:
            return
        tracer.stack.append(name)
        first = next((t for t in tree_flatten(args)[0] if isinstance(t, torch.Tensor)), None)
        if first is not None:
            tracer.trace.entered.setdefault(name, []).append((id(first), tracer.index))
            tracer.keep.append(first)

    def leave(module, args, out):
        name = names.get(id(module))
        if name is None:
            return
        if tracer.stack and tracer.stack[-1] == name:
            tracer.stack.pop()
        module_outputs.append((name, out))

    handles = [nn.modules.module.register_module_forward_pre_hook(enter),
               nn.modules.module.register_module_forward_hook(leave)]
    was_training = model.training
    model.eval()
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # nn.TransformerEncoderLayer's fused op hides its matmuls
    try:
        with torch.no_grad(), tracer:
            tracer.mark_input(inputs)
            if isinstance(inputs, Mapping):
                out = model(**inputs)
            elif isinstance(inputs, tuple):
                out = model(*inputs)
            else:
                out = model(inputs)
    finally:
        for h in handles:
            h.remove()
        torch.backends.mha.set_fastpath_enabled(fast_path)
        model.train(was_training)
    trace = tracer.trace
    leaves = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    first = leaves[0] if leaves else None
    if first is not None and id(first) in trace.producers:
        source = trace.producers[id(first)]
        trace.output_uses = (source,)
        trace.output_modules = tuple(dict.fromkeys(
            name for name, o in module_outputs
            if any(trace.producers.get(id(t)) == source for t in tree_flatten(o)[0][:1]
                   if isinstance(t, torch.Tensor))))
    judged = set()
    for name, o in module_outputs:
        if any(isinstance(t, torch.Tensor) and id(t) in tracer.param_dependent for t in tree_flatten(o)[0]):
            judged.add(name)
    trace.constant_modules = tuple(dict.fromkeys(n for n, _ in module_outputs if n not in judged and n))
    return trace
