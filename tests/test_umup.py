"""u-muP: unit-scaled ops and modules against graphcore's unit-scaling 0.3.5 (PyPI, test extra).

Parity is in float32 on the same inputs: outputs and every gradient equal to 1e-6 relative
(``max |a - b| / max |b|``). Beyond parity: unit scale at init across widths, the LR table
against ``unit_scaling.optim.scaled_parameters``, a u-muP coordinate check.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mupkit
import mupkit.unit.functional as M
from mupkit import models
from mupkit.cli import main as cli
from mupkit.zoo import BUILTIN

uu = pytest.importorskip("unit_scaling")
U = uu.functional

RTOL = 1e-6


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL) -> bool:
    return bool((a - b).abs().max() <= rtol * b.abs().max().clamp_min(1e-30))


def run(fn, tensors, seed: int = 0):
    """fn(*leaves) with a random output gradient: (output, grads of every leaf)."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
    torch.manual_seed(seed)
    out = fn(*leaves)
    torch.manual_seed(seed + 1)
    out.backward(torch.randn_like(out))
    return out.detach(), [t.grad for t in leaves if t.requires_grad]


def assert_parity(ours, theirs, tensors, seed: int = 0):
    out_a, grads_a = run(ours, tensors, seed)
    out_b, grads_b = run(theirs, tensors, seed)
    assert close(out_a, out_b), (out_a - out_b).abs().max()
    assert len(grads_a) == len(grads_b)
    for i, (ga, gb) in enumerate(zip(grads_a, grads_b)):
        assert close(ga, gb), f"gradient {i}: {(ga - gb).abs().max()} vs scale {gb.abs().max()}"


dims = st.integers(2, 24)
mults = st.sampled_from([0.25, 1.0, 4.0])
constraints = st.sampled_from([None, "to_output_scale", "to_grad_input_scale", "gmean", "hmean", "amean"])


@settings(max_examples=20, deadline=None)
@given(b=dims, fan_in=dims, fan_out=dims, bias=st.booleans(), constraint=constraints, readout=st.booleans())
def test_linear_and_readout(b, fan_in, fan_out, bias, constraint, readout):
    x, w, bb = torch.randn(b, 3, fan_in), torch.randn(fan_out, fan_in), torch.randn(fan_out)
    tensors = [x, w, bb] if bias else [x, w]
    ours, theirs = (M.linear_readout, U.linear_readout) if readout else (M.linear, U.linear)
    if readout and constraint in ("gmean", "hmean", "amean", "to_grad_input_scale"):
        constraint = None
    assert_parity(lambda *t: ours(t[0], t[1], t[2] if bias else None, constraint),
                  lambda *t: theirs(t[0], t[1], t[2] if bias else None, constraint), tensors)


@settings(max_examples=20, deadline=None)
@given(n=dims, d=dims, mult=mults, approximate=st.sampled_from(["none", "tanh"]),
       constraint=st.sampled_from([None, "to_output_scale", "to_grad_input_scale"]))
def test_activations(n, d, mult, approximate, constraint):
    x = torch.randn(n, d)
    assert_parity(lambda t: M.gelu(t, mult, constraint, approximate), lambda t: U.gelu(t, mult, constraint, approximate),
                  [x])
    assert_parity(lambda t: M.silu(t, mult, constraint), lambda t: U.silu(t, mult, constraint), [x])
    assert_parity(lambda a, g: M.silu_glu(a, g, mult), lambda a, g: U.silu_glu(a, g, mult), [x, torch.randn(n, d)])


def test_relu_is_unit_scaled_and_the_limit_of_gelu():
    """unit-scaling has no relu: check unit scale directly (N(0,1) input, 2^18 samples, rel 2%)
    and that it is gelu's large-``mult`` limit."""
    out, (grad,) = run(M.relu, [torch.randn(1 << 18)])
    assert abs(out.std().item() - 1) < 0.02
    out, (grad,) = run(lambda t: M.relu(t, constraint=None), [torch.randn(1 << 18)])
    assert abs(out.std().item() - 1) < 0.02 and abs(grad.std().item() - 1) < 0.02
    x = torch.randn(1000)
    assert close(M.relu(x), M.gelu(x, mult=1e4), rtol=1e-3)


