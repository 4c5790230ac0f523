"""What mupkit should infer on real public architectures (tests/models/architectures.py).

Each model is built from a small config at width 64 (base) and 256 (target), depth 2; every
parameter family must get its Tensor Programs V role (Sec. 4, Table 3):

* ``input``: token, position-lookup and patch embeddings, the conv stem (fan-in finite);
* ``hidden``: attention q/k/v/o, MLP and expert matrices (3-D experts included), convolutions;
* ``output``: the readout and an MoE router (width to a fixed count);
* ``vector``: norm gains and biases over a width dim;
* ``scalar``: nothing scales (a readout bias over the vocab or classes, T5's relative position
  table of ``(buckets, heads)``).

A few parameters are used elementwise or per channel, where ``input`` and ``vector`` are the same
muP rule and either is right (ViT's CLS token and position table, Mamba's ``A_log`` and
depthwise ``conv1d``); Mamba's ``x_proj`` fuses a width-sized part (``dt``) with fixed ones
(``B``, ``C``) in one output dim and has no single role, so it is not asserted. A tied readout
(GPT-2, BERT, T5, Mamba, x-transformers) is the embedding: ``input``.

Where a model has a layer count, ``mup+depth`` with the depth doubled must work too.

With the model's own batch as ``example_inputs`` the usage trace must find the readout: the
parameter whose contraction gives the output. A readout tied to the embedding (GPT-2, BERT, T5,
Mamba, x-transformers, whose readout is ``x @ emb.weight.t()`` in the wrapper's forward, no
module) keeps the embedding's ``input`` role and gets muP's ``1/m_in`` (0.25 at 4x width) as
an input or output multiplier.
"""

from __future__ import annotations


import pytest
import torch

import mupkit
from mupkit import Role

pytest.importorskip("transformers")
pytest.importorskip("x_transformers")

from architectures import ARCHITECTURES  # noqa: E402

I, H, O, V, S = Role.INPUT, Role.HIDDEN, Role.OUTPUT, Role.VECTOR, Role.SCALAR

#: family -> the roles mupkit may infer (None: not asserted)
EXPECTED: dict[str, frozenset | None] = {
    "embedding": frozenset({I}), "positional": frozenset({I}), "patch_embedding": frozenset({I}),
    "conv_stem": frozenset({I}),
    "cls_token": frozenset({I, V}),
    "attention_qkv": frozenset({H}), "attention_o": frozenset({H}), "mlp": frozenset({H}),
    "experts": frozenset({H}), "head_transform": frozenset({H}), "conv": frozenset({H}),
    "in_out_proj": frozenset({H}), "dt_proj": frozenset({H}),
    "router": frozenset({O}), "readout": frozenset({O}),
    "norm": frozenset({V}), "attention_bias": frozenset({V}), "mlp_bias": frozenset({V}),
    "patch_embedding_bias": frozenset({V}), "head_transform_bias": frozenset({V}), "dt_bias": frozenset({V}),
    "conv1d_bias": frozenset({V}), "D": frozenset({V}),
    "A_log": frozenset({I, V}), "conv1d": frozenset({I, V}),
    "readout_bias": frozenset({S}), "relative_position": frozenset({S}),
    "x_proj": None,
}
#: per model, families whose expectation differs from EXPECTED
OVERRIDES: dict[str, dict[str, frozenset]] = {
    "vit": {"positional": frozenset({I, V})},  # (1, 17, width), added elementwise, not looked up
}

#: the parameter whose contraction produces each model's output
READOUT = {
    "gpt2": "hf.transformer.wte.weight", "llama": "hf.lm_head.weight", "qwen2": "hf.lm_head.weight",
    "mixtral": "hf.lm_head.weight", "mixtral_eager": "hf.lm_head.weight", "mixtral_batched": "hf.lm_head.weight",
    "bert": "hf.bert.embeddings.word_embeddings.weight", "t5": "hf.shared.weight", "vit": "hf.classifier.weight",
    "resnet": "hf.classifier.1.weight", "mamba": "hf.backbone.embeddings.weight",
    "x_transformer": "token_emb.emb.weight",
}
TIED = {"gpt2", "bert", "t5", "mamba", "x_transformer"}

NAMES = list(ARCHITECTURES)
BASE = dict(width=64, depth=2)


def _expected(name: str, family: str) -> frozenset | None:
    return OVERRIDES.get(name, {}).get(family, EXPECTED[family])


