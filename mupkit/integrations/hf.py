"""HuggingFace transformers models as mupkit constructors, built from a config (no weights).

``mupkit.build(hf.gpt2, base=dict(width=64), target=dict(width=1024))`` works like any
constructor. What HF models need beyond that, handled here or by mupkit's inference:

* attention ``scaling``: HF attention modules multiply the logits by ``module.scaling``
  (``head_dim^-1/2``); with ``base_width`` given it becomes muP's ``1/d`` law pinned to SP at the
  base (:func:`mupkit.nn.attention_scale`), keeping any extra factor HF applies (GPT-2's
  ``scale_attn_by_inverse_layer_idx``);
* GPT-2's ``Conv1D`` stores weights ``(in, out)``: mupkit's role inference knows the layout;
* tied embeddings (GPT-2): the tied readout keeps the embedding's init and takes muP's
  ``1/m_in`` as an input multiplier (:mod:`mupkit.plan`).

The returned module maps token ids ``(batch, seq)`` to logits, so coordinate checks and sweeps
treat it like mupkit's own GPT; the HF model is its ``hf`` attribute.
"""

from __future__ import annotations

import sys
import warnings

import torch
from torch import nn

from ..nn.multipliers import attention_scale


class CausalLM(nn.Module):
    """A HuggingFace causal LM as ``ids -> logits``."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=ids, use_cache=False).logits


#: attribute names HF attention modules give their head dim (BERT's ``attention_head_size``, GPT-NeoX's ``head_size``)
HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "head_size")


def mup_attention(model: nn.Module, base_head_dim: int) -> nn.Module:
    """Set every attention module's ``scaling`` to muP's ``1/d`` law pinned at ``base_head_dim``.

    An attention module is one with a float ``scaling`` and a head dim (an int ``head_dim``,
    ``attention_head_size`` or ``head_size``); any factor HF applies beyond ``head_dim^-1/2`` is kept. T5 scales
    no logits (``scaling = 1``, its ``1/sqrt(d)`` folded into the query init), so there muP's law
    is ``scaling = base_head_dim / head_dim``; set it yourself.
    """
    found = 0
    for module in model.modules():
        head_dim = next((getattr(module, a) for a in HEAD_DIM_ATTRS if isinstance(getattr(module, a, None), int)),
                        None)
        if isinstance(getattr(module, "scaling", None), float) and head_dim is not None:
            extra = module.scaling * head_dim ** 0.5  # HF's own factor beyond head_dim^-1/2
            module.scaling = extra * attention_scale(head_dim, base_head_dim)
            found += 1
    if not found:
        raise ValueError(f"{type(model).__name__} has no attention module with a float `scaling` and a head dim "
                         f"({' or '.join(HEAD_DIM_ATTRS)}); set its attention scale to muP's 1/d yourself "
                         f"(mupkit.nn.attention_scale)")
    return model


def hide_unloadable_torchvision() -> None:
    """Make a torchvision that cannot load look absent to transformers (with a warning).

    A torchvision wheel built for another torch (e.g. PyPI's CUDA wheel beside a CPU-only torch)
    fails at import ("operator torchvision::nms does not exist"), and transformers imports
    torchvision whenever it finds it, so building any HF model would fail on an import these text
    models never need. An entry of None in ``sys.modules`` makes ``importlib.util.find_spec``
    report the package as absent; a torchvision that imports cleanly is left alone.
    """
    if "torchvision" in sys.modules and sys.modules["torchvision"] is None:
        return
    try:
        import torchvision  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any failure means transformers cannot use it either
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision"] = None
        warnings.warn(f"torchvision is installed but cannot load ({err!r}); mupkit hides it from transformers, "
                      f"whose text models do not need it. Install the torchvision build matching torch "
                      f"{torch.__version__} (or uninstall torchvision) to silence this.", stacklevel=3)


def _head_dim(width: int, n_head: int) -> int:
    if width % n_head:
        raise ValueError(f"width={width} is not divisible by n_head={n_head}: every HF attention head needs width / "
                         f"n_head dims; pick widths that are multiples of n_head (or pass n_head=...)")
    return width // n_head


def gpt2(width: int = 64, *, depth: int = 2, n_head: int = 4, vocab: int = 256, max_len: int = 64,
         base_width: int | None = None, tie: bool = True) -> CausalLM:
    """``GPT2LMHeadModel`` with ``n_embd=width`` (dropout off); ``base_width``: muP attention."""
    hide_unloadable_torchvision()
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=width, n_layer=depth, n_head=n_head, vocab_size=vocab, n_positions=max_len,
                        tie_word_embeddings=tie, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
                        bos_token_id=None, eos_token_id=None)
    model = GPT2LMHeadModel(config)
    if base_width is not None:
        mup_attention(model, _head_dim(base_width, n_head))
    return CausalLM(model)


def llama(width: int = 64, *, depth: int = 2, n_head: int = 4, vocab: int = 256, max_len: int = 64,
          base_width: int | None = None, tie: bool = False, mlp_ratio: int = 4) -> CausalLM:
    """``LlamaForCausalLM`` with ``hidden_size=width``, SwiGLU ``intermediate_size = mlp_ratio *
    width`` (an integer ratio keeps the width multipliers exact; Llama's 8/3 rounded to a multiple
    works too, with slightly uneven multipliers), full multi-head attention; ``base_width``: muP
    attention."""
    hide_unloadable_torchvision()
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=width, intermediate_size=mlp_ratio * width,
                         num_hidden_layers=depth, num_attention_heads=n_head, num_key_value_heads=n_head,
                         head_dim=_head_dim(width, n_head), vocab_size=vocab, max_position_embeddings=max_len,
                         tie_word_embeddings=tie)
    model = LlamaForCausalLM(config)
    if base_width is not None:
        mup_attention(model, _head_dim(base_width, n_head))
    return CausalLM(model)