@settings(max_examples=20, deadline=None)
@given(rows=dims, size=dims, mult=mults, dim=st.sampled_from([0, 1, -1]),
       constraint=st.sampled_from([None, "to_output_scale", "to_grad_input_scale"]))
def test_softmax(rows, size, mult, dim, constraint):
    x = torch.randn(rows, size, 3)
    assert_parity(lambda t: M.softmax(t, dim, constraint=constraint, mult=mult),
                  lambda t: U.softmax(t, dim, constraint=constraint, mult=mult), [x])


@settings(max_examples=15, deadline=None)
@given(b=st.integers(1, 3), heads=st.integers(1, 3), seq=dims, d_head=dims, causal=st.booleans(), mult=mults,
       mask=st.booleans())
def test_scaled_dot_product_attention(b, heads, seq, d_head, causal, mult, mask):
    q, k, v = (torch.randn(b, heads, seq, d_head) for _ in range(3))
    attn_mask = None if causal or not mask else torch.rand(seq, seq) > 0.3
    if attn_mask is not None:
        attn_mask.fill_diagonal_(True)
    assert_parity(lambda *t: M.scaled_dot_product_attention(*t, attn_mask=attn_mask, is_causal=causal, mult=mult),
                  lambda *t: U.scaled_dot_product_attention(*t, attn_mask=attn_mask, is_causal=causal, mult=mult),
                  [q, k, v])


@settings(max_examples=20, deadline=None)
@given(b=dims, d=dims, affine=st.booleans())
def test_norms(b, d, affine):
    x = torch.randn(b, 5, d) * 3 + 1
    w, bias = torch.randn(d), torch.randn(d)
    tensors = [x, w, bias] if affine else [x]
    assert_parity(lambda *t: M.layer_norm(t[0], (d,), *t[1:]), lambda *t: U.layer_norm(t[0], (d,), *t[1:]), tensors)
    tensors = [x, w] if affine else [x]
    assert_parity(lambda *t: M.rms_norm(t[0], (d,), *t[1:]), lambda *t: U.rms_norm(t[0], (d,), *t[1:]), tensors)


@settings(max_examples=20, deadline=None)
@given(b=dims, d=dims, tau=st.sampled_from([0.2, 1.0, 3.0]))
def test_residual_split_add_apply(b, d, tau):
    x, w = torch.randn(b, d), torch.randn(d, d)

    def branch(lib):
        return lambda h, weight: lib.linear(h, weight, None)

    assert_parity(lambda t, weight: M.residual_apply(lambda h: branch(M)(h, weight), t, tau),
                  lambda t, weight: U.residual_apply(lambda h: branch(U)(h, weight), t, tau), [x, w])
    assert_parity(lambda t: torch.stack(M.residual_split(t, tau)), lambda t: torch.stack(U.residual_split(t, tau)), [x])
    assert_parity(lambda r, s: M.residual_add(r, s, tau), lambda r, s: U.residual_add(r, s, tau),
                  [x, torch.randn(b, d)])


@pytest.mark.parametrize("layers", [1, 4, 32])
@pytest.mark.parametrize("alpha_res,ratio", [(1.0, 1.0), (0.5, 1.0), (1.0, 2.0), (0.5, 1 / 3)])
def test_residual_taus_match_the_transformer_rule(layers, alpha_res, ratio):
    rule = uu.transformer_residual_scaling_rule(alpha_res, ratio)
    theirs = [rule(k, 2 * layers) for k in range(2 * layers)]
    assert M.residual_taus(layers, alpha_res, ratio) == pytest.approx(theirs, rel=1e-12)


@settings(max_examples=20, deadline=None)
@given(b=dims, vocab=st.integers(2, 40), mult=mults, reduction=st.sampled_from(["mean", "sum"]), flat=st.booleans())
def test_cross_entropy_and_mse(b, vocab, mult, reduction, flat):
    x = torch.randn(vocab) if flat else torch.randn(b, vocab)
    t = torch.tensor(b % vocab) if flat else torch.randint(0, vocab, (b,))
    assert_parity(lambda z: M.cross_entropy(z, t, reduction=reduction, mult=mult),
                  lambda z: U.cross_entropy(z, t, reduction=reduction, mult=mult), [x])
    y = torch.randn(b, vocab)
    assert_parity(lambda p, q: M.mse_loss(p, q, reduction=reduction), lambda p, q: U.mse_loss(p, q, reduction=reduction),
                  [x.expand(b, vocab) if flat else x, y])