def _check_roles(name: str, plan, model: torch.nn.Module) -> None:
    arch = ARCHITECTURES[name]
    wrong = []
    for pname, p in model.named_parameters():
        assert pname in plan, f"{name}: {pname} missing from the plan"
        spec = plan[pname]
        assert tuple(spec.target) == tuple(p.shape), f"{name}: {pname} target {spec.target} != {tuple(p.shape)}"
        family = arch.family(pname)
        allowed = _expected(name, family)
        if allowed is not None and Role(spec.role) not in allowed:
            wrong.append(f"{pname} ({family}): {Role(spec.role).value}, expected "
                         f"{'/'.join(sorted(r.value for r in allowed))}")
    assert not wrong, f"{name}: {len(wrong)} wrong roles:\n" + "\n".join(wrong[:12])


@pytest.mark.parametrize("name", NAMES)
def test_constructor_builds_a_small_proxy_that_fits_its_batch(name):
    arch = ARCHITECTURES[name]
    model = arch.make(width=64, depth=2)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000  # small enough for CPU coordinate checks
    inputs, targets = arch.batch()
    with torch.no_grad():
        out = model(inputs)
    if targets.dim() == out.dim() - 1:  # class/token logits
        assert out.shape[:-1] == targets.shape and out.shape[-1] in (256, 10)
    loss = torch.nn.functional.cross_entropy(out.flatten(0, -2), targets.flatten())
    assert torch.isfinite(loss)
    for w in (64, 128):  # every family matches, every depth container grows with depth
        for pname, _ in arch.make(width=w, depth=3).named_parameters():
            arch.family(pname)
    deep = arch.make(width=64, depth=3)
    for container in arch.depth_containers:
        assert len(deep.get_submodule(container)) % 3 == 0


#: post-LN blocks (``norm(x + f(x))``): Depth-muP / CompleteP are defined for pre-LN residual streams
POST_LN = {"bert"}


@pytest.mark.filterwarnings("ignore::mupkit.ForwardScalingWarning")  # asserted in test_forward_scaling_is_reported
@pytest.mark.parametrize("name", NAMES)
def test_width_plan_assigns_each_family_its_role(name):
    arch = ARCHITECTURES[name]
    plan = mupkit.infer_plan(arch.make, base=BASE, target=dict(width=256, depth=2), example_inputs=arch.batch()[0])
    _check_roles(name, plan, arch.make(width=256, depth=2))


@pytest.mark.filterwarnings("ignore::mupkit.ForwardScalingWarning")
@pytest.mark.parametrize("name", NAMES)
def test_depth_plan_with_mup_depth(name):
    arch = ARCHITECTURES[name]
    assert arch.depth_containers, "every model here has a layer count"
    sizes = dict(base=BASE, target=dict(width=256, depth=4), parametrization="mup+depth",
                 example_inputs=arch.batch()[0])
    if name in POST_LN:
        with pytest.raises(ValueError, match=r"post-LN.*branch_outputs="):
            mupkit.infer_plan(arch.make, **sizes)
        return
    plan = mupkit.infer_plan(arch.make, **sizes)
    _check_roles(name, plan, arch.make(width=256, depth=4))
    assert plan.depth is not None and plan.depth.branch_outputs, f"{name}: no branch carries the depth multiplier"
    for container in arch.depth_containers:
        assert plan.depth.blocks[container][1] == 2 * plan.depth.blocks[container][0]


@pytest.mark.filterwarnings("ignore::mupkit.ForwardScalingWarning")
@pytest.mark.parametrize("name", NAMES)
def test_trace_finds_the_readout_and_scales_a_tied_one(name):
    arch = ARCHITECTURES[name]
    inputs, _ = arch.batch()
    plan = mupkit.infer_plan(arch.make, base=BASE, target=dict(width=256, depth=2), example_inputs=inputs)
    readout = READOUT[name]
    assert readout in plan.readouts, f"{name}: readouts {plan.readouts}, expected {readout}"
    if name in TIED:
        assert Role(plan[readout].role) is I
        factors = [*plan.input_multipliers.values(), *plan.output_multipliers.values()]
        assert any(f == pytest.approx(0.25) for f in factors), \
            f"{name}: tied readout without its 1/m_in: input {dict(plan.input_multipliers)}, " \
            f"output {dict(plan.output_multipliers)}"
    else:
        assert Role(plan[readout].role) is O
