"""Regenerate the committed coordinate-check figures and coord_checks/README.md.

Every built-in definition (mupkit.zoo) under muP with SP drawn above it, for Adam, SGD,
AdamAtan2, Adafactor, DAdaptAdam, Prodigy and ScaledAdam; and depth checks (muP, Depth-muP,
CompleteP) of the residual MLP and the transformer:

    python coord_checks/run.py            # all, ~20 minutes on 2 CPU cores
    python coord_checks/run.py mlp cnn    # some
    python coord_checks/run.py depth      # only the depth section
    python coord_checks/run.py umup       # only the u-muP section
    python coord_checks/run.py muon       # only the Muon section
    python coord_checks/run.py shampoo    # only the Shampoo (SOAP) section
"""

from __future__ import annotations

import pathlib
import sys

import mupkit
from mupkit.zoo import BUILTIN

HERE = pathlib.Path(__file__).parent
MODELS = ["mlp", "cnn", "transformer", "resmlp"]
OPTIMIZERS = ["adam", "sgd", "adam-atan2", "adafactor", "dadapt-adam", "prodigy", "scaled-adam"]


def run(name: str, optim: str, parametrizations: tuple[str, str] = ("sp", "mup")) -> tuple[str, str, str]:
    d = BUILTIN[name]
    base = min(d.widths)
    batch = d.batch_for(optim)
    checks = [mupkit.coord_check(d.constructor, list(d.widths), parametrization=p, optimizer=optim,
                                 lr=d.lr_for(optim), steps=4, seeds=3, batch=batch, kwargs=d.kwargs(p, base),
                                 loss=d.loss) for p in parametrizations]
    checks[1].plot(str(HERE / f"{name}_{optim}.png"), compare=checks[0])
    return tuple(c.verdict().summary() for c in checks) + (f"{name}_{optim}.png",)


UMUP_OPTIMIZERS = ["adam", "sgd"]


def umup_section(rows: list[tuple[str, ...]]) -> list[str]:
    lines = ["## u-muP", "",
             "`mupkit.unit.TransformerDecoder` under u-muP (no base model; unit-scaled ops), widths 64..1024, 3 seeds, "
             "4 steps; the comparison row (`sp`) gives every parameter the same LR. Figure: SP on top, u-muP below.",
             "", "| model | optimizer | one LR for all (SP) | u-muP |", "|---|---|---|---|"]
    lines += [f"| {n} | {o} | {sp} | {umup} |" for n, o, sp, umup, _ in rows]
    return lines + [""] + [f"### {n}, {o}, u-muP\n\n![{n} {o} u-muP]({fig})\n" for n, o, _, _, fig in rows]


class DoubleScaledMuon(mupkit.optim.Muon):
    """Control: Adam's hidden LR rule ``1/m_in`` applied to the orthogonalized matrices on top of
    Muon's own shape factor (the double scaling of Megatron-LM #3715)."""

    def __init__(self, params, **kwargs):
        def adam_rule(group):
            scales = group["mupkit_scales"]
            if not scales["muon"]["orthogonalize"]:
                return group
            return {**group, "mupkit_scales": {**scales, "muon": {**scales["muon"], **scales["adam"]}}}
        super().__init__([adam_rule(g) for g in params], **kwargs)


MUON_MODELS = ["mlp", "cnn", "transformer", "hf-llama"]
#: (label, parametrization, optimizer): muP with Muon, and the two controls that must fail
MUON_VARIANTS = [("muP + Muon", "mup", "muon"), ("(a) SP rules, Muon (no muP for the AdamW part)", "sp", "muon"),
                 ("(b) muP + Muon with Adam's 1/fan_in on the matrices", "mup", DoubleScaledMuon)]
MUON_METRIC = "delta_rms"