@settings(max_examples=20, deadline=None)
@given(n=dims, vocab=st.integers(2, 50), d=dims, p=st.sampled_from([0.1, 0.5, 0.9]))
def test_embedding_dropout_matmul(n, vocab, d, p):
    ids = torch.randint(0, vocab, (n, 3))
    assert_parity(lambda w: M.embedding(ids, w), lambda w: U.embedding(ids, w), [torch.randn(vocab, d)])
    assert_parity(lambda x: M.dropout(x, p), lambda x: U.dropout(x, p), [torch.randn(n, d)], seed=3)
    assert_parity(M.matmul, U.matmul, [torch.randn(2, n, d), torch.randn(2, d, vocab)])


def test_unsupported_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="inplace"):
        M.dropout(torch.randn(3), inplace=True)
    with pytest.raises(ValueError, match="sparse"):
        M.embedding(torch.tensor([0]), torch.randn(4, 2), sparse=True)
    with pytest.raises(ValueError, match=r"flatten the leading dims"):
        M.cross_entropy(torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="constraint"):
        M.linear(torch.randn(2, 3), torch.randn(4, 3), constraint="median")


# ---- modules -----------------------------------------------------------------------------

def twin_decoders(width=32, vocab=50, depth=3, heads=4, alpha_res=1.0, alpha_res_attn_ratio=1.0):
    """graphcore's TransformerDecoder and mupkit's, with the same weights (and residual alphas)."""
    torch.manual_seed(0)
    rule = uu.core.functional.transformer_residual_scaling_rule(alpha_res, alpha_res_attn_ratio)
    theirs = uu.TransformerDecoder(width, vocab, depth, heads, residual_scaling=rule)
    ours = mupkit.build(mupkit.unit.TransformerDecoder, target=dict(width=width, vocab=vocab, depth=depth, heads=heads,
                                                                  alpha_res=alpha_res,
                                                                  alpha_res_attn_ratio=alpha_res_attn_ratio),
                        parametrization="umup")
    names = {"embedding.weight": "embedding.weight", "projection.weight": "readout.weight"}
    for i in range(depth):
        for a, b in [("mhsa.linear_qkv", "attn.qkv"), ("mhsa.linear_o", "attn.proj"), ("mlp.linear_1", "mlp.up"),
                     ("mlp.linear_gate", "mlp.gate"), ("mlp.linear_2", "mlp.down")]:
            names[f"layers.{i}.{a}.weight"] = f"layers.{i}.{b}.weight"
    state = theirs.state_dict()
    assert set(names) == set(state)
    ours.load_state_dict({names[k]: v for k, v in state.items()})
    return theirs, ours, names


def test_transformer_decoder_matches_unit_scaling():
    theirs, ours, names = twin_decoders()
    ids = torch.randint(0, 50, (4, 16))
    loss_a, loss_b = ours.loss(ids), theirs.loss(ids)
    assert close(loss_a, loss_b)
    loss_a.backward()
    loss_b.backward()
    grads = dict(ours.named_parameters())
    for k, p in theirs.named_parameters():
        assert close(grads[names[k]].grad, p.grad), k


def test_umup_hyperparameters_reach_the_ops_as_in_unit_scaling():
    """Non-default alpha_res / alpha_res_attn_ratio (residual taus), alpha_attn_softmax (attention
    mult) and alpha_loss_softmax (loss mult) give graphcore's outputs and gradients."""
    theirs, ours, names = twin_decoders(alpha_res=2.0, alpha_res_attn_ratio=0.5)
    plain, _, _ = twin_decoders()
    ids = torch.randint(0, 50, (4, 16))
    loss_a, loss_b = ours.loss(ids), theirs.loss(ids)
    assert close(loss_a, loss_b) and not close(loss_b, plain.loss(ids))  # the alphas change the model
    loss_a.backward()
    loss_b.backward()
    grads = dict(ours.named_parameters())
    for k, p in theirs.named_parameters():
        assert close(grads[names[k]].grad, p.grad), k
    torch.manual_seed(1)
    x = torch.randn(2, 8, 32)
    mine = mupkit.unit.MHSA(32, 4, is_causal=True, alpha_attn_softmax=0.25)
    ref = uu.MHSA(32, 4, is_causal=True, mult=0.25)
    ref.load_state_dict({"linear_qkv.weight": mine.qkv.weight, "linear_o.weight": mine.proj.weight})
    assert close(mine(x), ref(x))
    logits, targets = torch.randn(64, 50), torch.randint(0, 50, (64,))
    assert close(M.cross_entropy(logits, targets, mult=3.0), uu.functional.cross_entropy(logits, targets, mult=3.0))


