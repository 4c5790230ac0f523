"""HuggingFace transformers models built from configs (no weights) through mupkit.integrations.hf."""

from __future__ import annotations

import pytest
import torch

import mupkit
from mupkit.zoo import BUILTIN

transformers = pytest.importorskip("transformers")  # test extra
from mupkit.integrations import hf  # noqa: E402


def test_gpt2_plan_handles_conv1d_layout_tied_embeddings_and_attention_scaling():
    model = mupkit.build(hf.gpt2, base=dict(width=64, base_width=64), target=dict(width=256, base_width=64))
    plan = mupkit.plan_of(model)
    c_attn = plan["hf.transformer.h.0.attn.c_attn.weight"]  # Conv1D: (in, out) = (256, 768)
    assert c_attn.target == (256, 768) and (c_attn.fan_in_axis, c_attn.fan_out_axis) == (0, 1)
    assert c_attn.scales["adam"].lr == pytest.approx(1 / 4) and c_attn.init_std == pytest.approx(0.02 / 2, rel=0.05)
    assert plan["hf.transformer.wte.weight"].tied_readouts == ("hf.lm_head",)
    assert plan.input_multipliers == {"hf.lm_head": 0.25}  # the readout's 1/m_in, kept off the shared weight
    attn = model.hf.transformer.h[0].attn
    assert attn.scaling == pytest.approx(mupkit.nn.attention_scale(64, 16))  # 1/d pinned at base head dim 16
    base = hf.gpt2(64, base_width=64).hf.transformer.h[0].attn
    assert base.scaling == pytest.approx(16 ** -0.5)  # SP's 1/sqrt(d) at the base
    ids = torch.randint(0, 256, (2, 8))
    assert model(ids).shape == (2, 8, 256)


def test_llama_plan_and_a_clear_error_for_models_without_attention_scaling():
    plan = mupkit.infer_plan(hf.llama, base=dict(width=64, base_width=64), target=dict(width=512, base_width=64))
    assert plan["hf.lm_head.weight"].role is mupkit.Role.OUTPUT and plan["hf.lm_head.weight"].absorbed == 1 / 8
    assert plan["hf.model.layers.1.mlp.down_proj.weight"].m_in == 8.0
    with pytest.raises(ValueError, match="no attention module"):
        hf.mup_attention(torch.nn.Linear(2, 2), 16)


@pytest.mark.parametrize("name", ["hf-gpt2", "hf-llama"])
def test_hf_models_pass_the_coordinate_check_under_mup_and_fail_under_sp(name):
    """Widths 64, 256, 1024, 4 Adam steps. GPT-2 is checked untied, like the built-in GPT, so its
    readout can be zero-initialized (the tied readout's plan is tested above)."""
    d = BUILTIN[name]

    def check(param):
        return mupkit.coord_check(d.constructor, list(d.widths)[::2], parametrization=param, optimizer="adam",
                                  lr=d.lr_for("adam"), steps=4, seeds=2, batch=d.batch_for("adam"),
                                  kwargs=d.kwargs(param, 64), show_progress=False).verdict(steps=range(1, 5))

    mup, sp = check("mup"), check("sp")
    assert mup.passed, str(mup)
    assert max(abs(r.slope) for r in sp.worst(1)) >= 0.5, str(sp)


@pytest.mark.parametrize("model_class,config_class", [("GPTNeoXForCausalLM", "GPTNeoXConfig"),
                                                      ("BertForMaskedLM", "BertConfig")])
def test_mup_attention_finds_every_hf_head_dim_attribute(model_class, config_class):
    """GPT-NeoX names its head dim ``head_size``, BERT ``attention_head_size``: both get muP's 1/d,
    and the usage trace then sees no attention left at 1/sqrt(d)."""
    def make(width, base_width=None):
        config = getattr(transformers, config_class)(hidden_size=width, intermediate_size=4 * width,
                                                     num_hidden_layers=1, num_attention_heads=4, vocab_size=64,
                                                     max_position_embeddings=32)
        model = getattr(transformers, model_class)(config)
        return model if base_width is None else hf.mup_attention(model, base_width // 4)

    scalings = [m.scaling for m in make(128, base_width=64).modules() if isinstance(getattr(m, "scaling", None), float)]
    assert scalings and all(s == pytest.approx(mupkit.nn.attention_scale(32, 16)) for s in scalings)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    plan = mupkit.infer_plan(make, base=dict(width=64, base_width=64), target=dict(width=256, base_width=64),
                             example_inputs=ids)
    assert plan.notes == ()