def run_muon(name: str) -> tuple[str, ...]:
    """One model under the three :data:`MUON_VARIANTS` (2 seeds, 4 steps, no weight decay), each
    judged by its activations' change since init and by every parameter's relative update against
    the law of the optimizer part that steps it; figures (activations): (a), then (b), above muP + Muon."""
    d = BUILTIN[name]
    base = min(d.widths)
    checks = [mupkit.coord_check(d.constructor, list(d.widths), parametrization=p, optimizer=optim,
                                 lr=d.lr_for("muon"), steps=4, seeds=2, batch=d.batch_for("muon"), kwargs=d.kwargs(p, base),
                                 loss=d.loss, updates=True, optimizer_kwargs={"weight_decay": 0.0}, show_progress=False)
              for _, p, optim in MUON_VARIANTS]
    checks[0].plot(str(HERE / f"{name}_muon.png"), compare=checks[1], metric=MUON_METRIC)
    checks[0].plot(str(HERE / f"{name}_muon-double-scaled.png"), compare=checks[2], metric=MUON_METRIC)
    verdicts = [(c.verdict(metric=MUON_METRIC), c.verdict(metric="l1", kind="update")) for c in checks]
    return tuple(f"**{'PASS' if all(v.passed for v in vs) else 'FAIL'}**<br>" + "<br>".join(v.summary() for v in vs)
                 for vs in verdicts)


def muon_section(rows: list[tuple[str, ...]]) -> list[str]:
    lines = ["## Muon", "",
             "`mupkit.optim.Muon` (Newton-Schulz for the hidden matrices, its AdamW part for the rest; muP family "
             "`muon`, the spectral rule of `mupkit/spectral.py`), 2 seeds, 4 steps, lr 0.02 for both parts, no weight "
             "decay. A cell passes when both its verdicts do. First, the activations' change since init "
             f"(`{MUON_METRIC}`). Second (`update`), every parameter's relative update `||W_t - W_(t-1)||_F / "
             "||W_0||_F`, judged against the law of the optimizer part that steps it (`mupkit/spectral.py`, "
             "\"Relative updates\"): a matrix Muon orthogonalizes steps with Theta(1) spectral norm but rank <= the "
             "rows it multiplies per step (tokens; batch x positions for a conv) while `W_0` has full rank, so the "
             "ratio goes like `sqrt(min(A, B, rows) / min(A, B))`: slope -1/2 in muP's rank-limited limit (width >> "
             "rows: every check here, 32 tokens, or 4 images of 8x8 for the CNN, at most 64 rows against a narrower "
             "side >= 64), 0 once a matrix is narrower than its rows (the check then warns). The AdamW part "
             "(embeddings, readout, vectors) keeps slope 0. Weight decay is off: its relative step `lr * wd` is "
             "width-free and would mix a slope-0 term into the matrices' updates. Expected: muP + Muon passes both; "
             "(a) SP + Muon fails the activations; (b) Adam's `1/fan_in` on top of Muon's shape factor fails the "
             "update law on every model (slope ~-3/2), and the activations only where the hidden matrices' own term "
             "shows (it hides behind the layers around them, `W dh` staying Theta(1), in the MLP and GPT). Figures: "
             "`<model>_muon.png` (a) above muP + Muon, `<model>_muon-double-scaled.png` (b) above muP + Muon "
             "(activations).",
             "", "| model | muP + Muon | " + " | ".join(v[0] for v in MUON_VARIANTS[1:]) + " |", "|---|---|---|---|"]
    lines += [f"| {n} | {a} | {b} | {c} |" for n, a, b, c in rows]
    return lines + [""] + [f"### {n}, Muon\n\n![{n} muon]({n}_muon.png)\n\n![{n} muon double scaled]"
                           f"({n}_muon-double-scaled.png)\n" for n, *_ in rows]


def _soap_with(rule: str, replace=None, **overrides):
    """A control: :func:`mupkit.optim.SOAP` with the ``shampoo`` scales of every group changed by
    ``replace(scales)`` (a dict of updated keys) and ``overrides`` of its keyword arguments."""
    def factory(params, **kwargs):
        def changed(group):
            scales = group["mupkit_scales"]
            return {**group, "mupkit_scales": {**scales, "shampoo": {**scales["shampoo"], **replace(scales)}}}
        return mupkit.optim.SOAP([changed(g) for g in params] if replace else params, **{**kwargs, **overrides})
    factory.__name__, factory.family, factory.__doc__ = f"SOAP-{rule}", mupkit.optim.SOAP.family, rule
    return factory


