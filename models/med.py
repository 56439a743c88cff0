"""MED: BLIP's multimodal mixture of encoder-decoder, one BERT-style text transformer.

The same stack serves three roles (paper section 3.1):
  * unimodal text encoder   ``mode='text'``        bidirectional self-attention only
  * image-grounded encoder  ``mode='multimodal'``  + cross-attention to image tokens
  * image-grounded decoder  ``is_decoder=True``    causal self-attention + cross-attention + LM head

Module names equal the original checkpoint keys (``embeddings.*``, ``encoder.layer.N.attention.self.query``,
``crossattention``, ``intermediate.dense``, ``output.LayerNorm`` ...), so official ``.pth`` files load strictly.
BERT is post-norm: ``x = LayerNorm(x + dropout(dense(sublayer(x))))``.

Letters in shape comments: B batch, L text length, T cached length, N image tokens, H hidden, h heads,
d head dim, V vocab.

Cross-attention keys/values of an image can be shared by several text rows: when ``encoder_hidden_states``
has batch ``B_img`` and the text batch is ``r * B_img``, row ``j`` attends to image ``j // r`` and the
image's K/V are computed once (beam search, ITM re-ranking, VQA answer ranking).
"""
from __future__ import annotations

import contextlib
import json
import platform
from dataclasses import dataclass, field, fields
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.layout import register_fused_layout
from models.layout import checkpoint_parameter_names, original_parameter_order  # noqa: F401  (earlier import path)
from models.losses import capturing, lm_loss, lm_loss_at_targets

# BERT keys that appear in BERT/HF json files but mean nothing here.
_IGNORED_CONFIG_KEYS = {
    'architectures', 'model_type', 'type_vocab_size', 'add_type_embeddings', 'transformers_version',
    'position_embedding_type', 'use_cache', 'gradient_checkpointing', 'classifier_dropout', 'torch_dtype',
    'bos_token_id', 'eos_token_id', 'sep_token_id', 'is_decoder', 'output_attentions', 'output_hidden_states',
    'return_dict', 'tie_word_embeddings', 'chunk_size_feed_forward',
}


# oneDNN's linear kernel (what torch.compile's CPU backend calls), present in x86 builds of PyTorch
_ONEDNN_LINEAR = (platform.machine() in ('x86_64', 'AMD64') and torch.backends.mkldnn.is_available()
                  and hasattr(torch.ops.mkldnn, '_linear_pointwise'))
# For 2-4 rows without autograd: the transposed product was the faster kernel on an AVX-512 host, oneDNN's on
# an AVX2-only one (beam-3 decode at batch 1: 1581 -> 1327 ms); see BENCHMARKS.md, CPU results.
_TRANSPOSED_FOR_FEW_ROWS = torch.backends.cpu.get_cpu_capability().startswith('AVX512')


