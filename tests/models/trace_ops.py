"""What each architecture's forward does with its parameters, op by op (a report, not a test).

``python tests/models/trace_ops.py [NAME ...] [--full DIR]`` runs one CPU forward per model at
width 64 (and one at width 128 to find width-dependent constants) under a
:class:`TorchDispatchMode` that follows every parameter through the aten ops it reaches: a
view/copy of a parameter (``t``, ``transpose``, ``view``, ``_to_copy``, ``slice``, an elementwise op
on the parameter alone or with a same-sized or 0-d operand, ``cat`` of parameters...) stays
"derived" from it; any other op that takes a derived tensor "uses" it. Per family it prints the
chains ``view ops -> consuming op[argument position]`` with counts, plus:

* ops that take a Python float (``scale=``, ``mul`` by a wrapped number...) whose value differs
  between width 64 and 128 (width-dependent constants);
* the attention kernel (``_scaled_dot_product_*`` with its ``scale``) or eager ``_softmax``;
* data-dependent ops (``_local_scalar_dense`` = ``.item()``/``bool()``/``tolist()``, ``nonzero``...);
* parameter uses under ``torch.no_grad`` and non-aten (custom) ops;
* autograd nodes that are not aten backward nodes (custom ``autograd.Function``);
* tied parameters (one tensor registered in several modules);
* whether the forward runs after ``model.to("meta")`` on meta inputs.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import traceback
import warnings
from collections import Counter, defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
warnings.simplefilter("ignore")

from architectures import ARCHITECTURES  # noqa: E402

VIEW_OPS = {"t", "transpose", "permute", "view", "_unsafe_view", "reshape", "expand", "_to_copy", "clone",
            "select", "slice", "index", "unsqueeze", "squeeze", "split", "split_with_sizes", "chunk", "contiguous",
            "alias", "detach", "unbind", "as_strided", "lift_fresh", "_reshape_alias", "flatten", "narrow",
            "view_as", "expand_as", "unflatten", "repeat", "repeat_interleave", "cat", "stack", "index_select",
            "float", "to", "copy", "neg", "exp", "add", "sub", "mul", "div", "rsub", "pow", "sqrt", "rsqrt"}
CONTRACT_OPS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "convolution", "embedding", "_grouped_mm", "linear",
                "_embedding_bag", "einsum", "dot", "mv", "addmv", "addbmm"}
DATA_DEPENDENT = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "nonzero_static",
                  "where_1", "item", "equal", "is_nonzero"}


def _short(op) -> str:
    return op._schema.name.split("::")[-1] + ("." + op._overloadname if op._overloadname != "default" else "")


def _base(op) -> str:
    return op._schema.name.split("::")[-1]


class ParamTracer(TorchDispatchMode):
    """Follow parameters (and tensors derived from them) through the aten ops of one forward."""

    def __init__(self, params: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.derived: dict[int, tuple[str, tuple[str, ...]]] = {}  # id -> (param name, view-op chain)
        self.keep: list[torch.Tensor] = []  # keep tensors alive so ids stay unique
        for name, p in params.items():
            self.derived[id(p)] = (name, ())
        self.log: list[str] = []
        self.uses: dict[str, list[tuple[tuple[str, ...], str, int, bool]]] = defaultdict(list)
        self.floats: list[tuple[str, tuple]] = []  # (op, float args) in call order
        self.attention: Counter = Counter()
        self.data_dependent: Counter = Counter()
        self.custom_ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name, base = _short(func), _base(func)
        namespace = func._schema.name.split("::")[0]
        if namespace != "aten":
            self.custom_ops[func._schema.name] += 1
        if base in DATA_DEPENDENT:
            frames = [f for f in traceback.extract_stack()
                      if "/torch/" not in f.filename and not f.filename.endswith("trace_ops.py")]
            where = frames[-1] if frames else None
            self.data_dependent[f"{name} at {where.filename.split('site-packages/')[-1]}:{where.lineno} "
                                f"`{where.line}`" if where else name] += 1
        flat, _ = tree_flatten((args, kwargs))
        fl = tuple(round(x, 6) for x in flat if isinstance(x, float))
        fl += tuple(round(float(x), 6) for x in flat if isinstance(x, torch.Tensor) and x.dim() == 0
                    and x.is_floating_point() and x.device.type == "cpu" and id(x) not in self.derived)
        self.floats.append((name, fl))
        if "scaled_dot_product" in base or "softmax" in base or "flash" in base:
            scale = kwargs.get("scale")
            self.attention[f"{name}(scale={None if scale is None else round(scale, 6)})"] += 1
        tensors = [(i, x) for i, x in enumerate(flat) if isinstance(x, torch.Tensor)]
        hits = [(i, x, self.derived[id(x)]) for i, x in tensors if id(x) in self.derived]
        if not hits:
            return out
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        shapes = [tuple(x.shape) for _, x in tensors]
        self.log.append(f"{name:40s} in={shapes} out={[tuple(o.shape) for o in outs]} "
                        f"params={[f'{p}{list(c)}@{i}' for i, _, (p, c) in hits]}"
                        + ("" if torch.is_grad_enabled() else " [no_grad]"))
        others = [x for i, x in tensors if id(x) not in self.derived]
        biggest = max(x.numel() for _, x, _ in hits)
        passthrough = base in VIEW_OPS and all(o.numel() <= max(biggest, 1) or base in ("cat", "stack", "expand",
                                               "repeat", "repeat_interleave", "index", "index_select")
                                               for o in outs) \
            and all(x.dim() == 0 or x.numel() <= biggest or x.dtype in (torch.int64, torch.int32, torch.bool)
                    for x in others)
        if base in CONTRACT_OPS:
            passthrough = False
        for i, x, (pname, chain) in hits:
            if passthrough:
                for o in outs:
                    self.derived[id(o)] = (pname, chain + (name,))
                    self.keep.append(o)
            else:
                extra = ""
                if base == "embedding" and len(args) > 2 and args[2] != -1:
                    extra = f"(padding_idx={args[2]})"
                self.uses[pname].append((chain, name + extra, i, torch.is_grad_enabled()))
        return out


def autograd_nodes(out: torch.Tensor) -> Counter:
    seen, stack, names = set(), [out.grad_fn], Counter()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names[type(node).__name__] += 1
        stack.extend(n for n, _ in node.next_functions)
    return names


def compile_markers(model: torch.nn.Module) -> set[str]:
    found = set()
    for cls in {type(m) for m in model.modules()}:
        try:
            src = inspect.getsource(cls)
        except (OSError, TypeError):
            continue
        for marker in ("torch.compile", "torch.compiler.disable", "torch._dynamo", "is_torchdynamo_compiling",
                       "torch.jit.script", "custom_op", "autograd.Function"):
            if marker in src:
                found.add(f"{cls.__module__.split('.')[-1]}: {marker}")
    return found


EVAL = False  # --eval: trace in eval mode under no_grad (as mupkit's usage trace runs)


def trace(name: str, width: int = 64, depth: int = 2) -> tuple[ParamTracer, torch.nn.Module, torch.Tensor]:
    arch = ARCHITECTURES[name]
    torch.manual_seed(0)
    model = arch.make(width=width, depth=depth)
    model.train(not EVAL)
    x, _ = arch.batch()
    tracer = ParamTracer(dict(model.named_parameters()))
    with tracer, torch.set_grad_enabled(not EVAL):
        out = model(x)
    return tracer, model, out


def meta_forward(name: str) -> str:
    arch = ARCHITECTURES[name]
    model = arch.make(width=64, depth=2).to("meta")
    x, _ = arch.batch()
    try:
        out = model(x.to("meta"))
        return f"ok {tuple(out.shape)}"
    except Exception as err:  # noqa: BLE001 - reported
        return f"FAILS: {type(err).__name__}: {str(err).splitlines()[0][:160]}"


def fake_forward(name: str) -> str:
    """Build and run the model under FakeTensorMode (what a tracer that needs no memory would use)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    arch = ARCHITECTURES[name]
    x, _ = arch.batch()
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            model = arch.make(width=64, depth=2)
            out = model(mode.from_tensor(x))
        return f"ok {tuple(out.shape)}"
    except Exception as err:  # noqa: BLE001 - reported
        return f"FAILS: {type(err).__name__}: {str(err).splitlines()[0][:160]}"


