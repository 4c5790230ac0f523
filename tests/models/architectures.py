"""Real public architectures as mupkit constructors ``make(width, depth)``, built from small configs.

Every model is built from a config (no weights are downloaded) and maps one input batch to its
output: token ids ``(batch, seq)`` to logits for the language models, images ``(batch, 3, 32, 32)``
to class logits for ViT and ResNet. ``width`` scales the hidden size and every intermediate size
by an integer ratio; the head count is fixed, so the head dim scales (muP's width scaling);
``depth`` is the number of layers (ResNet: blocks per stage). Vocab (256), sequence length,
image size and class count are fixed; dropout is off.

``base_width`` (default None: the model as its library builds it) makes the forward muP's: the
attention logits scaled by ``1/d`` pinned to SP's ``1/sqrt(d)`` at the base head dim
(:func:`mupkit.nn.attention_scale`), and every other width-dependent constant of the forward
pinned to its value at ``base_width`` (T5's ``d_model**-0.5`` before a tied readout,
x-transformers' ``dim**-0.5`` on positions and on the tied logits). ResNet and Mamba have no
attention and no such constant, so it changes nothing there. ``tie`` (where a model ties its
readout by default) unties it, so a coordinate check can zero-initialize the readout.

``ARCHITECTURES[name]`` holds each model's constructor, a ``batch()`` giving ``(inputs, targets)``
that fit it, and its parameter families: ``(family, regex)`` pairs, the first ``re.fullmatch``
on a parameter's name wins (names as ``named_parameters()`` reports them; a tied weight appears
once, under its first registration). ``mupkit.trace.run_trace(model, inputs).uses`` shows what
the forward does with each parameter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from mupkit.integrations.hf import CausalLM, hide_unloadable_torchvision, mup_attention
from mupkit.nn import attention_scale

hide_unloadable_torchvision()

VOCAB = 256
SEQ = 16
MAX_LEN = 64
N_HEAD = 4
IMAGE = 32
PATCH = 8
CLASSES = 10
BATCH = 2


def _head_dim(width: int, n_head: int = N_HEAD) -> int:
    if width % n_head:
        raise ValueError(f"width={width} must be a multiple of {n_head} heads")
    return width // n_head


# --------------------------------------------------------------------------- wrappers


class MaskedLM(nn.Module):
    """A HuggingFace masked LM (BERT) as ``ids -> logits``."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=ids).logits


class Seq2SeqLM(nn.Module):
    """T5 as ``ids -> logits``: the ids are the encoder input, and, shifted right by one (the
    decoder start token first), the decoder input, as in teacher-forced training on ``ids``."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        decoder_ids = self.hf._shift_right(ids)
        return self.hf(input_ids=ids, decoder_input_ids=decoder_ids, use_cache=False).logits


class ImageClassifier(nn.Module):
    """A HuggingFace image classifier (ViT, ResNet) as ``pixels -> logits``."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.hf(pixel_values=pixels).logits


# --------------------------------------------------------------------------- constructors


def _mup_hf(model: nn.Module, base_width: int | None) -> nn.Module:
    """HF attention modules with a ``scaling`` and a ``head_dim``: muP's ``1/d`` pinned at the base."""
    return model if base_width is None else mup_attention(model, _head_dim(base_width))


def gpt2(width: int = 64, depth: int = 2, base_width: int | None = None, tie: bool = True) -> nn.Module:
    """``GPT2LMHeadModel``: Conv1D ``(in, out)`` weights, fused ``c_attn``, tied readout."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=width, n_inner=4 * width, n_layer=depth, n_head=N_HEAD, vocab_size=VOCAB,
                        n_positions=MAX_LEN, tie_word_embeddings=tie, attn_pdrop=0.0, resid_pdrop=0.0,
                        embd_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    return CausalLM(_mup_hf(GPT2LMHeadModel(config), base_width))


def llama(width: int = 64, depth: int = 2, base_width: int | None = None) -> nn.Module:
    """``LlamaForCausalLM``: SwiGLU MLP ``4 * width``, full multi-head attention, untied readout."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=depth,
                         num_attention_heads=N_HEAD, num_key_value_heads=N_HEAD, head_dim=_head_dim(width),
                         vocab_size=VOCAB, max_position_embeddings=MAX_LEN, tie_word_embeddings=False,
                         attention_dropout=0.0, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return CausalLM(_mup_hf(LlamaForCausalLM(config), base_width))


