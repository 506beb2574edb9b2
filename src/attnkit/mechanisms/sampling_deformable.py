"""Deformable attention as image token mixers: Deformable DETR's (2-D) and DFA3D's (3-D, with depth).

"Deformable DETR: Deformable Transformers for End-to-End Object Detection", arXiv 2010.04159 (ICLR 2021), Sec. 4.1;
"DFA3D: 3D Deformable Attention For 2D-to-3D Feature Lifting", arXiv 2307.12972 (ICCV 2023), Sec. 3.
Every pixel is a query (the encoder's self-attention) with its centre as reference point; a linear layer of the
query gives each head's sampling offsets and (softmax over the points) attention weights.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from attnkit.ops.channel import check_channels_last
from attnkit.ops.sampling import deformable_attention, deformable_attention_3d
from attnkit.reference.naive_sampling import naive_deformable_3d_module, naive_deformable_module
from attnkit.registry import Family, InputKind, Paper, divisible, int_option, register

_META = "sparse CSR products have no meta implementation"


def _reference_points(Y: int, X: int, like: torch.Tensor) -> torch.Tensor:
    """Pixel centres ``((x + 0.5) / X, (y + 0.5) / Y)`` in raster order: ``(Y X, 2)``."""
    ys = (torch.arange(Y, device=like.device, dtype=like.dtype) + 0.5) / Y
    xs = (torch.arange(X, device=like.device, dtype=like.dtype) + 0.5) / X
    return torch.stack([xs.repeat(Y), ys.repeat_interleave(X)], -1)


def _locating(lin: nn.Linear, q: torch.Tensor) -> torch.Tensor:
    """``lin(q)`` in float32 for half inputs: a sampling location rounded to bfloat16 can move to the next pixel
    cell, where the bilinear gradient differs; the offsets are a small output, so this costs little."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        return lin(q)
    return nn.functional.linear(q.float(), lin.weight.float(), lin.bias.float())


def _init_offsets(linear: nn.Linear, heads: int, points: int, coords: int) -> None:
    """Deformable DETR's initialisation: zero weights; bias = head h's direction (cos, sin) of angle 2 pi h / H,
    scaled to the unit square's border and by ``p + 1`` for point ``p`` (third coordinate, if any, 0)."""
    nn.init.zeros_(linear.weight)
    theta = torch.arange(heads, dtype=torch.float32) * (2.0 * math.pi / heads)
    grid = torch.stack([theta.cos(), theta.sin()], -1)
    grid = grid / grid.abs().max(-1, keepdim=True).values  # (H, 2)
    bias = torch.zeros(heads, points, coords)
    bias[..., :2] = grid[:, None, :] * torch.arange(1, points + 1, dtype=torch.float32)[None, :, None]
    with torch.no_grad():
        linear.bias.copy_(bias.flatten())


class DeformableAttention2D(nn.Module):
    """Deformable DETR's deformable self-attention on a channels-last image ``(B, Y, X, C)`` (one level).

    Args:
        dim: ``C``. num_heads: heads ``H`` (``C % H == 0``). num_points: sampling points ``P`` per head.
    """

    def __init__(self, dim: int, num_heads: int = 8, num_points: int = 4):
        super().__init__()
        self.dim = dim
        self.head_dim = divisible(self, dim, num_heads)
        self.num_heads = num_heads
        self.num_points = int_option(self, "num_points", num_points, 1)
        self.sampling_offsets = nn.Linear(dim, num_heads * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        _init_offsets(self.sampling_offsets, num_heads, num_points, 2)
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, Y, X, C)`` -> ``(B, Y, X, C)``."""
        check_channels_last(self, x, self.dim, meta=_META)
        B, Y, X, C = x.shape
        H, P = self.num_heads, self.num_points
        q = x.reshape(B, Y * X, C)  # (B, N, C): every pixel is a query
        value = self.value_proj(q).view(B, Y * X, H, self.head_dim)  # (B, S, H, D)
        offsets = _locating(self.sampling_offsets, q).view(B, Y * X, H, 1, P, 2)  # (B, N, H, L=1, P, 2) in pixels
        attn = self.attention_weights(q).view(B, Y * X, H, 1 * P).softmax(-1).view(B, Y * X, H, 1, P)
        scale = torch.tensor([X, Y], dtype=offsets.dtype, device=x.device)  # offsets normalised by (W_l, H_l)
        loc = _reference_points(Y, X, offsets)[None, :, None, None, None, :] + offsets / scale
        out = deformable_attention(value, [(Y, X)], loc, attn)  # (B, N, H, D)
        return self.output_proj(out.reshape(B, Y * X, C)).view(B, Y, X, C)


class DeformableAttention3D(nn.Module):
    """DFA3D on a channels-last image ``(B, Y, X, C)``: deformable attention whose points read the volume
    ``depth (x) value`` (one level).

    Each pixel predicts a depth distribution per head over ``depth_bins`` bins (softmax) for the value volume;
    each query's reference point is its pixel centre at a predicted depth ``sigmoid(w . q)``; offsets are
    ``(dx, dy, dz)`` in pixels and bins.

    Args:
        dim: ``C``. num_heads: ``H``. num_points: ``P``. depth_bins: ``Db``.
    """

    def __init__(self, dim: int, num_heads: int = 8, num_points: int = 4, depth_bins: int = 16):
        super().__init__()
        self.dim = dim
        self.head_dim = divisible(self, dim, num_heads)
        self.num_heads = num_heads
        self.num_points = int_option(self, "num_points", num_points, 1)
        self.depth_bins = int_option(self, "depth_bins", depth_bins, 1)
        self.sampling_offsets = nn.Linear(dim, num_heads * num_points * 3)
        self.attention_weights = nn.Linear(dim, num_heads * num_points)
        self.depth_head = nn.Linear(dim, num_heads * depth_bins)
        self.reference_depth = nn.Linear(dim, 1)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        _init_offsets(self.sampling_offsets, num_heads, num_points, 3)
        for lin in (self.attention_weights, self.depth_head, self.reference_depth):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, Y, X, C)`` -> ``(B, Y, X, C)``."""
        check_channels_last(self, x, self.dim, meta=_META)
        B, Y, X, C = x.shape
        H, P, Db = self.num_heads, self.num_points, self.depth_bins
        q = x.reshape(B, Y * X, C)  # (B, N, C)
        value = self.value_proj(q).view(B, Y * X, H, self.head_dim)  # (B, S, H, D)
        depth = self.depth_head(q).view(B, Y * X, H, Db).softmax(-1)  # (B, S, H, Db)
        offsets = _locating(self.sampling_offsets, q).view(B, Y * X, H, 1, P, 3)  # (B, N, H, L=1, P, 3), pixels/bins
        attn = self.attention_weights(q).view(B, Y * X, H, P).softmax(-1).view(B, Y * X, H, 1, P)
        ref_xy = _reference_points(Y, X, offsets)[None]  # (1, N, 2), in the offsets' (float32+) dtype
        ref_d = torch.sigmoid(_locating(self.reference_depth, q))  # (B, N, 1)
        ref = torch.cat([ref_xy.expand(B, -1, -1), ref_d], -1)[:, :, None, None, None, :]  # (B, N, 1, 1, 1, 3)
        scale = torch.tensor([X, Y, Db], dtype=offsets.dtype, device=x.device)
        out = deformable_attention_3d(value, depth, [(Y, X)], ref + offsets / scale, attn)  # (B, N, H, D)
        return self.output_proj(out.reshape(B, Y * X, C)).view(B, Y, X, C)


