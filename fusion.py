"""Fusion in the backbone: cross-attention inside the top blocks of Swin and RoBERTa.

FIBER does not stack a fusion transformer on top of two encoders. It inserts cross-attention
into the last `num_fused` blocks of both backbones, each gated by a learned scalar that starts
at zero, so the untrained model is exactly the two unimodal backbones:

    image: patch embed -> stages below fusion ---------------> [block k  + i2t(text)] -> ...
    text:  embeddings  -> layers below fusion ---------------> [layer k  + t2i(image)] -> ...
                                                                 (both read the other's
                                                                  state from before step k)

Everything below the first fused block depends on one modality only. `FusedBackbone` exposes
that split (`image_lower`, `text_lower`, then `fuse`), so a training step computes the lower
part once per distinct image and caption and reuses it for every pairing.

Shape alphabet: B batch, Li image tokens, Lt text tokens, C image width, D text width.
"""
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from roberta import RobertaConfig, RobertaModel, additive_mask
from swin import SwinConfig, SwinTransformer


class ImageToTextAttention(nn.Module):
    """Image tokens (queries) attend to text tokens; the gated result joins the image stream.

    The query is the block's window-attention output, optionally LayerNorm-ed first (coarse
    FIBER and the v3 detection backbone do; the v2 detection backbone does not).
    """

    def __init__(self, *, dim: int, text_dim: int, num_heads: int, query_norm: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(dim) if query_norm else nn.Identity()
        self.query = nn.Linear(dim, dim)
        self.key_value = nn.Linear(text_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.gate = nn.Parameter(torch.zeros(1))  # 0 at init: fusion starts switched off

    def forward(self, x, text, text_mask):
        """x (B, Li, C); text (B, Lt, D); text_mask additive (B, 1, 1, Lt) -> (B, Li, C)."""
        B, Li, C = x.shape
        Lt, nH = text.shape[1], self.num_heads
        q = self.query(self.norm(x)).view(B, Li, nH, C // nH).transpose(1, 2)  # (B, nH, Li, hd)
        kv = self.key_value(text).view(B, Lt, 2, nH, C // nH).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)  # each (B, nH, Lt, hd)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=text_mask.to(q.dtype))
        out = out.transpose(1, 2).reshape(B, Li, C)
        return self.gate * self.proj(out)


class TextToImageAttention(nn.Module):
    """Text tokens (queries) attend to all image tokens (no mask); gated, like the image side."""

    def __init__(self, *, dim: int, image_dim: int, num_heads: int, dropout: float = 0.1):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(image_dim, dim)
        self.value = nn.Linear(image_dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, a, image):
        """a (B, Lt, D) self-attention output; image (B, Li, C) -> (B, Lt, D)."""
        B, Lt, D = a.shape
        nH = self.num_heads

        def heads(t):
            return t.view(B, -1, nH, D // nH).transpose(1, 2)  # (B, nH, L, hd)

        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(
            heads(self.query(a)), heads(self.key(image)), heads(self.value(image)), dropout_p=p)
        out = F.dropout(self.proj(out.transpose(1, 2).reshape(B, Lt, D)), p, self.training)
        return self.gate * out


@dataclass
class FusionConfig:
    swin: SwinConfig = field(default_factory=SwinConfig)
    text: RobertaConfig = field(default_factory=RobertaConfig)
    num_fused: int = 6  # fused blocks on each side: Swin's last 6 (4 + 2), RoBERTa's last 6
    i2t_query_norm: bool = True  # LayerNorm on the image query (coarse, detection v3)
    # Coarse FIBER runs its last fused text layer without the output LayerNorm (a quirk of the
    # released code that every downstream number depends on); the detection backbone does not.
    skip_last_text_norm: bool = True

    def __post_init__(self):
        assert self.num_fused <= self.text.num_layers, "more fused text layers than layers"
        top_two = sum(self.swin.depths[-2:])
        assert self.num_fused <= top_two, "fusion may span at most the last two Swin stages"


@dataclass
class ImageState:
    """Image tokens partway up the Swin, with the grid they sit on."""
    x: torch.Tensor  # (B, H*W, C)
    H: int
    W: int
    stage_outputs: list  # pre-merging outputs of finished stages, (B, H_s*W_s, C_s)

    def select(self, index):
        return ImageState(self.x[index], self.H, self.W, [o[index] for o in self.stage_outputs])


@dataclass
class TextState:
    h: torch.Tensor  # (B, Lt, D)
    mask: torch.Tensor  # (B, Lt) 1 for tokens, 0 for padding
    extended: torch.Tensor  # additive attention mask (B, 1, 1, Lt)

    def select(self, index):
        return TextState(self.h[index], self.mask[index], self.extended[index])


class FusedBackbone(nn.Module):
    """Swin + RoBERTa with gated cross-attention in their last `num_fused` blocks."""

    def __init__(self, config: FusionConfig):
        super().__init__()
        self.config = config
        self.swin = SwinTransformer(config.swin)
        self.text = RobertaModel(config.text)
        self.fused_blocks = self.locate_fused_blocks()
        self.first_fused_layer = config.text.num_layers - config.num_fused
        self.attach_cross_attention()

    def locate_fused_blocks(self):
        """(stage, block) of each fused Swin block, bottom to top: the last num_fused overall."""
        every = [(s, b) for s, d in enumerate(self.config.swin.depths) for b in range(d)]
        return every[len(every) - self.config.num_fused:]

    def attach_cross_attention(self):
        cfg = self.config
        D = cfg.text.hidden_size
        for k, (s, b) in enumerate(self.fused_blocks):
            C = cfg.swin.stage_dim(s)
            self.swin.layers[s].blocks[b].i2t = ImageToTextAttention(
                dim=C, text_dim=D, num_heads=cfg.swin.num_heads[s], query_norm=cfg.i2t_query_norm)
            # the paired text layer reads the image state *entering* this block: width C
            self.text.encoder.layer[self.first_fused_layer + k].t2i = TextToImageAttention(
                dim=D, image_dim=C, num_heads=cfg.text.num_heads, dropout=cfg.text.dropout)

    def image_lower(self, images: torch.Tensor) -> ImageState:
        """Every Swin block below the first fused one; it never sees text."""
        fuse_stage, fuse_block = self.fused_blocks[0]
        x, H, W = self.swin.embed(images)  # (B, H*W, C0)
        outputs = []
        for s in range(fuse_stage):
            x, H, W = self.swin.run_stage(s, x, H, W, downsample=False)
            outputs.append(x)
            x, H, W = self.swin.layers[s].downsample(x, H, W)
        x, H, W = self.swin.run_stage(fuse_stage, x, H, W, stop=fuse_block, downsample=False)
        return ImageState(x, H, W, outputs)

    def text_lower(self, ids: torch.Tensor, mask: torch.Tensor) -> TextState:
        """Embeddings and every RoBERTa layer below the first fused one."""
        h = self.text.embeddings(ids)  # (B, Lt, D)
        extended = additive_mask(mask, h.dtype)
        for i in range(self.first_fused_layer):
            h = self.text.run_layer(i, h, extended)
        return TextState(h, mask, extended)

    def fuse(self, image: ImageState, text: TextState):
        """The interleaved top: image block k and text layer k each read the other's old state.

        Returns image tokens of the last stage (B, Li, C_last, no final norm), text states
        (B, Lt, D) and the pre-merging output of every stage (for the detection pyramid).
        """
        assert image.x.shape[0] == text.h.shape[0], "pair each image with one text"
        x, H, W, h = image.x, image.H, image.W, text.h
        outputs = list(image.stage_outputs)
        n_layers = self.config.text.num_layers
        for k, (s, b) in enumerate(self.fused_blocks):
            layer = self.first_fused_layer + k
            last_norm = not (self.config.skip_last_text_norm and layer == n_layers - 1)
            block = self.swin.layers[s].blocks[b]
            new_x = self.swin.run_block(block, x, H, W, h, text.extended)
            h = self.text.run_layer(layer, h, text.extended, image=x, last_norm=last_norm)
            x = new_x
            if b == self.config.swin.depths[s] - 1:  # stage finished: record, then merge
                outputs.append(x)
                if self.swin.layers[s].downsample is not None:
                    x, H, W = self.swin.layers[s].downsample(x, H, W)
        return x, h, outputs

    def image_upper_alone(self, image: ImageState) -> torch.Tensor:
        """The fused Swin blocks run without text, then the final norm (ITC's image path)."""
        x, H, W = image.x, image.H, image.W
        for s, b in self.fused_blocks:
            x = self.swin.run_block(self.swin.layers[s].blocks[b], x, H, W)
            if b == self.config.swin.depths[s] - 1 and self.swin.layers[s].downsample is not None:
                x, H, W = self.swin.layers[s].downsample(x, H, W)
        return self.swin.norm(x)  # (B, Li, C_last)

    def text_upper_alone(self, text: TextState) -> torch.Tensor:
        """The fused RoBERTa layers run without images, every LayerNorm applied (ITC's path)."""
        h = text.h
        for i in range(self.first_fused_layer, self.config.text.num_layers):
            h = self.text.run_layer(i, h, text.extended)
        return h  # (B, Lt, D)

    def forward(self, images, ids, mask):
        x, h, _ = self.fuse(self.image_lower(images), self.text_lower(ids, mask))
        return x, h


def gates(backbone: FusedBackbone) -> list:
    """Every fusion gate parameter (i2t and t2i), e.g. to inspect how much fusion is used."""
    return [m.gate for m in backbone.modules()
            if isinstance(m, (ImageToTextAttention, TextToImageAttention))]