def test_lr_multipliers_equal_scaled_parameters():
    """Per parameter: lr and (independent) weight decay of graphcore's scaled_parameters for
    Adam/AdamW and SGD (``readout_constraint=None``), against mupkit's param_groups."""
    theirs, ours, names = twin_decoders(width=48, depth=4)
    for optimizer, func in (("adamw", uu.optim.lr_scale_func_adam), ("sgd", uu.optim.lr_scale_func_sgd(None))):
        ref = uu.optim.scaled_parameters(theirs.parameters(), func, lr=0.1, weight_decay=1e-3)
        by_param = {id(p): g for g in ref for p in g["params"]}
        expected = {names[k]: by_param[id(p)] for k, p in theirs.named_parameters()}
        groups = mupkit.param_groups(ours, optimizer=optimizer, lr=0.1, weight_decay=1e-3)  # u-muP's default policy
        seen = 0
        for group in groups:
            for name in group["param_names"]:
                assert float(group["lr"]) == pytest.approx(float(expected[name]["lr"]), rel=1e-12), (optimizer, name)
                if optimizer == "adamw":
                    assert group["weight_decay"] == pytest.approx(expected[name]["weight_decay"], rel=1e-12), name
                seen += 1
        assert seen == len(expected)


def test_umup_weight_decay_is_independent_of_the_peak_lr_by_default():
    """u-muP plans default to the independent policy for decoupled decay (AdamW); an L2 optimizer
    (Adam) keeps coupled decay; an explicit policy wins."""
    model = mupkit.build(mupkit.unit.TransformerDecoder, target=dict(width=64, depth=2), parametrization="umup")
    policies = lambda opt: {g["weight_decay_policy"] for g in opt.param_groups}  # noqa: E731
    assert policies(mupkit.optim.AdamW(mupkit.param_groups(model), lr=1e-2, weight_decay=0.1)) == {"independent"}
    assert policies(mupkit.optim.Adam(mupkit.param_groups(model), lr=1e-2, weight_decay=0.1)) == {"coupled"}
    explicit = mupkit.optim.AdamW(mupkit.param_groups(model), lr=1e-2, weight_decay=0.1, weight_decay_policy="coupled")
    assert policies(explicit) == {"coupled"}
    mup = mupkit.build(models.mlp, base=dict(width=32), target=dict(width=64))
    assert policies(mupkit.optim.AdamW(mupkit.param_groups(mup), lr=1e-2, weight_decay=0.1)) == {"coupled"}
    opt = mupkit.optim.AdamW(mupkit.param_groups(model), lr=1e-2, weight_decay=0.1)  # decay per step: wd * lr / lr_0
    p = next(model.parameters())
    p.grad = torch.zeros_like(p)
    before = p.detach().clone()
    opt.step()
    assert torch.allclose(p.detach(), before * (1 - 0.1), rtol=0, atol=1e-7)


def test_explain_shows_every_scale_and_plan_survives_copies():
    model = mupkit.build(mupkit.unit.TransformerDecoder, target=dict(width=64, depth=2), parametrization="umup")
    text = mupkit.explain(model)
    assert "umup" in text and "0.125 (in op)" in text and "0.01562 (in op)" in text and "LR x L^-1/2" in text
    plan = mupkit.plan_of(model)
    assert plan["layers.1.mlp.down.weight"].scales["adam"].lr == pytest.approx(256 ** -0.5 * 2 ** -0.5)
    assert plan["embedding.weight"].scales["adam"].lr == pytest.approx(64 ** -0.5)
    assert plan["readout.weight"].scales["adam"].lr == 1.0
    ids = torch.randint(0, 256, (2, 8))
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert mupkit.plan_of(other) == plan and torch.equal(other(ids), model(ids))
    compiled = torch.compile(model, backend="eager")
    assert mupkit.plan_of(compiled) == plan and close(compiled(ids), model(ids))