def skinny_cpu_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``F.linear`` for a few rows on the CPU by a faster kernel, or None where none is known to be faster.

    Decoding feeds a handful of rows per step (beams x images) and is bound by reading the weights, which
    MKL's x @ W^T kernel streams at only 3-11 GB/s on 2 cores for 2-16 rows. Measured with
    benchmarks/cpu_linear.py (BERT-base shapes, weights from DRAM): the transposed product (W @ x^T)^T
    reads them at 11-32 GB/s for 2-4 rows, oneDNN's kernel at 11-28 GB/s for 1 and 5-16 rows (AVX-512
    host; on an AVX2-only host oneDNN's is also the faster one for 2-4 rows). oneDNN's kernel has no
    autograd formula, so with gradients on, 2-4 rows take the transposed product and other counts
    ``F.linear``. Same function; the fp32 sums run in another order, so results can differ in the last bits.
    """
    if x.device.type != 'cpu' or x.dtype != torch.float32 or weight.dtype != torch.float32 \
            or torch.is_autocast_enabled('cpu'):
        return None
    x2 = x.reshape(-1, x.shape[-1])
    rows = x2.shape[0]
    onednn = _ONEDNN_LINEAR and not torch.is_grad_enabled()
    if 2 <= rows <= 4 and (_TRANSPOSED_FOR_FEW_ROWS or not onednn):
        y = weight @ x2.T if bias is None else torch.addmm(bias[:, None], weight, x2.T)
        # back to row-major: a transposed view would reach attention with strided heads, which sends SDPA
        # to its math fallback (a copy of the keys per call); the copy here is only rows x out values
        y = y.T.contiguous()
    elif 1 <= rows <= 16 and onednn:
        y = torch.ops.mkldnn._linear_pointwise(x2, weight, bias, 'none', [], '')
    else:
        return None
    return y.reshape(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state-dict keys) with faster CPU kernels for a few rows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = skinny_cpu_linear(x, self.weight, self.bias)
        return super().forward(x) if y is None else y


@dataclass
class MEDConfig:
    """Hyper-parameters of the MED transformer (``configs/med_config.json``)."""
    vocab_size: int = 30524
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = 'gelu'
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    encoder_width: int = 768          # width of the states cross-attention reads (ViT width)
    add_cross_attention: bool = True
    twin_cross_attention: bool = False  # NLVR2: attend to two images, merge (reference 5.8)
    label_smoothing: float = 0.1        # LM loss (reference 3.4)
    extra: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_json_file(cls, path: str) -> 'MEDConfig':
        with open(path) as f:
            raw = json.load(f)
        return cls.from_dict(raw, source=path)

    @classmethod
    def from_dict(cls, raw: dict, source: str = '<dict>') -> 'MEDConfig':
        known = {f.name for f in fields(cls)} - {'extra'}
        unknown = set(raw) - known - _IGNORED_CONFIG_KEYS
        if unknown:
            raise ValueError(f"{source}: unknown MED config key(s) {sorted(unknown)}")
        if raw.get('hidden_act', 'gelu') != 'gelu':
            raise ValueError(f"{source}: hidden_act must be 'gelu', got {raw['hidden_act']!r}")
        return cls(**{k: v for k, v in raw.items() if k in known})

    def replace(self, **changes) -> 'MEDConfig':
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return MEDConfig(**values)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


BertConfig = MEDConfig  # the original's name


@dataclass
class MEDOutput:
    """Result of a MED forward; ``out[0]`` is ``last_hidden_state`` like HF's ModelOutput."""
    last_hidden_state: Optional[torch.Tensor] = None
    past_key_values: Optional[list] = None
    logits: Optional[torch.Tensor] = None
    loss: Optional[torch.Tensor] = None
    hidden_states: Optional[tuple] = None

    def __getitem__(self, i: int):
        values = [v for v in (self.loss, self.logits, self.last_hidden_state, self.past_key_values) if v is not None]
        return values[i]


# ---------------------------------------------------------------------------------------------- attention