def qwen2(width: int = 64, depth: int = 2, base_width: int | None = None) -> nn.Module:
    """``Qwen2ForCausalLM``: q/k/v with biases, grouped-query attention (4 query heads, 2 kv heads)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=depth,
                         num_attention_heads=N_HEAD, num_key_value_heads=N_HEAD // 2, vocab_size=VOCAB,
                         max_position_embeddings=MAX_LEN, tie_word_embeddings=False, use_sliding_window=False,
                         attention_dropout=0.0, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return CausalLM(_mup_hf(Qwen2ForCausalLM(config), base_width))


def mixtral(width: int = 64, depth: int = 2, experts: str | None = None, base_width: int | None = None) -> nn.Module:
    """``MixtralForCausalLM``: 4 experts, top-2, expert MLP ``2 * width``; transformers 5 stores the
    experts fused as 3-D parameters ``gate_up_proj (E, 2*ffn, width)``, ``down_proj (E, width, ffn)``.

    ``experts``: transformers' ``experts_implementation``. ``None`` is its default, ``"grouped_mm"``
    on a torch with ``_grouped_mm`` (one ``_grouped_mm`` per projection on ``W.transpose(-2, -1)``);
    ``"eager"`` loops over the experts hit (``W[e]`` then ``F.linear``, data-dependent: ``nonzero``);
    ``"batched_mm"`` gathers ``W[expert_ids]`` per (token, slot) and uses ``bmm``."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=depth,
                           num_attention_heads=N_HEAD, num_key_value_heads=N_HEAD // 2, head_dim=_head_dim(width),
                           num_local_experts=4, num_experts_per_tok=2, vocab_size=VOCAB,
                           max_position_embeddings=MAX_LEN, tie_word_embeddings=False, attention_dropout=0.0,
                           router_jitter_noise=0.0, output_router_logits=False,
                           bos_token_id=None, eos_token_id=None, pad_token_id=None,
                           **({} if experts is None else {"experts_implementation": experts}))
    return CausalLM(_mup_hf(MixtralForCausalLM(config), base_width))


def mixtral_eager(width: int = 64, depth: int = 2, base_width: int | None = None) -> nn.Module:
    """:func:`mixtral` with the per-expert loop (``experts_implementation="eager"``)."""
    return mixtral(width, depth, experts="eager", base_width=base_width)


def mixtral_batched(width: int = 64, depth: int = 2, base_width: int | None = None) -> nn.Module:
    """:func:`mixtral` with gathered expert weights and ``bmm`` (``experts_implementation="batched_mm"``)."""
    return mixtral(width, depth, experts="batched_mm", base_width=base_width)


def bert(width: int = 64, depth: int = 2, base_width: int | None = None, tie: bool = True) -> nn.Module:
    """``BertForMaskedLM``: learned positions and token types, post-LN, masked-LM head (dense +
    LayerNorm + decoder tied to the word embedding, with its own vocab-sized bias)."""
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=depth,
                        num_attention_heads=N_HEAD, vocab_size=VOCAB, max_position_embeddings=MAX_LEN,
                        type_vocab_size=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        tie_word_embeddings=tie, pad_token_id=0)
    model = BertForMaskedLM(config)
    return MaskedLM(model if base_width is None else mup_attention(model, _head_dim(base_width)))