def plain_net(width=16, vocab=50):
    return torch.nn.Sequential(torch.nn.Embedding(vocab, width), torch.nn.Linear(width, 4 * width), torch.nn.GELU(),
                               torch.nn.Linear(4 * width, width), torch.nn.Linear(width, vocab))


def test_plain_layers_absorb_the_unit_forward_multipliers():
    """A plain-torch model under u-muP: roles inferred from base/target shapes, ``A_W`` absorbed
    (init std ``A_W``, Adam LR ``C_W * A_W``): its forward equals the unit-op model's and its
    AdamW trajectory too (float64, eps 0: Adam ignores the unit ops' backward scales)."""
    torch.manual_seed(0)
    plain = mupkit.build(plain_net, base=dict(width=16), target=dict(width=64), parametrization="umup",
                         zero_init=["*.bias"]).double()
    plan = mupkit.plan_of(plain)
    assert plan["1.weight"].absorbed == pytest.approx(64 ** -0.5) and plan["4.weight"].absorbed == pytest.approx(1 / 64)
    assert plain[1].weight.std().item() == pytest.approx(64 ** -0.5, rel=1e-6)
    assert "(absorbed)" in mupkit.explain(plain)

    class UnitNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.up = mupkit.unit.Embedding(50, 64), mupkit.unit.Linear(64, 256, bias=True)
            self.down, self.out = mupkit.unit.Linear(256, 64, bias=True), mupkit.unit.LinearReadout(64, 50, bias=True)

        def forward(self, ids):
            return self.out(self.down(torch.nn.functional.gelu(self.up(self.emb(ids)))))

    unit = mupkit.build(UnitNet, target={}, parametrization="umup").double()
    with torch.no_grad():
        for (name, p), q in zip(plain.named_parameters(), unit.parameters()):
            q.copy_(p / plan[name].absorbed)
    ids = torch.randint(0, 50, (8, 5))
    opts = [mupkit.optim.AdamW(mupkit.param_groups(m), lr=1e-2, eps=0.0, weight_decay=0.0) for m in (plain, unit)]
    for _ in range(5):
        outs = [m(ids) for m in (plain, unit)]
        assert close(outs[0], outs[1], rtol=1e-10)
        for out, opt in zip(outs, opts):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(out.flatten(0, 1), ids.flatten()).backward()
            opt.step()