_USE_SDPA = True


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Use the explicit-softmax attention (test oracle) instead of SDPA inside the block."""
    global _USE_SDPA
    previous, _USE_SDPA = _USE_SDPA, False
    try:
        yield
    finally:
        _USE_SDPA = previous


def attention(q, k, v, mask=None, dropout_p=0.0, is_causal=False):
    """softmax(q k^T / sqrt(d) + mask) v.   q [B,h,Lq,d]  k,v [B,h,Lk,d]  mask additive, broadcastable."""
    if _USE_SDPA:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if is_causal:
        Lq, Lk = scores.shape[-2:]
        causal = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float('-inf'))
    if mask is not None:
        scores = scores + mask
    probs = F.dropout(scores.softmax(-1), dropout_p)
    return probs @ v


class Attention(nn.Module):
    """Multi-head attention, BERT's ``self`` module: query from ``x``, key/value from ``x`` or a context.

    One class for bidirectional self-attention, causal self-attention (with a KV cache) and
    cross-attention (with keys/values precomputed once per image).

    Projections are fused: self-attention computes query, key and value with one ``qkv`` linear, cross-
    attention key and value of the image tokens with one ``kv`` linear (one matrix product and one weight
    read instead of three or two; fewer kernel launches per decode step). ``state_dict`` and
    ``load_state_dict`` keep the original layout (``query.*``, ``key.*``, ``value.*``): see
    ``models/layout.py``. ``named_parameters`` shows the fused names.
    """

    def __init__(self, cfg: MEDConfig, kv_width: int, cross: bool = False):
        super().__init__()
        self.heads = cfg.num_attention_heads
        H = cfg.hidden_size
        if cross:
            self.query = Linear(H, H)
            self.kv = Linear(kv_width, 2 * H)
        else:
            if kv_width != H:
                raise ValueError(f'self-attention reads the hidden states: kv_width {kv_width} != hidden_size {H}')
            self.qkv = Linear(H, 3 * H)
        self.dropout_p = cfg.attention_probs_dropout_prob
        register_fused_layout(self)

    @property
    def is_cross(self) -> bool:
        return hasattr(self, 'kv')

    def split_heads(self, x: torch.Tensor, n: int = 1):
        """[B,L,n*H] -> [B,h,L,d] (n=1), or n such views (fused projections; no copies)."""
        B, L, _ = x.shape
        if n == 1:
            return x.view(B, L, self.heads, -1).transpose(1, 2)
        return x.view(B, L, n, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Self-attention query, key, value of ``x`` [B,L,H], each [B,h,L,d], by one matrix product."""
        return self.split_heads(self.qkv(x), 3)

    def project_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention key and value of ``context`` [B_c,N,W], each [B_c,h,N,d], by one matrix product."""
        return self.split_heads(self.kv(context), 2)

    def forward(self, x, context=None, mask=None, is_causal=False, past_kv=None, kv=None):
        """x [B,L,H]; context [B_c,N,W]; mask additive; past_kv/kv: (k, v) each [B_c,h,T,d].

        Returns (out [B,L,H], (k, v)) where (k, v) is the cache to keep (self-attention) or the
        context's projections (cross-attention).
        """
        if self.is_cross:
            q = self.split_heads(self.query(x))                            # [B,h,L,d]
            if kv is None:
                if context is None:
                    raise ValueError('cross-attention needs image states (context) or their keys/values (kv)')
                kv = self.project_kv(context)
        else:
            if context is not None or kv is not None:
                raise ValueError('self-attention takes neither a context nor precomputed keys/values')
            q, k, v = self.project_qkv(x)
            kv = (k, v)
            if isinstance(past_kv, _CacheSlot):  # preallocated cache: write in place, attend to a view
                kv = past_kv.cache.update(past_kv.layer, k, v)
            elif past_kv is not None:
                kv = (torch.cat([past_kv[0], k], 2), torch.cat([past_kv[1], v], 2))
        k, v = kv
        B, h, L, d = q.shape
        r = B // k.shape[0]                                                # text rows per image
        if r > 1:  # fold the r rows of an image into its query length: K/V are shared, not copied
            q = q.transpose(1, 2).reshape(k.shape[0], r * L, h, d).transpose(1, 2)
        out = attention(q, k, v, mask, self.dropout_p if self.training else 0.0, is_causal)
        if r > 1:
            out = out.view(k.shape[0], h, r, L, d).transpose(1, 2).reshape(B, h, L, d)
        return out.transpose(1, 2).reshape(B, L, h * d), kv


class _CacheSlot:
    """One layer's handle on a ``KVCache`` (what ``Attention`` receives as ``past_kv``)."""
    __slots__ = ('cache', 'layer')

    def __init__(self, cache: 'KVCache', layer: int):
        self.cache, self.layer = cache, layer