def tied(model: torch.nn.Module) -> list[str]:
    sites = defaultdict(list)
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for attr, p in module.named_parameters(recurse=False):
            sites[id(p)].append(f"{mod_name}.{attr}")
    return [" = ".join(dict.fromkeys(s)) for s in sites.values() if len(dict.fromkeys(s)) > 1]


def report(name: str, full_dir: str | None = None) -> None:
    arch = ARCHITECTURES[name]
    t64, model, out = trace(name, 64)
    t128, model128, _ = trace(name, 128)
    print(f"\n==================== {name}: output {tuple(out.shape)}")
    p64, p128 = dict(model.named_parameters()), dict(model128.named_parameters())
    by_family = defaultdict(list)
    for pname in p64:
        by_family[arch.family(pname)].append(pname)
    for fam, names in by_family.items():
        shapes = sorted({(tuple(p64[n].shape), tuple(p128[n].shape)) for n in names})
        chains = Counter()
        for n in names:
            for chain, op, pos, grad in t64.uses.get(n, []):
                chains[" -> ".join(chain + (f"{op}[{pos}]",)) + ("" if grad else " (no_grad)")] += 1
        unused = [n for n in names if n not in t64.uses]
        print(f"  {fam} x{len(names)}: " + ", ".join(f"{a}->{b}" for a, b in shapes))
        for chain, k in chains.most_common():
            print(f"      {k:3d} x {chain}")
        if unused:
            print(f"      UNUSED in forward: {unused[:3]}{'...' if len(unused) > 3 else ''}")
    diffs = Counter()
    for (op_a, fa), (op_b, fb) in zip(t64.floats, t128.floats):
        if op_a == op_b and fa != fb and len(fa) == len(fb):
            diffs[f"{op_a}: {fa} -> {fb}"] += 1
    if len(t64.floats) != len(t128.floats):
        print(f"  (op sequences differ in length: {len(t64.floats)} vs {len(t128.floats)})")
    print("  width-dependent float constants (w64 -> w128):")
    for d, k in diffs.most_common(12):
        print(f"      {k:3d} x {d}")
    print(f"  attention/softmax ops: {dict(t64.attention)}")
    print(f"  data-dependent ops: {dict(t64.data_dependent)}")
    print(f"  non-aten ops: {dict(t64.custom_ops)}")
    nodes = autograd_nodes(out) if out.grad_fn is not None else Counter()
    odd = {k: v for k, v in nodes.items() if not k.endswith("Backward0") and not k.endswith("Backward1")
           and k != "AccumulateGrad"}
    print(f"  non-aten autograd nodes: {odd}")
    print(f"  tied: {tied(model)}")
    print(f"  compile/custom markers in module sources: {sorted(compile_markers(model))}")
    print(f"  meta forward: {meta_forward(name)}")
    print(f"  FakeTensorMode build + forward: {fake_forward(name)}")
    if full_dir:
        os.makedirs(full_dir, exist_ok=True)
        with open(os.path.join(full_dir, f"{name}.txt"), "w") as f:
            f.write("\n".join(t64.log) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("names", nargs="*", default=list(ARCHITECTURES))
    parser.add_argument("--eval", action="store_true", help="eval mode and no_grad (mupkit's trace setting)")
    parser.add_argument("--full", default=None, help="write every parameter-touching op per model to DIR/NAME.txt")
    args = parser.parse_args()
    global EVAL
    EVAL = args.eval
    for name in args.names:
        report(name, args.full)


if __name__ == "__main__":
    main()
