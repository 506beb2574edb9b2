"""RISurConv: rotation-invariant surface attention over point neighbourhoods.

"RISurConv: Rotation Invariant Surface Attention-Augmented Convolutions for 3D Point Cloud Classification and
Segmentation", arXiv 2408.06110 (ECCV 2024). The ops are ``attnkit.ops.vision.risur.risp_features`` and
``surface_attention``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attnkit.ops.vision.risur import NORMALIZE, risp_features, surface_attention
from attnkit.reference.naive_vision_c import naive_risur_module
from attnkit.registry import Family, InputKind, Paper, check_input, choice_option, int_option, register


def _linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` in ``x``'s dtype (float32 work for a half-precision module)."""
    return F.linear(x, layer.weight.to(x.dtype), None if layer.bias is None else layer.bias.to(x.dtype))


def _batch_norm(norm: nn.BatchNorm1d, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm over every axis but the last (channels), in ``x``'s dtype; running statistics kept in theirs."""
    flat = x.reshape(-1, x.shape[-1])  # (B * ..., C)
    if flat.dtype == norm.weight.dtype:
        return norm(flat).view(x.shape)
    if norm.training:  # statistics in float32; running ones updated in their own dtype as nn.BatchNorm1d does
        mean, var = flat.mean(0), flat.var(0, unbiased=False)
        if norm.track_running_stats and not torch.compiler.is_compiling():
            with torch.no_grad():
                m, n = norm.momentum, flat.shape[0]
                unbiased = var * n / max(n - 1, 1)
                norm.running_mean.mul_(1 - m).add_(m * mean.to(norm.running_mean.dtype))
                norm.running_var.mul_(1 - m).add_(m * unbiased.to(norm.running_var.dtype))
                norm.num_batches_tracked.add_(1)
    else:
        mean, var = norm.running_mean.to(x.dtype), norm.running_var.to(x.dtype)
    out = (flat - mean) * torch.rsqrt(var + norm.eps) * norm.weight.to(x.dtype) + norm.bias.to(x.dtype)
    return out.view(x.shape)


class OffsetAttention(nn.Module):
    """Offset-attention on ``(B, G, K, C)`` (arXiv 2012.09688 Sec. 3.3): ``x + relu(BN(W_t (x - read)))``."""

    def __init__(self, dim: int, normalize: str = "neighbours"):
        super().__init__()
        self.normalize = normalize
        self.q = nn.Linear(dim, max(1, dim // 4), bias=False)
        self.k = nn.Linear(dim, max(1, dim // 4), bias=False)
        self.v = nn.Linear(dim, dim)
        self.trans = nn.Linear(dim, dim)
        self.norm = nn.BatchNorm1d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        read = surface_attention(_linear(self.q, x), _linear(self.k, x), _linear(self.v, x),
                                 self.normalize)  # (B, G, K, C)
        return x + torch.relu(_batch_norm(self.norm, _linear(self.trans, x - read)))


def _flops(c: dict) -> float:
    b, n, k, e, o, ci = c["batch"], c["seq_len"], c["k"], c["embed_dim"], c["out_dim"], c["in_channels"]
    per_nb = 2 * 14 * e + 2 * e * e + 2 * e * (e // 2 + e) + 4 * k * (e // 4 + e) + 2 * e * e + 2 * (e + ci) * o
    return float(b * n * (k * per_nb + 40 * k) + b * (4 * n * n * (o // 4 + o) + 2 * n * o * (o // 2 + 2 * o)))


@register(
    name="risur_attention", family=Family.VISION,
    paper=Paper("RISurConv: Rotation Invariant Surface Attention-Augmented Convolutions for 3D Point Cloud "
                "Classification and Segmentation", "2408.06110", 2024),
    patterns=("noncausal-self",), complexity="O(B N K (K + C) C + B N^2 C)", flops=_flops,
    options=lambda c: {"out_dim": c["out_dim"], "k": c["k"], "in_channels": c["in_channels"],
                       "embed_dim": c["embed_dim"], "shift": c["shift"], "normalize": c["normalize"]},
    reference=naive_risur_module, functional=(risp_features, surface_attention), input_kind=InputKind.SEQUENCE,
    shape=lambda c: (c.get("batch", 1), c["seq_len"], 6),
    output_shape=lambda c: (c.get("batch", 1), c["seq_len"], c["out_dim"]),
    default_config={"out_dim": 64, "k": 16, "in_channels": 0, "embed_dim": 64, "shift": 1,
                    "normalize": "neighbours"},
    default_input={"batch": 8, "seq_len": 512},
    tiny_config={"out_dim": 8, "k": 3, "embed_dim": 8}, tiny_input={"batch": 2, "seq_len": 7},
    notes="One RISurConv layer with every point as a reference point: x (B, N, 6) is points and normals (the "
          "authors' input convention), optional features (B, N, C_in) of the previous layer; output (B, N, "
          "out_dim), registered as a pooling spec because the channels change. Per point: the k nearest OTHER "
          "points (the authors' k-NN includes the point itself, a zero vector whose unit direction they set to 0; "
          "excluded here so every length has a gradient), ordered by angle around the point's normal, the 14 RISP "
          "values of the released code (same values and neighbour order, checked to 3e-16), embedding 14 -> E/2 -> "
          "E (1x1 convs each with BatchNorm, one ReLU after the second, as the code), offset-attention over the "
          "neighbourhood, concatenation of the neighbours' features, a 1x1 conv + BatchNorm + ReLU, max over the "
          "neighbourhood, offset-attention over the points. Offset-attention is Point Cloud Transformer's (softmax "
          "over keys, renormalised over queries, no 1/sqrt(d)); the released 2-D layer renormalises over the "
          "reference points instead (dim 1 of (B, P, K, K)), offered as normalize='points'; 'neighbours' (default) "
          "keeps neighbourhoods independent. Farthest-point sampling of the reference points and the classifier are"
          " architecture, not part of the op. Normals are normalised inside. Half inputs: the layer computes in "
          "float32 (parameters upcast, BatchNorm running statistics kept in their dtype) and casts the output back.",
)
class RISurAttention(nn.Module):
    """RISurConv's rotation-invariant surface attention layer on a point cloud with normals.

    Args:
        out_dim: output channels. k: neighbours per point (paper: 8 to 64 by stage). in_channels: channels of
            the optional per-point ``features`` (0: none, the first layer). embed_dim: RISP embedding width
            (code: 64). shift: ordered offset of the adjacent neighbour (code: 2 from N >= 1024).
        normalize: ``"neighbours"`` or ``"points"`` (the column renormalisation of the local attention).

    Shapes:
        ``x (B, N, 6)`` (xyz, normal), ``features (B, N, C_in)`` -> ``(B, N, out_dim)``.
    """

    def __init__(self, out_dim: int = 64, k: int = 16, in_channels: int = 0, embed_dim: int = 64, shift: int = 1,
                 normalize: str = "neighbours"):
        super().__init__()
        self.out_dim = int_option(self, "out_dim", out_dim, 1)
        self.k = int_option(self, "k", k, 3)
        self.in_channels = int_option(self, "in_channels", in_channels, 0)
        self.embed_dim = int_option(self, "embed_dim", embed_dim, 2)
        self.shift = int_option(self, "shift", shift, 1)
        if self.shift >= self.k:
            raise ValueError(f"{type(self).__name__}: shift must be < k ({k}), got {shift}")
        self.normalize = choice_option(self, "normalize", normalize, NORMALIZE)
        self.embed1 = nn.Linear(14, embed_dim // 2, bias=False)
        self.embed_norm1 = nn.BatchNorm1d(embed_dim // 2)
        self.embed2 = nn.Linear(embed_dim // 2, embed_dim, bias=False)
        self.embed_norm2 = nn.BatchNorm1d(embed_dim)
        self.local_attention = OffsetAttention(embed_dim, normalize)
        self.conv = nn.Linear(embed_dim + in_channels, out_dim)
        self.conv_norm = nn.BatchNorm1d(out_dim)
        self.global_attention = OffsetAttention(out_dim)

    def forward(self, x: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """``x (B, N, 6)`` points and normals, ``features (B, N, C_in)`` -> ``(B, N, out_dim)``."""
        who = type(self).__name__
        check_input(self, x, "(B, N, C)", channels=6)
        if x.shape[1] <= self.k:
            raise ValueError(f"{who}: x has N={x.shape[1]} points; k={self.k} neighbours need N > k")
        if (features is None) != (self.in_channels == 0):
            raise ValueError(f"{who}: features (B, N, C_in={self.in_channels}) must be given exactly when "
                             f"in_channels > 0")
        if features is not None:
            check_input(self, features, "(B, N, C)", channels=self.in_channels, name="features")
            if features.shape[:2] != x.shape[:2]:
                raise ValueError(f"{who}: features must share x's (B, N) = {tuple(x.shape[:2])}, got "
                                 f"shape {tuple(features.shape)}")
        # half inputs: the whole layer works in float32 (3-digit coordinates make the input gradient through
        # 1 / |x_i - p| and the BatchNorm statistics meaningless), the output is cast back
        work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        out_dtype, x = x.dtype, x.to(work)
        features = None if features is None else features.to(work)
        ri, idx = risp_features(x[..., :3], x[..., 3:], self.k, self.shift)  # (B, N, K, 14), (B, N, K)
        h = _batch_norm(self.embed_norm1, _linear(self.embed1, ri))
        h = torch.relu(_batch_norm(self.embed_norm2, _linear(self.embed2, h)))  # (B, N, K, E)
        h = self.local_attention(h)
        if features is not None:
            B, N, K = idx.shape
            grouped = torch.gather(features, 1, idx.reshape(B, N * K, 1).expand(-1, -1, features.shape[-1]))
            h = torch.cat([h, grouped.view(B, N, K, -1)], -1)  # (B, N, K, E + C_in)
        h = torch.relu(_batch_norm(self.conv_norm, _linear(self.conv, h)))
        pooled = h.amax(2)  # (B, N, out_dim): max over the neighbourhood
        return self.global_attention(pooled[:, None])[:, 0].to(out_dtype)  # attention over the N points (one group)