class KVCache:
    """Preallocated self-attention cache for decoding: one buffer ``[layers, R, h, max_length, d]`` per k/v.

    ``MED.forward(past_key_values=cache)`` writes each layer's new keys/values in place and attends to
    the view ``[:, :, :length]`` (same values and shapes as the concatenating cache, no reallocation);
    ``reorder(rows)`` follows the chosen beams with one gather per buffer instead of one per layer.
    The buffers are allocated at the first write, in the dtype the projections produce (bf16 under autocast).
    """

    def __init__(self, num_layers: int, max_length: int):
        self.num_layers, self.max_length = num_layers, max_length
        self.k = self.v = None
        self.length = 0

    def slot(self, layer: int) -> _CacheSlot:
        return _CacheSlot(self, layer)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None:
            R, h, _, d = k.shape
            self.k = k.new_zeros(self.num_layers, R, h, self.max_length, d)  # zeros: finite beyond the prefix
            self.v = v.new_zeros(self.num_layers, R, h, self.max_length, d)
        end = self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(f'KVCache of max_length {self.max_length} cannot hold {end} positions')
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def reorder(self, rows: torch.Tensor) -> None:
        """Row j of the cache becomes old row ``rows[j]`` (beam search)."""
        if self.k is not None and self.length:
            T = self.length
            self.k[:, :, :, :T] = self.k[:, :, :, :T].index_select(1, rows)
            self.v[:, :, :, :T] = self.v[:, :, :, :T].index_select(1, rows)

    def __getitem__(self, layer: int) -> _CacheSlot:
        return self.slot(layer)