def t5(width: int = 64, depth: int = 2, base_width: int | None = None, tie: bool = True,
       zero_query: bool = False) -> nn.Module:
    """``T5ForConditionalGeneration``: encoder-decoder, relative position buckets, RMS norms, ReLU
    MLP ``4 * width``, readout tied to the shared embedding with the decoder output scaled by
    ``d_model**-0.5`` (``tie_word_embeddings=True``); ``d_kv = width / 4`` so the head dim scales.

    T5 scales no logits: its attention's ``scaling`` is 1.0 and the ``1/sqrt(d_kv)`` is folded into
    the query's init (std ``(d_model * d_kv)^-1/2``). mupkit initializes the query relative to the
    base (hidden: ``x m^-1/2``), which keeps the folded factor at its base value
    ``d_kv_base^-1/2``: the logits are then scaled by a constant. With ``base_width``, ``scaling``
    becomes ``d_kv_base / d_kv`` (1 at the base), so the logits' total scale is muP's
    ``sqrt(d_kv_base) / d_kv``; a tied readout's ``d_model**-0.5`` is pinned at ``base_width**-0.5``
    (``model_dim``, read only there). ``tie=False`` gives the readout its own weight (init
    ``N(0, 1/d_model)``) and no rescale: transformers 5's ``T5Config`` turns
    ``tie_word_embeddings=False`` into ``scale_decoder_outputs=False`` and ties the weights anyway.

    ``zero_query``: zero-initialize every query projection (Tensor Programs V, App. D.2; mup's
    README), so the logits are 0 at init at every width. T5's keys have coordinates of size 1
    (std ``d_model^-1/2``), so its base logits are O(1); muP's ``1/d`` makes them fade like
    ``d^-1/2`` at init, and the attention's output changes with width at init (a transient that
    muP's theory allows and zero queries remove)."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(d_model=width, d_ff=4 * width, d_kv=_head_dim(width), num_heads=N_HEAD, num_layers=depth,
                      num_decoder_layers=depth, vocab_size=VOCAB, dropout_rate=0.0, feed_forward_proj="relu",
                      tie_word_embeddings=tie, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    model = T5ForConditionalGeneration(config)
    if base_width is not None:
        base_kv = _head_dim(base_width)
        for module in model.modules():
            if hasattr(module, "key_value_proj_dim") and isinstance(getattr(module, "scaling", None), float):
                module.scaling = base_kv / module.key_value_proj_dim
        model.model_dim = base_width  # the decoder output's d_model**-0.5 (tied readout only), pinned
    if zero_query:
        for module in model.modules():
            if hasattr(module, "key_value_proj_dim"):
                nn.init.zeros_(module.q.weight)
    if not tie:  # T5Config forces tie_word_embeddings=True (the False only drops the rescale): untie here
        model.lm_head.weight = nn.Parameter(torch.randn(VOCAB, width) * width ** -0.5)
    return Seq2SeqLM(model)


def vit(width: int = 64, depth: int = 2, base_width: int | None = None) -> nn.Module:
    """``ViTForImageClassification``: 32x32 images, 8x8 patches (16 + CLS tokens), MLP ``4 * width``."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=depth,
                       num_attention_heads=N_HEAD, image_size=IMAGE, patch_size=PATCH, num_channels=3,
                       num_labels=CLASSES, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return ImageClassifier(_mup_hf(ViTForImageClassification(config), base_width))


def resnet(width: int = 64, depth: int = 2, base_width: int | None = None) -> nn.Module:
    """``ResNetForImageClassification``: basic blocks, two stages of ``width`` and ``2 * width``
    channels (stem ``width``), ``depth`` blocks per stage."""
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(num_channels=3, embedding_size=width, hidden_sizes=[width, 2 * width],
                          depths=[depth, depth], layer_type="basic", hidden_act="relu", num_labels=CLASSES)
    return ImageClassifier(ResNetForImageClassification(config))


