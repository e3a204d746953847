"""Qwen2-VL's and Qwen2.5-VL's image side: a vision transformer over native-resolution patch
grids with 2-D rotary positions, and the merger that folds each 2x2 block of patches into one
decoder token.

Images of any size go through as one flat sequence of patches; attention stays inside each
image (a block-diagonal mask). Qwen2.5-VL differs in RMSNorm, a gated MLP, and attention inside
windows of ``window_size`` pixels in every layer but ``fullatt_block_indexes``: its patches are
reordered window by window (in units of one merged token) for the blocks and back after the
merger. Parameter names are HF's (``visual.*``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...multimodal.inputs import ImageInput
from .activations import activation
from .clip import ClipMLP


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def patch_positions(grid_thw: list[int], merge: int) -> torch.Tensor:
    """[patches, 2] (row, column) of each patch, in the order the image processor emits them:
    merge x merge blocks, row by row, repeated for each temporal slice."""
    t, h, w = grid_thw
    rows = torch.arange(h).unsqueeze(1).expand(-1, w)
    cols = torch.arange(w).unsqueeze(0).expand(h, -1)

    def blocked(index: torch.Tensor) -> torch.Tensor:
        return index.reshape(h // merge, merge, w // merge, merge).permute(0, 2, 1, 3).flatten()

    return torch.stack([blocked(rows), blocked(cols)], dim=-1).repeat(t, 1)


class VisionAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = self.qkv(x).view(tokens, 3, self.heads, -1).unbind(1)
        q, k = ((t.float() * cos + rotate_half(t.float()) * sin).to(v.dtype) for t in (q, k))
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask)
        return self.proj(out.transpose(0, 1).reshape(tokens, -1))


class GatedVisionMLP(nn.Module):
    """Qwen2.5-VL's: down(act(gate(x)) * up(x)), with biases."""

    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(width, hidden), nn.Linear(width, hidden)
        self.down_proj = nn.Linear(hidden, width)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def is_qwen2_5(config: Any) -> bool:
    return getattr(config, "fullatt_block_indexes", None) is not None


def vision_width(config: Any) -> int:
    return config.hidden_size if is_qwen2_5(config) else config.embed_dim


def norm(config: Any, width: int) -> nn.Module:
    return nn.RMSNorm(width, eps=1e-6) if is_qwen2_5(config) else nn.LayerNorm(width, eps=1e-6)


class VisionBlock(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        width = vision_width(config)
        self.norm1, self.norm2 = norm(config, width), norm(config, width)
        self.attn = VisionAttention(width, config.num_heads)
        if is_qwen2_5(config):
            self.mlp = GatedVisionMLP(width, config.intermediate_size, config.hidden_act)
        else:
            self.mlp = ClipMLP(width, int(width * config.mlp_ratio), config.hidden_act)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        self.kernel = (config.temporal_patch_size, config.patch_size, config.patch_size)
        self.channels = getattr(config, "in_channels", None) or config.in_chans
        self.proj = nn.Conv3d(self.channels, vision_width(config), self.kernel, stride=self.kernel, bias=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = patches.view(-1, self.channels, *self.kernel).to(self.proj.weight.dtype)
        return self.proj(x).view(x.shape[0], -1)


class PatchMerger(nn.Module):
    def __init__(self, config: Any, out_width: int, width: int, merge: int):
        super().__init__()
        self.merged = width * merge * merge
        self.ln_q = norm(config, width)
        self.mlp = nn.Sequential(nn.Linear(self.merged, self.merged), nn.GELU(), nn.Linear(self.merged, out_width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.merged))


def window_order(grids: list[list[int]], merge: int, window: int) -> tuple[torch.Tensor, list[int]]:
    """Qwen2.5-VL: the merged tokens of every image reordered window by window (``window``
    merged tokens a side; windows at the right and bottom edges are smaller), and the size of
    each window in that order."""
    order, sizes, first = [], [], 0
    for t, h, w in grids:
        rows, cols = h // merge, w // merge
        index = torch.arange(t * rows * cols).view(t, rows, cols)
        pad_rows, pad_cols = -rows % window, -cols % window
        padded = F.pad(index, (0, pad_cols, 0, pad_rows), value=-1)
        blocks = padded.view(t, (rows + pad_rows) // window, window, (cols + pad_cols) // window, window)
        blocks = blocks.permute(0, 1, 3, 2, 4).reshape(-1, window * window)
        kept = blocks >= 0
        sizes += [int(n) for n in kept.sum(-1).tolist() if n]
        order.append(blocks[kept] + first)
        first += t * rows * cols
    return torch.cat(order), sizes


def segment_mask(sizes: list[int], device: torch.device) -> torch.Tensor:
    """[N, N] True where two positions fall in the same segment of consecutive ``sizes``."""
    segment = torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))
    return segment.unsqueeze(0) == segment.unsqueeze(1)


class Qwen2VisionTransformer(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        self.merge = config.spatial_merge_size
        self.patch_embed = PatchEmbed(config)
        width = vision_width(config)
        head_dim = width // config.num_heads
        # Qwen2.5-VL: windows of window_size pixels, in merged tokens; the full-attention layers.
        self.window = config.window_size // config.patch_size // self.merge if is_qwen2_5(config) else None
        self.full_attention = set(config.fullatt_block_indexes) if is_qwen2_5(config) else None
        # Half of each head's rotary dimensions follow the row, half the column.
        dim = head_dim // 2
        self.register_buffer("inv_freq", 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)),
                             persistent=False)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        out_width = config.out_hidden_size if is_qwen2_5(config) else config.hidden_size
        self.merger = PatchMerger(config, out_width, width, self.merge)

    def forward(self, patches: torch.Tensor, grids: list[list[int]]) -> torch.Tensor:
        device = patches.device
        positions = torch.cat([patch_positions(g, self.merge) for g in grids]).to(device)
        angles = (positions.unsqueeze(-1).float() * self.inv_freq).flatten(1)
        angles = torch.cat([angles, angles], dim=-1).unsqueeze(1)
        x = self.patch_embed(patches)
        # Attention within each temporal slice of each image (a still image has one slice).
        mask = segment_mask([h * w for t, h, w in grids for _ in range(t)], device)
        window_mask = order = None
        if self.window is not None:
            order, sizes = window_order(grids, self.merge, self.window)
            order = order.to(device)
            unit = self.merge * self.merge
            x, angles = (v.view(-1, unit, *v.shape[1:])[order].flatten(0, 1) for v in (x, angles))
            window_mask = segment_mask([size * unit for size in sizes], device)
        cos, sin = angles.cos(), angles.sin()
        for i, block in enumerate(self.blocks):
            full = self.full_attention is None or i in self.full_attention
            x = block(x, cos, sin, mask if full else window_mask)
        merged = self.merger(x)
        return merged if order is None else merged[torch.argsort(order)]


class Qwen2VLEncoder(nn.Module):
    """Flat patches of several images [patches, C*T*P*P] (their ``ImageInput``s give the grids)
    -> one [tokens, text width] tensor per image."""

    def __init__(self, config: Any):
        super().__init__()
        self.visual = Qwen2VisionTransformer(config.vision_config)

    def forward(self, patches: torch.Tensor, images: list[ImageInput]) -> list[torch.Tensor]:
        grids = [image.grid_thw for image in images]
        merged = self.visual(patches, grids)
        merge = self.visual.merge
        return list(merged.split([t * h * w // (merge * merge) for t, h, w in grids]))