class AddNorm(nn.Module):
    """BERT's output sub-layer: ``LayerNorm(residual + dropout(dense(x)))``."""

    def __init__(self, cfg: MEDConfig, in_features: int):
        super().__init__()
        self.dense = Linear(in_features, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class AttentionBlock(nn.Module):
    """``attention`` / ``crossattention``: an Attention (``self``) and its AddNorm (``output``)."""

    def __init__(self, cfg: MEDConfig, kv_width: int, cross: bool = False):
        super().__init__()
        self.self = Attention(cfg, kv_width, cross=cross)
        self.output = AddNorm(cfg, cfg.hidden_size)

    def forward(self, x, context=None, mask=None, is_causal=False, past_kv=None, kv=None):
        h, kv = self.self(x, context, mask, is_causal, past_kv, kv)
        return self.output(h, x), kv


class TwinOutput(nn.Module):
    """NLVR2 combination of two image contexts: mean in the first half of the layers, learned merge after."""

    def __init__(self, cfg: MEDConfig, merge: bool):
        super().__init__()
        self.dense0 = Linear(cfg.hidden_size, cfg.hidden_size)
        self.dense1 = Linear(cfg.hidden_size, cfg.hidden_size)
        if merge:
            self.merge_layer = Linear(2 * cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, h0, h1, residual):
        h0, h1 = self.dense0(h0), self.dense1(h1)
        h = self.merge_layer(torch.cat([h0, h1], -1)) if hasattr(self, 'merge_layer') else (h0 + h1) / 2
        return self.LayerNorm(self.dropout(h) + residual)


class TwinCrossAttention(nn.Module):
    """Cross-attention to two images (``self0``/``self1``), keys of the original nlvr_encoder."""

    def __init__(self, cfg: MEDConfig, merge: bool):
        super().__init__()
        self.self0 = Attention(cfg, cfg.encoder_width, cross=True)
        self.self1 = Attention(cfg, cfg.encoder_width, cross=True)
        self.output = TwinOutput(cfg, merge)

    def forward(self, x, context, mask, is_causal=False, past_kv=None, kv=None):
        kv = kv or (None, None)
        h0, kv0 = self.self0(x, context[0], mask[0], kv=kv[0])
        h1, kv1 = self.self1(x, context[1], mask[1], kv=kv[1])
        return self.output(h0, h1, x), (kv0, kv1)


class Intermediate(nn.Module):
    """First FFN projection with GELU (``intermediate.dense``)."""

    def __init__(self, cfg: MEDConfig):
        super().__init__()
        self.dense = Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class Layer(nn.Module):
    """Self-attention -> (cross-attention if multimodal) -> FFN."""

    def __init__(self, cfg: MEDConfig, layer_num: int):
        super().__init__()
        self.attention = AttentionBlock(cfg, cfg.hidden_size)
        if cfg.twin_cross_attention:
            self.crossattention = TwinCrossAttention(cfg, merge=layer_num >= cfg.num_hidden_layers // 2)
        elif cfg.add_cross_attention:
            self.crossattention = AttentionBlock(cfg, cfg.encoder_width, cross=True)
        self.intermediate = Intermediate(cfg)
        self.output = AddNorm(cfg, cfg.intermediate_size)

    def forward(self, x, self_mask, is_causal, past_kv, context, context_mask, cross_kv):
        x, present = self.attention(x, mask=self_mask, is_causal=is_causal, past_kv=past_kv)
        if context is not None or cross_kv is not None:
            x, _ = self.crossattention(x, context, context_mask, kv=cross_kv)
        return self.output(self.intermediate(x), x), present


class Embeddings(nn.Module):
    """Word + absolute position embeddings (no token types), LayerNorm, dropout."""

    def __init__(self, cfg: MEDConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        # persistent: the official checkpoints carry it
        self.register_buffer('position_ids', torch.arange(cfg.max_position_embeddings).unsqueeze(0))

    def forward(self, input_ids=None, position_ids=None, inputs_embeds=None, past_length: int = 0):
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        L = inputs_embeds.shape[1]
        if position_ids is None:
            position_ids = self.position_ids[:, past_length:past_length + L]
        return self.dropout(self.LayerNorm(inputs_embeds + self.position_embeddings(position_ids)))


class Encoder(nn.Module):
    """Holds ``layer`` (the key name of the checkpoints)."""

    def __init__(self, cfg: MEDConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg, i) for i in range(cfg.num_hidden_layers))


# ---------------------------------------------------------------------------------------------- masks

def self_attention_mask(attention_mask, L: int, past_length: int, is_decoder: bool, dtype):
    """Additive self-attention mask ([B,1,1,T] or [B,1,L,T]) or None, and whether SDPA may use is_causal.

    Matches the original's ``get_extended_attention_mask``: padding mask, times a causal mask with a
    ones-prefix for cached positions when decoding, turned into ``(1 - m) * -10000``.
    """
    if attention_mask is None:
        if not is_decoder:
            return None, False
        if past_length == 0:
            return None, True
        if L == 1:
            return None, False  # one new token sees every cached position
        attention_mask = torch.ones(1, past_length + L)
    if attention_mask.dim() == 3:
        m = attention_mask[:, None]
    elif is_decoder:
        T = past_length + L
        causal = torch.ones(L, T, device=attention_mask.device).tril(past_length)
        m = causal[None, None] * attention_mask[:, None, None, :]
    else:
        m = attention_mask[:, None, None, :]
    return (1.0 - m.to(dtype)) * -10000.0, False


def cross_attention_mask(mask, dtype):
    """HF 4.15 ``invert_attention_mask``: ``(1 - m) * -1e4`` for fp16, ``-1e9`` otherwise. None means all ones."""
    if mask is None:
        return None
    if mask.dim() == 2:
        mask = mask[:, None, None, :]
    elif mask.dim() == 3:
        mask = mask[:, None]
    # all-ones (every image mask): let SDPA pick its fastest kernel; a host read, so not while compiling or
    # recording a CUDA graph (the additive mask of zeros is then the same function)
    if not (torch.compiler.is_compiling() or capturing()) and bool(mask.min() == 1):
        return None
    return (1.0 - mask.to(dtype)) * (-1e4 if dtype == torch.float16 else -1e9)


def autocast_context(states):
    """Image tokens (a tensor, or an NLVR pair) cast once to the autocast dtype, when autocast is on.

    Every layer's cross-attention key and value projection would otherwise cast the fp32 ViT output
    itself (autocast casts inputs per op): 2 x layers copies, each kept for the backward pass.
    The values are the same (autocast's cast is this cast)."""
    if states is None:
        return None
    if isinstance(states, (tuple, list)):
        return type(states)(autocast_context(s) for s in states)
    if states.is_floating_point() and torch.is_autocast_enabled(states.device.type):
        return states.to(torch.get_autocast_dtype(states.device.type))
    return states


def select_cross_kv(cross_kv: list, rows: torch.Tensor) -> list:
    """Per layer, the cross-attention (k, v) of image ``rows[j]`` for text row j.

    ITM pairs texts with hard-negative images drawn from the batch: their keys/values are gathered from the
    batch's (projected once by ``precompute_cross_kv``) instead of projecting gathered copies of the image
    tokens. Gradients flow back through the gather (summed per image), as they would through the copies."""
    return [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in cross_kv]


# ---------------------------------------------------------------------------------------------- models

class MED(nn.Module):
    """The MED text transformer (the original's ``BertModel``, without pooler)."""

    def __init__(self, config: MEDConfig, add_pooling_layer: bool = False):
        super().__init__()
        if add_pooling_layer:
            raise ValueError('BLIP never uses a pooler; add_pooling_layer must be False')
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.word_embeddings.weight.dtype

    def precompute_cross_kv(self, encoder_hidden_states) -> list:
        """Per layer, the cross-attention (k, v) of ``encoder_hidden_states`` [B_img, N, W] (or an NLVR pair).

        Computed once per image and reused: every decode step, every candidate text of a re-rank, every ITM
        row of the image (``select_cross_kv``). Differentiable: training passes it as ``cross_kv``.
        """
        encoder_hidden_states = autocast_context(encoder_hidden_states)
        kvs = []
        for layer in self.encoder.layer:
            ca = layer.crossattention
            if isinstance(ca, TwinCrossAttention):
                kvs.append((ca.self0.project_kv(encoder_hidden_states[0]), ca.self1.project_kv(encoder_hidden_states[1])))
            else:
                kvs.append(ca.self.project_kv(encoder_hidden_states))
        return kvs

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, *, inputs_embeds=None,
                encoder_embeds=None, encoder_hidden_states=None, encoder_attention_mask=None, past_key_values=None,
                use_cache=None, output_hidden_states=None, is_decoder: bool = False, mode: str = 'multimodal',
                cross_kv: Optional[list] = None) -> MEDOutput:
        """Run the transformer.

        Args:
            input_ids: [B, L] token ids (or ``inputs_embeds`` [B,L,H], or ``encoder_embeds`` to skip embeddings).
            attention_mask: [B, T] padding mask (1 keep) over cached + new positions, or [B, L, T].
            encoder_hidden_states: [B_img, N, W] image tokens (B = r * B_img), or a pair for NLVR2.
            encoder_attention_mask: [B_img, N] (or a pair); None means all ones.
            past_key_values: per-layer self-attention (k, v) [B,h,T,d] from an earlier call (decoding), or a
                preallocated ``KVCache`` (updated in place and returned as ``past_key_values``).
            mode: 'text' skips cross-attention; 'multimodal' uses it.
            cross_kv: per-layer cross-attention (k, v) from ``precompute_cross_kv`` (replaces the states).
        """
        if mode not in ('text', 'multimodal'):
            raise ValueError(f"mode must be 'text' or 'multimodal', got {mode!r}")
        static_cache = isinstance(past_key_values, KVCache)
        if static_cache:
            past_length = past_key_values.length
        else:
            past_length = past_key_values[0][0].shape[2] if past_key_values is not None else 0
        if encoder_embeds is not None:
            x = encoder_embeds
        else:
            x = self.embeddings(input_ids, position_ids, inputs_embeds, past_length)    # [B,L,H]
        dtype = x.dtype if not torch.is_autocast_enabled(x.device.type) else torch.get_autocast_dtype(x.device.type)
        self_mask, is_causal = self_attention_mask(attention_mask, x.shape[1], past_length, is_decoder, dtype)
        context = context_mask = None
        if mode == 'multimodal':
            if encoder_hidden_states is None and cross_kv is None:
                raise ValueError("mode='multimodal' needs encoder_hidden_states (image tokens) or cross_kv")
            context = autocast_context(encoder_hidden_states)
            if self.config.twin_cross_attention:
                masks = encoder_attention_mask or (None, None)
                context_mask = [cross_attention_mask(m, dtype) for m in masks]
            else:
                context_mask = cross_attention_mask(encoder_attention_mask, dtype)
        presents = [] if (use_cache or past_key_values is not None) and not static_cache else None
        hidden_states = (x,) if output_hidden_states else None
        for i, layer in enumerate(self.encoder.layer):
            layer_cross_kv = cross_kv[i] if (cross_kv is not None and mode == 'multimodal') else None
            past = past_key_values[i] if past_key_values is not None else None
            x, present = layer(x, self_mask, is_causal, past, context, context_mask, layer_cross_kv)
            if presents is not None:
                presents.append(present)
            if hidden_states is not None:
                hidden_states += (x,)
        if static_cache:
            past_key_values.advance(x.shape[1])
            presents = past_key_values
        return MEDOutput(last_hidden_state=x, past_key_values=presents, hidden_states=hidden_states)


BertModel = MED  # the original's name


class PredictionHeadTransform(nn.Module):
    def __init__(self, cfg: MEDConfig):
        super().__init__()
        self.dense = Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class LMPrediction(nn.Module):
    """dense -> GELU -> LayerNorm -> vocabulary projection (``cls.predictions``)."""

    def __init__(self, cfg: MEDConfig):
        super().__init__()
        self.transform = PredictionHeadTransform(cfg)
        self.decoder = Linear(cfg.hidden_size, cfg.vocab_size)
        # The checkpoints store the output bias twice (``bias`` and ``decoder.bias``): one Parameter.
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.decoder.bias = self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x))