def test_umup_says_what_it_needs():
    with pytest.raises(AttributeError, match=r"mupkit\.nn\.Linear moved to mupkit\.unit\.Linear \(u-muP .*no bias"):
        mupkit.nn.Linear  # noqa: B018
    with pytest.raises(ValueError, match=r"0\.weight \(8, 4\) in Linear.*mupkit\.(nn|unit) parts.*base=dict"):
        mupkit.build(lambda width: torch.nn.Sequential(torch.nn.Linear(4, width)), target=dict(width=8),
                     parametrization="umup")
    with pytest.raises(ValueError, match="own depth rule"):
        mupkit.rules.get_parametrization("umup+completep")
    with pytest.raises(ValueError, match="base=dict"):
        mupkit.infer_plan(mupkit.models.mlp, target=dict(width=8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_tensor_is_unit_scaled_at_init_across_widths(dtype):
    """A u-muP transformer (depth 2, 8 x 32 tokens) at widths 64..1024: every weight, module
    output, output gradient and weight gradient has RMS in [0.5, 2], and the same RMS at every
    width (within 25%). By design, two are not unit: the readout's logits, ``fan_in^-1/2`` (muP's
    ``1/fan_in`` readout: the softmax starts uniform), and the q/k thirds of the fused qkv output's
    gradient, which vanish with muP's ``1/d_head`` attention logits (near-uniform attention at init),
    so only its v third is held to [0.5, 2]."""
    widths, by_width, worst = [64, 128, 256, 512, 1024], {}, (None, 1.0)
    for width in widths:
        torch.manual_seed(0)
        model = mupkit.build(mupkit.unit.TransformerDecoder, target=dict(width=width, depth=2, heads=4),
                             parametrization="umup").to(dtype)
        v_grads = {}

        def keep_grad(name):
            def hook(module, args, out):
                out.register_hook(lambda g: v_grads.__setitem__(name, g.unflatten(-1, (3, -1)).float()))
            return hook

        for name, module in model.named_modules():
            if name.endswith("attn.qkv"):
                module.register_forward_hook(keep_grad(name))
        ids = torch.randint(0, 256, (8, 32))
        rows = mupkit.umup.tensor_scales(model, ids, lambda m, x: m.loss(x))
        scales = {(kind, name): rms for kind, name, rms in rows}
        logits = scales.pop(("activation", "readout"))
        assert logits == pytest.approx(width ** -0.5, rel=0.15)
        for name, g in v_grads.items():
            qk, v = g[..., :2, :].pow(2).mean().sqrt().item(), g[..., 2, :].pow(2).mean().sqrt().item()
            assert 0.5 <= v <= 2 and qk < 0.2 * v, (name, qk, v)
            del scales[("activation grad", name)]
        for key, rms in scales.items():
            assert 0.5 <= rms <= 2, (width, key, rms)
            worst = max(worst, (key, rms), key=lambda kv: abs(torch.tensor(kv[1]).log().item()))
        by_width[width] = scales
    for key, rms in by_width[64].items():
        assert by_width[1024][key] == pytest.approx(rms, rel=0.25), key
    print(f"worst RMS ({dtype}): {worst}")


@pytest.mark.parametrize("optim", ["adam", "sgd", "adafactor"])
def test_coordinate_check_passes_under_umup(optim):
    """The built-in u-muP transformer, widths 64..1024 (16x), steps 1..4, on its unit-scaled loss;
    the same model with one LR for every parameter (SP's table on the unit ops) fails."""
    d = BUILTIN["umup-transformer"]

    def check(param):
        return mupkit.coord_check(d.constructor, list(d.widths), parametrization=param, optimizer=optim,
                                  lr=d.lr_for(optim), steps=4, seeds=2, batch=d.batch_for(optim), loss=d.loss,
                                  kwargs=d.kwargs(param, 64), show_progress=False).verdict(steps=range(1, 5))

    umup = check("umup")
    assert umup.passed, str(umup)
    if optim == "adam":
        sp = check("sp")
        assert not sp.passed and max(abs(r.slope) for r in sp.worst(1)) >= 0.3, str(sp)


def test_cli_runs_the_umup_transformer(tmp_path, capsys):
    code = cli(["coord-check", "--model", "umup-transformer", "--param", "umup", "--steps", "2", "--quiet",
                "--out", str(tmp_path / "u.png")])
    assert code == 0 and "PASS: umup" in capsys.readouterr().out and (tmp_path / "u.png").exists()


def test_plain_linear_input_layer_is_unit_scaled_and_equal_sizes_are_refused():
    """A plain nn.Linear first layer is a unit-scaled linear with a fixed fan-in (A_W and Adam LR
    fan_in^-1/2, as graphcore's uu.Linear used as a first layer), not an embedding lookup; a plain
    model whose base and target do not differ in width is refused, never silently left in SP."""
    torch.manual_seed(0)
    model = mupkit.build(models.mlp, base=dict(width=64), target=dict(width=256), parametrization="umup")
    spec = mupkit.plan_of(model)["0.weight"]
    assert spec.role is mupkit.Role.INPUT and spec.absorbed == pytest.approx(64 ** -0.5)
    assert spec.scales["adam"].lr == pytest.approx(64 ** -0.5 * 64 ** -0.5)  # C_W = fan_in^-1/2, times A_W
    out = model[0](torch.randn(4096, 64)) - model[0].bias
    assert 0.9 < out.pow(2).mean().sqrt().item() < 1.1  # unit scale, not sqrt(fan_in)
    with pytest.raises(ValueError, match="no parameter dim differs"):
        mupkit.build(models.mlp, base=dict(width=64), target=dict(width=64), parametrization="umup")
