"""Swin Transformer, written out by hand.

A Swin Transformer turns an image into a pyramid of token grids. Each stage runs self-attention
inside non-overlapping square windows; every second block shifts the windows by half a window
so information crosses window borders; between stages, patch merging halves the grid and
doubles the width.

    image (B, 3, H, W) -> patch embed (B, H/4 * W/4, C) -> stage 0 -> merge -> stage 1 -> ...

FIBER fuses text into the top blocks. This file knows nothing of text: a block carries an empty
`i2t` slot that fusion.py fills with an image-to-text cross-attention module, called with the
block's attention output. Parameter names follow the official Swin release (`patch_embed.proj`,
`layers.0.blocks.0.attn.qkv`, ...), so its checkpoints load by name.

Shape alphabet: B batch, H/W grid height/width in tokens, C channels, nW windows per image,
ws window side, N = ws * ws tokens per window, nH heads, hd head dim.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class SwinConfig:
    image_size: int = 384  # only sets the default window size; any input size runs
    patch_size: int = 4
    in_chans: int = 3
    embed_dim: int = 128  # Swin-B; stage i has embed_dim * 2**i channels
    depths: tuple = (2, 2, 18, 2)
    num_heads: tuple = (4, 8, 16, 32)
    window_size: Optional[int] = None  # None: image_size // 32, as FIBER does (12 at 384 px)
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.1  # stochastic depth, rising linearly over all blocks
    # Coarse FIBER (timm's rule): a stage whose grid is not larger than the window uses one
    # window covering the grid and no shift. The detection backbone instead pads the grid up to
    # a multiple of the window and keeps the shift.
    clamp_window_to_grid: bool = True
    grad_checkpointing: bool = False  # recompute each block in the backward pass to save memory

    def __post_init__(self):
        self.depths, self.num_heads = tuple(self.depths), tuple(self.num_heads)  # from JSON
        if self.window_size is None:
            self.window_size = self.image_size // 32
        assert len(self.depths) == len(self.num_heads), "one head count per stage"
        for i, heads in enumerate(self.num_heads):
            assert (self.embed_dim * 2**i) % heads == 0, f"stage {i}: width not divisible by heads"

    def stage_dim(self, stage: int) -> int:
        return self.embed_dim * 2**stage


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    B, H, W, C = x.shape
    x = x.view(B, H // ws, ws, W // ws, ws, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, C)  # (B*nW, N, C)


def window_reverse(windows: torch.Tensor, ws: int, H: int, W: int) -> torch.Tensor:
    C = windows.shape[-1]
    x = windows.view(-1, H // ws, W // ws, ws, ws, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)  # (B, H, W, C)


def relative_position_index(ws: int) -> torch.Tensor:
    """For each pair of tokens in a window, the row of the bias table holding their offset."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij"))
    coords = coords.flatten(1)  # (2, N)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (N, N, 2), in -ws+1..ws-1
    rel = rel + (ws - 1)
    return rel[..., 0] * (2 * ws - 1) + rel[..., 1]  # (N, N)


def shifted_window_mask(H: int, W: int, ws: int, shift: int) -> torch.Tensor:
    """Additive mask (nW, N, N): -100 between tokens that the cyclic shift made neighbours.

    After rolling the grid by `shift`, a window at the border holds tokens from opposite edges
    of the image; they are labelled by region and may only attend within their own region.
    """
    region = torch.zeros(1, H, W, 1)
    bounds = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
    label = 0
    for hs in bounds:
        for wsl in bounds:
            region[:, hs, wsl, :] = label
            label += 1
    region = window_partition(region, ws).squeeze(-1)  # (nW, N)
    diff = region[:, None, :] - region[:, :, None]  # (nW, N, N)
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