class LMHead(nn.Module):
    def __init__(self, cfg: MEDConfig):
        super().__init__()
        self.predictions = LMPrediction(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictions(x)


class MEDLMHeadModel(nn.Module):
    """The image-grounded text decoder: MED (``bert``) + LM head (``cls``), output weights tied to word embeddings."""

    def __init__(self, config: MEDConfig):
        super().__init__()
        self.config = config
        self.bert = MED(config)
        self.cls = LMHead(config)
        self.bert._init_weights(self.cls.predictions.transform.dense)
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def get_output_embeddings(self) -> nn.Linear:
        return self.cls.predictions.decoder

    # Called with the model when it enters training mode. Buffers and CUDA graph kept by cuda_graph decoding
    # serve evaluation and training needs the memory: models/generation.py registers their release here
    # (a callback, so that this module does not import the one that imports it).
    on_train: list[Callable[[nn.Module], None]] = []

    def train(self, mode: bool = True) -> 'MEDLMHeadModel':
        if mode:
            for release in self.on_train:
                release(self)
        return super().train(mode)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, *, inputs_embeds=None,
                encoder_hidden_states=None, encoder_attention_mask=None, labels=None, past_key_values=None,
                use_cache=None, output_hidden_states=None, return_logits: bool = False, is_decoder: bool = True,
                reduction: str = 'mean', mode: str = 'multimodal', cross_kv: Optional[list] = None,
                loss_only: bool = False):
        """Decoder forward; with ``labels`` the LM loss (label smoothing 0.1, ``reduction`` 'mean' or 'none').

        ``loss_only``: with ``labels``, apply the vocabulary head only at positions that have a target
        and return ``logits=None`` (same loss, far less work: training and answer ranking use this).

        Returns:
            ``logits[:, :-1]`` if ``return_logits``, else an MEDOutput with ``logits`` [B,L,V], ``loss``,
            ``past_key_values``. With ``reduction='none'`` the loss is summed per sequence: [B].
        """
        out = self.bert(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        inputs_embeds=inputs_embeds, encoder_hidden_states=encoder_hidden_states,
                        encoder_attention_mask=encoder_attention_mask, past_key_values=past_key_values,
                        use_cache=use_cache, output_hidden_states=output_hidden_states,
                        is_decoder=is_decoder, mode=mode, cross_kv=cross_kv)
        if loss_only and labels is not None and not return_logits:
            loss = lm_loss_at_targets(out.last_hidden_state, labels, self.cls, reduction=reduction,
                                      label_smoothing=self.config.label_smoothing)
            return MEDOutput(loss=loss, logits=None, past_key_values=out.past_key_values,
                             last_hidden_state=out.last_hidden_state, hidden_states=out.hidden_states)
        logits = self.cls(out.last_hidden_state)                                       # [B,L,V]
        if return_logits:
            return logits[:, :-1].contiguous()
        loss = None
        if labels is not None:
            loss = lm_loss(logits, labels, reduction=reduction, label_smoothing=self.config.label_smoothing)
        return MEDOutput(loss=loss, logits=logits, past_key_values=out.past_key_values,
                         last_hidden_state=out.last_hidden_state, hidden_states=out.hidden_states)