SHAMPOO_MODELS = ["mlp", "cnn", "transformer", "hf-llama"]
#: the base value of a fixed (absolute) eps in the controls (c) and (d)
SHAMPOO_ABSOLUTE_EPS = 1e-2
#: (label, parametrization, optimizer, figure suffix): muP with SOAP, and four controls that must fail
SHAMPOO_VARIANTS = [
    ("muP + SOAP", "mup", "shampoo", None),
    ("(a) SP rules, SOAP", "sp", "shampoo", "shampoo"),
    ("(b) muP with Adam's LR rule on the preconditioned matrices", "mup",
     _soap_with("adam-lr", lambda s: {"lr_scale": s["adam"]["lr_scale"], "wd_scale": s["adam"]["wd_scale"]}),
     "shampoo-adam-lr"),
    ("(c) muP LR, a fixed damping (eps)", "mup",
     _soap_with("fixed-eps", lambda s: {"eps_scale": 1.0}, damping="absolute", eps=SHAMPOO_ABSOLUTE_EPS),
     "shampoo-fixed-eps"),
    ("(d) muP LR, damping by per-role width exponents (the param_groups route)", "mup",
     _soap_with("role-eps", damping="absolute", eps=SHAMPOO_ABSOLUTE_EPS), "shampoo-role-eps"),
]
#: widths: the zoo's, but at most 512 for the transformers (their 4x MLP matrices stay within SOAP's
#: default max_precond_dim 2048, and the CPU time modest)
SHAMPOO_MAX_WIDTH = {"transformer": 512, "hf-llama": 512}
#: the relative damping: eps as a fraction of each parameter's gradient scale
SHAMPOO_EPS = 0.2


def run_shampoo(name: str) -> tuple[str, ...]:
    """One model under the :data:`SHAMPOO_VARIANTS` (heavyball SOAP, 2 seeds, 4 steps, no weight
    decay), judged by the activations' change since init; figures: each control above muP + SOAP."""
    d = BUILTIN[name]
    widths = [w for w in d.widths if w <= SHAMPOO_MAX_WIDTH.get(name, w)]
    checks = [mupkit.coord_check(d.constructor, widths, parametrization=p, optimizer=optim,
                                 lr=d.lr_for("shampoo"), steps=4, seeds=2, batch=d.batch_for("shampoo"),
                                 kwargs=d.kwargs(p, widths[0]), loss=d.loss, show_progress=False,
                                 optimizer_kwargs={"eps": SHAMPOO_EPS, "weight_decay": 0.0})
              for _, p, optim, _ in SHAMPOO_VARIANTS]
    for check, (*_, figure) in zip(checks[1:], SHAMPOO_VARIANTS[1:]):
        checks[0].plot(str(HERE / f"{name}_{figure}.png"), compare=check, metric="delta_rms")
    return tuple(c.verdict(metric="delta_rms").summary() for c in checks)