def _flops2d(cfg: dict) -> float:
    B, C, (Y, X) = cfg["batch"], cfg["dim"], cfg["input_size"]
    H, P = cfg.get("num_heads", 8), cfg.get("num_points", 4)
    n = B * Y * X
    return float(n * (2 * C * (2 * C + 3 * H * P)) + n * H * P * (4 * 2 * C // H + 12))


def _flops3d(cfg: dict) -> float:
    B, C, (Y, X) = cfg["batch"], cfg["dim"], cfg["input_size"]
    H, P, Db = cfg.get("num_heads", 8), cfg.get("num_points", 4), cfg.get("depth_bins", 16)
    n = B * Y * X
    return float(n * 2 * C * (2 * C + 4 * H * P + H * Db + 1) + n * H * P * (4 * (2 * C // H + 8) + 16))


_DETR = Paper("Deformable DETR: Deformable Transformers for End-to-End Object Detection", "2010.04159", 2020)
_DFA3D = Paper("DFA3D: 3D Deformable Attention For 2D-to-3D Feature Lifting", "2307.12972", 2023)

register(name="deformable_2d", family=Family.VISION, paper=_DETR, patterns=("noncausal-self",),
         complexity="O(N H P (D + 8))", flops=_flops2d,
         options=lambda c: {k: c[k] for k in ("dim", "num_heads", "num_points")},
         reference=naive_deformable_module, functional=deformable_attention,
         default_config={"dim": 96, "num_heads": 8, "num_points": 4},
         tiny_config={"dim": 8, "num_heads": 2, "num_points": 3},
         default_input={"batch": 1, "input_size": (14, 14)}, tiny_input={"batch": 2, "input_size": (3, 4)},
         input_kind=InputKind.IMAGE,
         notes="The encoder self-attention of Deformable DETR on one level: every pixel is a query with its centre "
               "as reference point, offsets in pixels normalised by the level size, softmax over the L P points, "
               "the paper's initialisation (zero offset weights, directional bias grid, zero attention weights). "
               "The op (deformable_attention) is multi-scale. Fast path: the corner weights of all points form "
               "one CSR matrix (B Nq H rows, 4 L P entries each) times the values, so no (queries x points x "
               "channels) tensor is built, forward or backward; 'grid_sample' is the paper code's PyTorch form.")(
    DeformableAttention2D)

register(name="deformable_3d", family=Family.VISION, paper=_DFA3D, patterns=("noncausal-self",),
         complexity="O(N H P (D + 8)), independent of the depth bins", flops=_flops3d,
         options=lambda c: {k: c[k] for k in ("dim", "num_heads", "num_points", "depth_bins")},
         reference=naive_deformable_3d_module, functional=deformable_attention_3d,
         default_config={"dim": 96, "num_heads": 8, "num_points": 4, "depth_bins": 16},
         tiny_config={"dim": 8, "num_heads": 2, "num_points": 2, "depth_bins": 4},
         default_input={"batch": 1, "input_size": (14, 14)}, tiny_input={"batch": 2, "input_size": (3, 4)},
         input_kind=InputKind.IMAGE,
         notes="DFA3D lifts 2-D features for 3-D queries (anchors projected into cameras); as a registered token "
               "mixer the queries are the image's own pixels, with the pixel centre as (x, y) and a learned "
               "reference depth sigmoid(w . q) (our choice: the paper's queries come with projected depths). "
               "Depth: softmax over depth_bins per pixel and head (the paper's per-head layout). The trilinear "
               "read of the volume depth (x) value is factorised (bilinear corners weighted by a linearly "
               "interpolated depth score), never materialised; 'grid_sample' materialises it as the check.")(
    DeformableAttention3D)