BertLMHeadModel = MEDLMHeadModel  # the original's name


def share_encoder_decoder(encoder: MED, decoder: MED) -> None:
    """Make ``encoder`` use the decoder's embeddings, cross-attention and FFN modules (BLIP pretraining).

    Only self-attention (``attention.*``) stays separate, as in the original's
    ``tie_encoder_decoder_weights(..., '/attention')``: bidirectional and causal self-attention differ,
    everything else is one set of weights. Sharing module instances keeps both key paths in
    ``state_dict()`` (the checkpoint layout) while the optimizer sees each parameter once.
    """
    encoder.embeddings = decoder.embeddings
    for enc_layer, dec_layer in zip(encoder.encoder.layer, decoder.encoder.layer):
        enc_layer.crossattention = dec_layer.crossattention
        enc_layer.intermediate = dec_layer.intermediate
        enc_layer.output = dec_layer.output


def resize_token_embeddings(model: nn.Module, new_num_tokens: int) -> None:
    """Grow (or shrink) the vocabulary of a MED or MEDLMHeadModel; new rows ~ N(0, initializer_range)."""
    bert = model.bert if isinstance(model, MEDLMHeadModel) else model
    old = bert.embeddings.word_embeddings
    if old.num_embeddings == new_num_tokens:
        return
    new = nn.Embedding(new_num_tokens, old.embedding_dim, padding_idx=old.padding_idx).to(old.weight)
    new.weight.data.normal_(0.0, bert.config.initializer_range)
    n = min(old.num_embeddings, new_num_tokens)
    new.weight.data[:n] = old.weight.data[:n]
    bert.embeddings.word_embeddings = new
    bert.config = bert.config.replace(vocab_size=new_num_tokens)
    if isinstance(model, MEDLMHeadModel):
        pred = model.cls.predictions
        bias = torch.zeros(new_num_tokens, dtype=pred.bias.dtype, device=pred.bias.device)
        bias[:n] = pred.bias.data[:n]
        pred.decoder = Linear(old.embedding_dim, new_num_tokens).to(old.weight)
        pred.bias = nn.Parameter(bias)
        pred.decoder.bias = pred.bias
        pred.decoder.weight = new.weight
        model.config = bert.config