def shampoo_section(rows: list[tuple[str, ...]]) -> list[str]:
    labels = [v[0] for v in SHAMPOO_VARIANTS]
    lines = ["## Shampoo (SOAP)", "",
             "heavyball 3.2.1 `SOAP` (Adam in the eigenbasis of Shampoo's factors) through `mupkit.optim.SOAP`, muP "
             "family `shampoo` (docs/shampoo.md): LR `sqrt(m_out/m_in)` (absorbed readout `m_in^-1/2`, vectors 1) "
             f"and a relative damping, `eps` = {SHAMPOO_EPS} of each parameter's gradient scale (`||G||_F` for a "
             "matrix, `RMS(g)` for a vector) set before every step; lr 0.01, 2 seeds, 4 steps (SOAP's first step "
             "only builds its preconditioner), no weight decay, widths up to 512 for the transformers. Verdict: the "
             "activations' change since init (`delta_rms`). Expected: muP + SOAP passes; (a) SP fails (growing "
             "activations); (b) Adam's `1/m_in` on a step whose spectral norm is already width-free shrinks the "
             f"updates (slope ~-1); (c) a fixed eps ({SHAMPOO_ABSOLUTE_EPS}) damps the gradients that shrink with "
             "width more and more (SGD-like steps); (d) the same fixed eps times the rule's per-role damping "
             "multipliers holds where a layer's role sets its gradient's scale (the MLP, the CNN) and fails "
             "where it does not: under muP's `1/d` attention the query and key gradients shrink faster with "
             "width than the value's in the same role. Figures: `<model>_<control>.png`, each control above "
             "muP + SOAP.",
             "", "| model | " + " | ".join(labels) + " |", "|" + "---|" * (len(labels) + 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""] + [f"### {n}, Shampoo (SOAP)\n\n" + "\n\n".join(f"![{n} {fig}]({n}_{fig}.png)"
                                                                    for *_, fig in SHAMPOO_VARIANTS[1:]) + "\n"
                           for n, *_ in rows]


DEPTHS = [2, 4, 8, 16, 32]
DEPTH_PARAMS = ["mup", "depth-mup", "completep"]


def run_depth(name: str) -> tuple[str, ...]:
    """Width fixed at the smallest, depths 2..32, Adam: muP, Depth-muP, CompleteP; muP drawn above CompleteP."""
    d = BUILTIN[name]
    width = min(d.widths)
    checks = [mupkit.coord_check(d.constructor, width, depths=DEPTHS, parametrization=p, optimizer="adam",
                                 lr=d.lr_for("adam"), steps=4, seeds=3, batch=d.batch_for("adam", depth=True),
                                 kwargs=d.kwargs(p, width), updates=True) for p in DEPTH_PARAMS]
    checks[2].plot(str(HERE / f"depth_{name}.png"), compare=checks[0])
    cells = ["<br>".join(v.summary() for v in c.verdicts()) for c in checks]
    return (*cells, f"depth_{name}.png")


def depth_section(depth_rows: list[tuple[str, ...]]) -> list[str]:
    lines = ["## Depth", "",
             f"Width fixed, depths {DEPTHS[0]}..{DEPTHS[-1]}, Adam, 3 seeds, 4 steps. Three verdicts per cell. "
             "First, the residual stream against depth (the input of the first and the last block and of the modules "
             "after the blocks; a branch's own output is scaled by `m_L^-alpha` by design). Second (`stream_update`), "
             "the per-block relative update of the stream: `RMS(h_t - h_0) / RMS(h_0)` of the stream each block "
             "hands to the next, averaged over blocks (each block adds `1/L` of the change, so its mean over the "
             "blocks is depth-free under a depth rule). Third (`update`), the per-block relative weight update "
             "`||W_t - W_(t-1)|| / ||W_0||`, averaged over blocks (zero-initialized parameters, which have no scale "
             "to relate to, are not judged), judged against the rule's own law `m_L^(alpha-1)`: flat under "
             "CompleteP, `L^-1/2` under Depth-muP (its Adam LR `eta L^-1/2` on an init without depth factor: the "
             "\"lazy\" blocks CompleteP removes), 0 for muP. Expected: muP fails the first two (its stream and the "
             "stream's relative updates grow with depth); Depth-muP and CompleteP pass all three. Figures: muP above "
             "CompleteP.",
             "", "| model | muP | Depth-muP | CompleteP |", "|---|---|---|---|"]
    lines += [f"| {n} | {a} | {b} | {c} |" for n, a, b, c, _ in depth_rows]
    return lines + [""] + [f"### {n}, depth\n\n![{n} depth]({fig})\n" for n, *_, fig in depth_rows]


def _replace_before_umup(title: str, lines: list[str]) -> None:
    """Put ``lines`` into the README as the section ``title``, replacing it if present, else
    before the u-muP section."""
    readme = (HERE / "README.md").read_text()
    if title in readme:
        head, _, tail = readme.partition(title)
        readme = head + tail[tail.index("\n## ", 1) + 1:] if "\n## " in tail[1:] else head
    head, sep, tail = readme.partition("## u-muP")
    (HERE / "README.md").write_text(head.rstrip("\n") + "\n\n" + "\n".join(lines) + "\n" + sep + tail)


def main(names: list[str]) -> None:
    sections = {"shampoo": (shampoo_section, run_shampoo, SHAMPOO_MODELS, "## Shampoo"),
                "muon": (muon_section, run_muon, MUON_MODELS, "## Muon")}
    if names and names[0] in sections:  # only that section, (re)placed before the u-muP section
        section, run_model, models, title = sections[names[0]]
        lines = section([(n, *run_model(n)) for n in names[1:] or models])
        _replace_before_umup(title, lines)
        print("\n".join(lines))
        return
    if names == ["umup"]:  # only the u-muP section, inserted before the depth section
        readme = (HERE / "README.md").read_text()
        head, _, depth = readme.partition("## Depth")
        head = head.split("## u-muP", 1)[0].rstrip("\n") + "\n"
        lines = umup_section([("umup-transformer", o, *run("umup-transformer", o, ("sp", "umup")))
                              for o in UMUP_OPTIMIZERS])
        (HERE / "README.md").write_text(head + "\n".join(lines) + "\n" + ("## Depth" + depth if depth else ""))
        print("\n".join(lines))
        return
    if names == ["depth"]:  # only the depth section, replacing it in the existing README
        readme = (HERE / "README.md").read_text()
        head = readme.split("## Depth", 1)[0].rstrip("\n") + "\n"
        lines = depth_section([(n, *run_depth(n)) for n in ("resmlp", "transformer")])
        (HERE / "README.md").write_text(head + "\n".join(lines) + "\n")
        print("\n".join(lines))
        return
    rows = [(n, o, *run(n, o)) for n in names if n != "umup-transformer" for o in OPTIMIZERS]
    depth_rows = [(n, *run_depth(n)) for n in ("resmlp", "transformer") if n in names]
    lines = [
        "# Coordinate checks of the built-in models", "",
        "Generated by `python coord_checks/run.py` (definitions in `mupkit/zoo.py`; 3 seeds, 4 steps, 16x width",
        "range, tolerance 0.1). Each figure: SP on top, muP below; one panel per step (step 0 = init); x = width,",
        "y = mean |output| of each module (log2-log2), the band spans the seeds. **A pass looks flat**: every",
        "line horizontal from step 1 on (a readout may fall like width^-1/2 at step 0 only). SP fails: after one",
        "step the lines climb with width.", "",
        "| model | optimizer | SP | muP |", "|---|---|---|---|"]
    lines += [f"| {n} | {o} | {sp} | {mup} |" for n, o, sp, mup, _ in rows]
    lines += ["", "Readouts: an untied readout is zero-initialized (`zero_init=\"auto\"`, as in microsoft/mup's",
              "checks), so its line starts at step 1. A readout whose init output shrinks like width^-1/2 (tied to",
              "an embedding) is marked `expected` at step 0 and judged by its change since init from step 1 on.",
              "", "The transformer check uses an untied readout and few tokens for SGD (1 x 4; 2 x 16 for Adam). SGD's",
              "readout update for a token is a kernel sum over all batch tokens; random tokens have nearly",
              "orthogonal features, so cross-token terms add noise of relative size ~tokens/sqrt(width), which fades",
              "with width but dominates at CPU widths with many tokens (slope -0.2 at 64 tokens; see `mupkit/zoo.py`).",
              "", "Known open item: the CNN with Adafactor under muP (slope -0.18 at step 2, conv layer 6 and its ReLU). It",
              "passes with Adam, SGD and AdamAtan2 and the MLP, transformer and residual MLP pass with Adafactor. With",
              "the zero-initialized readout the body's gradients are tiny and shrink with width; Adafactor's torch-mode",
              "floor eps1 on the factored second moment then binds at the larger widths. A smaller eps1 removes that",
              "bias but leaves the widths 32..512 noisy; the cause of the rest is not yet found.",
              ""] + [f"### {n}, {o}\n\n![{n} {o}]({fig})\n" for n, o, _, _, fig in rows]
    if "umup-transformer" in names:
        lines += umup_section([("umup-transformer", o, *run("umup-transformer", o, ("sp", "umup")))
                               for o in UMUP_OPTIMIZERS])
    if depth_rows:
        lines += depth_section(depth_rows)
    (HERE / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:] or MODELS + ["umup-transformer"])