class PatchEmbed(nn.Module):
    """Cut the image into patch_size x patch_size patches and project each to embed_dim."""

    def __init__(self, *, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, images: torch.Tensor):
        p = self.patch_size
        H, W = images.shape[-2:]
        if H % p or W % p:  # detection inputs: pad bottom/right up to a whole patch
            images = F.pad(images, (0, (-W) % p, 0, (-H) % p))
        x = self.proj(images)  # (B, C, H/p, W/p)
        grid = x.shape[-2:]
        x = self.norm(x.flatten(2).transpose(1, 2))  # (B, H/p * W/p, C)
        return x, grid


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with a learned relative position bias."""

    def __init__(self, *, dim: int, num_heads: int, window_size: int):
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        # one learned bias per head for every possible (dy, dx) offset inside a window
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(window_size),
                             persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def position_bias(self) -> torch.Tensor:
        N = self.window_size**2
        # gathered from the transposed table, so the result is contiguous in (head, query, key)
        bias = self.relative_position_bias_table.t()[:, self.relative_position_index.view(-1)]
        return bias.view(-1, N, N)  # (nH, N, N)

    def forward(self, windows: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """windows (B*nW, N, C), image-major; mask (nW, N, N) for shifted windows, else None."""
        Bw, N, C = windows.shape
        nH = self.num_heads
        nW = 1 if mask is None else mask.shape[0]

        # Fold the windows of an image into the head axis: (B, nW*nH, N, hd). The bias is then
        # one (1, nW*nH, N, N) tensor broadcast over the images instead of a copy per image.
        # (One expression, so that the linear's output is freed as soon as it is regrouped.)
        q, k, v = (self.qkv(windows).view(Bw // nW, nW, N, 3, nH, C // nH)
                   .permute(3, 0, 1, 4, 2, 5).flatten(2, 3).unbind(0))  # (B, nW*nH, N, hd)

        # built in the dtype attention runs in (bf16 under autocast): half the bytes to write
        bias = self.position_bias().to(q.dtype)  # (nH, N, N)
        if mask is not None:  # shifted windows: each window adds its own region mask
            bias = bias + mask.unsqueeze(1).to(q.dtype)  # (nW, nH, N, N)
        bias = bias.reshape(1, nW * nH, N, N)

        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.view(Bw, nH, N, C // nH).transpose(1, 2).reshape(Bw, N, C)  # (Bw, N, C)
        return self.proj(out)


class Mlp(nn.Module):
    # Without autograd, tokens go through in chunks of this many rows, so the 4x-wide hidden
    # activation is never whole: lower peak memory and, on CPU, fewer fresh page-faulted
    # buffers (stage 1 at 384 px: 55 -> 33 ms). Each row's numbers are unchanged.
    chunk_rows = 4096

    def __init__(self, *, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        if torch.is_grad_enabled() or x.numel() <= self.chunk_rows * x.shape[-1]:
            return self.fc2(self.act(self.fc1(x)))
        rows = x.reshape(-1, x.shape[-1])  # (B*L, C)
        out = torch.cat([self.fc2(self.act(self.fc1(r))) for r in rows.split(self.chunk_rows)])
        return out.view(*x.shape[:-1], out.shape[-1])


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch of a random subset of samples."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


class SwinBlock(nn.Module):
    """LN -> (shifted) window attention [+ gated cross-attention] -> residual -> LN -> MLP."""

    def __init__(self, *, dim: int, num_heads: int, window_size: int, shift: bool,
                 mlp_ratio: float, drop_path: float, clamp_window_to_grid: bool):
        super().__init__()
        self.window_size = window_size
        self.shift = shift
        self.clamp_window_to_grid = clamp_window_to_grid
        self.drop_path_rate = drop_path
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim=dim, num_heads=num_heads, window_size=window_size)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim=dim, hidden=int(dim * mlp_ratio))
        self.i2t = None  # slot for fusion.ImageToTextAttention (FIBER's fused blocks)
        self._mask_cache = {}

    def window_geometry(self, H: int, W: int):
        """Window side and shift for an H x W grid."""
        ws, shift = self.window_size, (self.window_size // 2 if self.shift else 0)
        if self.clamp_window_to_grid and min(H, W) <= ws:
            ws, shift = min(H, W), 0
        return ws, shift

    def set_window_size(self, ws: int):
        """Adopt a new window size (resolution change); the caller resizes the bias table."""
        self.window_size = ws
        self.attn.window_size = ws
        self.attn.relative_position_index = relative_position_index(ws).to(
            self.attn.relative_position_bias_table.device)
        self._mask_cache = {}

    def shift_mask(self, Hp: int, Wp: int, ws: int, shift: int, device) -> torch.Tensor:
        key = (Hp, Wp, ws, shift, str(device))
        if key not in self._mask_cache:
            self._mask_cache[key] = shifted_window_mask(Hp, Wp, ws, shift).to(device)
        return self._mask_cache[key]

    def window_attention(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, L, C = x.shape
        ws, shift = self.window_geometry(H, W)
        assert ws == self.attn.window_size, "window size differs from the bias table's"
        x = x.view(B, H, W, C)
        x = F.pad(x, (0, 0, 0, (-W) % ws, 0, (-H) % ws))  # pad grid to whole windows
        Hp, Wp = x.shape[1:3]
        mask = None
        if shift:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
            mask = self.shift_mask(Hp, Wp, ws, shift, x.device)
        windows = self.attn(window_partition(x, ws), mask)  # (B*nW, N, C)
        x = window_reverse(windows, ws, Hp, Wp)  # (B, Hp, Wp, C)
        if shift:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        return x[:, :H, :W].reshape(B, L, C)

    def forward(self, x, H, W, text=None, text_mask=None):
        """x (B, H*W, C); text (B, Lt, Ct) and its additive mask (B, 1, 1, Lt) for fused blocks."""
        shortcut = x
        x = self.window_attention(self.norm1(x), H, W)
        if self.i2t is not None and text is not None:
            # a per-token operation, so it runs on the un-windowed grid: the same numbers as
            # doing it inside each window, with the text keys computed once per image
            x = x + self.i2t(x, text, text_mask)
        x = shortcut + drop_path(x, self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)


class PatchMerging(nn.Module):
    """Concatenate each 2x2 neighbourhood (4C) and project to 2C: half the grid, twice the width."""

    def __init__(self, *, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x, H, W):
        B, L, C = x.shape
        x = x.view(B, H, W, C)
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))  # odd grids (detection inputs)
        # the order (even row, even col), (odd, even), (even, odd), (odd, odd) is the released one
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        H2, W2 = x.shape[1:3]
        x = self.reduction(self.norm(x.view(B, H2 * W2, 4 * C)))  # (B, H/2 * W/2, 2C)
        return x, H2, W2


class SwinStage(nn.Module):
    def __init__(self, config: SwinConfig, stage: int, drop_rates: list):
        super().__init__()
        dim = config.stage_dim(stage)
        ws, can_shift = config.window_size, True
        grid = config.image_size // config.patch_size // 2**stage
        if config.clamp_window_to_grid and grid <= ws:
            ws, can_shift = grid, False  # one window covers the whole grid: nothing to shift
        self.blocks = nn.ModuleList([
            SwinBlock(dim=dim, num_heads=config.num_heads[stage], window_size=ws,
                      shift=can_shift and i % 2 == 1, mlp_ratio=config.mlp_ratio,
                      drop_path=drop_rates[i], clamp_window_to_grid=config.clamp_window_to_grid)
            for i in range(config.depths[stage])
        ])
        last = stage == len(config.depths) - 1
        self.downsample = None if last else PatchMerging(dim=dim)


class SwinTransformer(nn.Module):
    """The Swin backbone. `forward` runs it image-only; fusion.py drives blocks one by one."""

    def __init__(self, config: SwinConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(patch_size=config.patch_size, in_chans=config.in_chans,
                                      embed_dim=config.embed_dim)
        n = sum(config.depths)
        rates = [config.drop_path_rate * i / max(n - 1, 1) for i in range(n)]
        starts = [sum(config.depths[:i]) for i in range(len(config.depths))]
        self.layers = nn.ModuleList([
            SwinStage(config, i, rates[s:s + d])
            for i, (s, d) in enumerate(zip(starts, config.depths))
        ])
        self.norm = nn.LayerNorm(config.stage_dim(len(config.depths) - 1))
        self.apply(init_weights)

    def rebuild_buffers(self):
        """Recompute the derived (non-saved) buffers, e.g. after building on the meta device."""
        device = self.patch_embed.proj.weight.device
        for module in self.modules():
            if isinstance(module, WindowAttention):
                module.relative_position_index = relative_position_index(
                    module.window_size).to(device)

    def run_block(self, block: SwinBlock, x, H, W, text=None, text_mask=None):
        if self.config.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, H, W, text, text_mask, use_reentrant=False)
        return block(x, H, W, text, text_mask)

    def embed(self, images: torch.Tensor):
        x, (H, W) = self.patch_embed(images)  # (B, H*W, C0)
        return x, H, W

    def run_stage(self, stage: int, x, H, W, start: int = 0, stop: Optional[int] = None,
                  downsample: bool = True):
        """Blocks start..stop-1 of a stage (no text), then patch merging if asked."""
        layer = self.layers[stage]
        for block in layer.blocks[start:stop]:
            x = self.run_block(block, x, H, W)
        if downsample and layer.downsample is not None:
            x, H, W = layer.downsample(x, H, W)
        return x, H, W

    def forward(self, images: torch.Tensor, final_norm: bool = True) -> torch.Tensor:
        """Image-only features of the last stage, (B, H/32 * W/32, C_last)."""
        x, H, W = self.embed(images)
        for stage in range(len(self.layers)):
            x, H, W = self.run_stage(stage, x, H, W)
        return self.norm(x) if final_norm else x


def init_weights(module: nn.Module):
    """Truncated-normal linear weights and unit LayerNorms, as Swin initialises."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def resize_bias_table(table: torch.Tensor, new_window: int) -> torch.Tensor:
    """Bicubic resize of a ((2w-1)^2, nH) relative position bias table to another window size.

    FIBER fine-tunes at 576 px from 384 px weights this way: each head's table is viewed as a
    (2w-1) x (2w-1) image of offsets and interpolated.
    """
    old = int(round(table.shape[0] ** 0.5))
    new = 2 * new_window - 1
    if old == new:
        return table
    grid = table.transpose(0, 1).reshape(1, -1, old, old)  # (1, nH, 2w-1, 2w-1)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return grid[0].permute(1, 2, 0).reshape(new * new, -1).contiguous()  # ((2w'-1)^2, nH)
