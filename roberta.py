"""RoBERTa, written out by hand.

A post-LayerNorm transformer encoder over byte-level BPE tokens:

    ids (B, Lt) -> word + position + token-type embeddings -> LN -> 12 x layer -> (B, Lt, 768)
    layer: h = LN(h + dense(self_attn(h)));  h = LN(h + ffn(h))

FIBER adds a gated cross-attention to images in the top layers. This file knows nothing of
images: each layer carries an empty `t2i` slot that fusion.py fills. The slot is called with the
self-attention output *after* its dense projection and *before* the residual and LayerNorm, and
its result is added there, so a layer computes `LN(dense(attn) + gate * cross + h)`.

Parameter names follow the Hugging Face layout of roberta-base (`embeddings.word_embeddings`,
`encoder.layer.0.attention.self.query`, ...), so roberta-base loads by name.

Shape alphabet: B batch, Lt text tokens, D width, nH heads, hd head dim.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class RobertaConfig:
    vocab_size: int = 50265
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_positions: int = 514  # 512 tokens + the two ids reserved below the first position
    pad_id: int = 1  # positions are counted from pad_id + 1, as fairseq RoBERTa does
    layer_norm_eps: float = 1e-5  # roberta-base's value (BERT's default 1e-12 differs)
    dropout: float = 0.1
    grad_checkpointing: bool = False

    def __post_init__(self):
        assert self.hidden_size % self.num_heads == 0, "width must divide into heads"


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, Lt) 1/0 padding mask -> (B, 1, 1, Lt) with 0 to keep and the dtype's minimum to drop."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def causal_additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Padding mask plus a causal mask (token i sees tokens <= i): (B, 1, Lt, Lt)."""
    Lt = mask.shape[1]
    future = torch.ones(Lt, Lt, dtype=torch.bool, device=mask.device).triu(1)
    causal = torch.zeros(Lt, Lt, dtype=dtype, device=mask.device).masked_fill(future, -torch.inf)
    return additive_mask(mask, dtype) + causal  # -inf + min stays -inf: never attended


def position_ids_from(ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Real tokens get positions pad_id+1, pad_id+2, ...; padding keeps position pad_id."""
    real = ids.ne(pad_id).long()
    return torch.cumsum(real, dim=1) * real + pad_id


class Embeddings(nn.Module):
    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.pad_id = config.pad_id
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_positions, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(1, config.hidden_size)  # RoBERTa has one type
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = position_ids_from(ids, self.pad_id)
        x = self.word_embeddings(ids) + self.token_type_embeddings.weight[0]
        x = x + self.position_embeddings(positions)
        return self.dropout(self.LayerNorm(x))  # (B, Lt, D)


class SelfAttention(nn.Module):
    """Multi-head scaled dot-product attention; keys/values may come from another sequence."""

    def __init__(self, *, dim: int, num_heads: int, kv_dim: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(kv_dim, dim)
        self.value = nn.Linear(kv_dim, dim)

    def split_heads(self, x):
        B, L, D = x.shape
        return x.view(B, L, self.num_heads, D // self.num_heads).transpose(1, 2)  # (B, nH, L, hd)

    def forward(self, x, context=None, mask=None):
        context = x if context is None else context
        q = self.split_heads(self.query(x))
        k = self.split_heads(self.key(context))
        v = self.split_heads(self.value(context))
        p = self.dropout if self.training else 0.0
        mask = None if mask is None else mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        B, nH, L, hd = out.shape
        return out.transpose(1, 2).reshape(B, L, nH * hd)  # (B, L, D)


class AttentionOutput(nn.Module):
    """The dense projection after attention; its LayerNorm is applied by the layer (see top)."""

    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)


class Attention(nn.Module):
    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.self = SelfAttention(dim=config.hidden_size, num_heads=config.num_heads,
                                  kv_dim=config.hidden_size, dropout=config.dropout)
        self.output = AttentionOutput(config)


class Intermediate(nn.Module):
    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)


class Output(nn.Module):
    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)


class RobertaLayer(nn.Module):
    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.attention = Attention(config)
        self.intermediate = Intermediate(config)
        self.output = Output(config)
        self.t2i = None  # slot for fusion.TextToImageAttention (FIBER's fused layers)

    def forward(self, h, mask, image=None, last_norm=True):
        """h (B, Lt, D); mask additive (B, 1, 1|Lt, Lt); image (B, Li, Ci) for fused layers.

        `last_norm=False` skips the output LayerNorm: FIBER's top text layer runs that way.
        """
        attn = self.attention
        a = attn.output.dropout(attn.output.dense(attn.self(h, mask=mask)))  # (B, Lt, D)
        if self.t2i is not None and image is not None:
            a = a + self.t2i(a, image)  # gated cross-attention, added before the residual
        h = attn.output.LayerNorm(a + h)

        f = self.output.dense(F.gelu(self.intermediate.dense(h)))
        f = self.output.dropout(f) + h
        return self.output.LayerNorm(f) if last_norm else f


class Encoder(nn.Module):
    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.layer = nn.ModuleList([RobertaLayer(config) for _ in range(config.num_layers)])


class RobertaModel(nn.Module):
    """RoBERTa without pooler. `forward` runs it text-only; fusion.py drives layers one by one."""

    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        self.apply(init_weights)

    def run_layer(self, index, h, mask, image=None, last_norm=True):
        layer = self.encoder.layer[index]
        if self.config.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(layer, h, mask, image, last_norm, use_reentrant=False)
        return layer(h, mask, image, last_norm)

    def forward(self, ids, mask, causal=False):
        """Text-only hidden states (B, Lt, D) of all layers, every LayerNorm applied."""
        h = self.embeddings(ids)
        extended = (causal_additive_mask if causal else additive_mask)(mask, h.dtype)
        for i in range(len(self.encoder.layer)):
            h = self.run_layer(i, h, extended)
        return h


def init_weights(module: nn.Module):
    """BERT's initialisation: normal(0, 0.02) weights, zero biases, unit LayerNorms."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