def mamba(width: int = 64, depth: int = 2, base_width: int | None = None, tie: bool = True) -> nn.Module:
    """``MambaForCausalLM`` (torch-only slow path on CPU): ``d_inner = 2 * width``, state 16,
    ``dt_rank = width / 16`` ("auto"), tied readout."""
    from transformers import MambaConfig, MambaForCausalLM

    config = MambaConfig(hidden_size=width, num_hidden_layers=depth, state_size=16, expand=2, conv_kernel=4,
                         time_step_rank="auto", vocab_size=VOCAB, tie_word_embeddings=tie, use_mambapy=False,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return CausalLM(MambaForCausalLM(config))


def x_transformer(width: int = 64, depth: int = 2, base_width: int | None = None, tie: bool = True) -> nn.Module:
    """x-transformers ``TransformerWrapper(Decoder)``: absolute positions (scaled by ``dim**-0.5``),
    pre-LN, readout tied to the token embedding (``x @ emb.weight.t() * dim**-0.5``).

    x-transformers takes no attention scale as an argument; each ``Attend`` module reads its
    ``scale`` attribute (``dim_head**-0.5`` from ``Attention``) in the forward, so ``base_width``
    sets it there, and pins the positions' ``scale`` and ``tie_embedding_scale`` at the base."""
    from x_transformers import Decoder, TransformerWrapper

    model = TransformerWrapper(num_tokens=VOCAB, max_seq_len=MAX_LEN, tie_embedding=tie,
                               attn_layers=Decoder(dim=width, depth=depth, heads=N_HEAD,
                                                   attn_dim_head=_head_dim(width), ff_mult=4, attn_dropout=0.0,
                                                   ff_dropout=0.0))
    if base_width is not None:
        for module in model.modules():
            if type(module).__name__ == "Attend" and module.scale is not None:
                module.scale = attention_scale(_head_dim(width), _head_dim(base_width))
        model.pos_emb.scale = base_width ** -0.5
        if tie:
            model.tie_embedding_scale = base_width ** -0.5
    return model


# --------------------------------------------------------------------------- batches


def token_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``(2, 16)`` and next-token targets."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (BATCH, SEQ + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def masked_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``(2, 16)`` and the same ids as masked-LM targets (every position scored)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (BATCH, SEQ), generator=g)
    return ids, ids.clone()


def image_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(2, 3, 32, 32)`` and class labels."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, 3, IMAGE, IMAGE, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g)


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Architecture:
    make: Callable[..., nn.Module]
    batch: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    families: tuple[tuple[str, str], ...]  # (family, regex), first fullmatch wins
    notes: str = ""
    depth_containers: tuple[str, ...] = field(default=())  # module lists that grow with depth

    def family(self, name: str) -> str:
        for fam, pattern in self.families:
            if re.fullmatch(pattern, name):
                return fam
        raise KeyError(f"parameter {name!r} is in no family of {self.make.__name__}")


_LN = r".*(ln_\d|ln_f|norm|LayerNorm|layernorm|layer_norm)[^.]*\.(weight|bias)"

_MIXTRAL = (
    ("embedding", r"hf\.model\.embed_tokens\.weight"),
    ("attention_qkv", r".*\.self_attn\.[qkv]_proj\.weight"),
    ("attention_o", r".*\.self_attn\.o_proj\.weight"),
    ("router", r".*\.mlp\.gate\.weight"),
    ("experts", r".*\.mlp\.experts\.(gate_up|down)_proj"),
    ("norm", r".*norm\.weight"),
    ("readout", r"hf\.lm_head\.weight"),
)

ARCHITECTURES: dict[str, Architecture] = {
    "gpt2": Architecture(gpt2, token_batch, (
        ("embedding", r"hf\.transformer\.wte\.weight"),
        ("positional", r"hf\.transformer\.wpe\.weight"),
        ("attention_qkv", r".*\.attn\.c_attn\.weight"),
        ("attention_o", r".*\.attn\.c_proj\.weight"),
        ("attention_bias", r".*\.attn\.c_(attn|proj)\.bias"),
        ("mlp", r".*\.mlp\.c_(fc|proj)\.weight"),
        ("mlp_bias", r".*\.mlp\.c_(fc|proj)\.bias"),
        ("norm", _LN),
    ), depth_containers=("hf.transformer.h",)),
    "llama": Architecture(llama, token_batch, (
        ("embedding", r"hf\.model\.embed_tokens\.weight"),
        ("attention_qkv", r".*\.self_attn\.[qkv]_proj\.weight"),
        ("attention_o", r".*\.self_attn\.o_proj\.weight"),
        ("mlp", r".*\.mlp\.(gate|up|down)_proj\.weight"),
        ("norm", r".*norm\.weight"),
        ("readout", r"hf\.lm_head\.weight"),
    ), depth_containers=("hf.model.layers",)),
    "qwen2": Architecture(qwen2, token_batch, (
        ("embedding", r"hf\.model\.embed_tokens\.weight"),
        ("attention_qkv", r".*\.self_attn\.[qkv]_proj\.weight"),
        ("attention_bias", r".*\.self_attn\.[qkv]_proj\.bias"),
        ("attention_o", r".*\.self_attn\.o_proj\.weight"),
        ("mlp", r".*\.mlp\.(gate|up|down)_proj\.weight"),
        ("norm", r".*norm\.weight"),
        ("readout", r"hf\.lm_head\.weight"),
    ), depth_containers=("hf.model.layers",)),
    "mixtral": Architecture(mixtral, token_batch, _MIXTRAL, depth_containers=("hf.model.layers",)),
    "mixtral_eager": Architecture(mixtral_eager, token_batch, _MIXTRAL, depth_containers=("hf.model.layers",)),
    "mixtral_batched": Architecture(mixtral_batched, token_batch, _MIXTRAL, depth_containers=("hf.model.layers",)),
    "bert": Architecture(bert, masked_batch, (
        ("embedding", r"hf\.bert\.embeddings\.(word|token_type)_embeddings\.weight"),
        ("positional", r"hf\.bert\.embeddings\.position_embeddings\.weight"),
        ("attention_qkv", r".*\.attention\.self\.(query|key|value)\.weight"),
        ("attention_o", r".*\.attention\.output\.dense\.weight"),
        ("attention_bias", r".*\.attention\.(self\.(query|key|value)|output\.dense)\.bias"),
        ("mlp", r".*\.(intermediate|output)\.dense\.weight"),
        ("mlp_bias", r".*\.(intermediate|output)\.dense\.bias"),
        ("head_transform", r"hf\.cls\.predictions\.transform\.dense\.weight"),
        ("head_transform_bias", r"hf\.cls\.predictions\.transform\.dense\.bias"),
        ("norm", r".*LayerNorm\.(weight|bias)"),
        ("readout_bias", r"hf\.cls\.predictions\.(decoder\.)?bias"),
    ), depth_containers=("hf.bert.encoder.layer",)),
    "t5": Architecture(t5, token_batch, (
        ("embedding", r"hf\.shared\.weight"),
        ("relative_position", r".*\.relative_attention_bias\.weight"),
        ("attention_qkv", r".*\.(SelfAttention|EncDecAttention)\.[qkv]\.weight"),
        ("attention_o", r".*\.(SelfAttention|EncDecAttention)\.o\.weight"),
        ("mlp", r".*\.DenseReluDense\.w[io]\.weight"),
        ("norm", r".*layer_norm\.weight"),
    ), depth_containers=("hf.encoder.block", "hf.decoder.block")),
    "vit": Architecture(vit, image_batch, (
        ("patch_embedding", r".*\.patch_embeddings\.projection\.weight"),
        ("patch_embedding_bias", r".*\.patch_embeddings\.projection\.bias"),
        ("cls_token", r"hf\.vit\.embeddings\.cls_token"),
        ("positional", r"hf\.vit\.embeddings\.position_embeddings"),
        ("attention_qkv", r".*\.attention\.[qkv]_proj\.weight"),
        ("attention_o", r".*\.attention\.o_proj\.weight"),
        ("attention_bias", r".*\.attention\.[qkvo]_proj\.bias"),
        ("mlp", r".*\.mlp\.fc[12]\.weight"),
        ("mlp_bias", r".*\.mlp\.fc[12]\.bias"),
        ("norm", r".*layernorm[^.]*\.(weight|bias)"),
        ("readout", r"hf\.classifier\.weight"),
        ("readout_bias", r"hf\.classifier\.bias"),
    ), depth_containers=("hf.vit.layers",)),
    "resnet": Architecture(resnet, image_batch, (
        ("conv_stem", r"hf\.resnet\.embedder\.embedder\.convolution\.weight"),
        ("conv", r".*\.(layer\.\d+|shortcut)\.convolution\.weight"),
        ("norm", r".*\.normalization\.(weight|bias)"),
        ("readout", r"hf\.classifier\.1\.weight"),
        ("readout_bias", r"hf\.classifier\.1\.bias"),
    ), depth_containers=("hf.resnet.encoder.stages.0.layers", "hf.resnet.encoder.stages.1.layers")),
    "mamba": Architecture(mamba, token_batch, (
        ("embedding", r"hf\.backbone\.embeddings\.weight"),
        ("in_out_proj", r".*\.mixer\.(in|out)_proj\.weight"),
        ("x_proj", r".*\.mixer\.x_proj\.weight"),
        ("dt_proj", r".*\.mixer\.dt_proj\.weight"),
        ("dt_bias", r".*\.mixer\.dt_proj\.bias"),
        ("conv1d", r".*\.mixer\.conv1d\.weight"),
        ("conv1d_bias", r".*\.mixer\.conv1d\.bias"),
        ("A_log", r".*\.mixer\.A_log"),
        ("D", r".*\.mixer\.D"),
        ("norm", r".*norm[^.]*\.weight"),
    ), depth_containers=("hf.backbone.layers",)),
    "x_transformer": Architecture(x_transformer, token_batch, (
        ("embedding", r"token_emb\.emb\.weight"),
        ("positional", r"pos_emb\.emb\.weight"),
        ("attention_qkv", r".*\.to_[qkv]\.weight"),
        ("attention_o", r".*\.to_out\.weight"),
        ("mlp", r".*\.ff\.(0\.0|2)\.weight"),
        ("mlp_bias", r".*\.ff\.(0\.0|2)\.bias"),
        ("norm", r"attn_layers\.(layers\.\d+\.0\.0|final_norm)\.gamma"),
    ), depth_containers=("attn_layers.layers",)),
}
