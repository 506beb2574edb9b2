"""Kernelized linear attention modules: Katharopoulos et al., and two vision configs of the same op.

"Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention", arXiv 2006.16236;
"The Linear Attention Resurrection in Vision Transformer" (L2ViT), arXiv 2501.16182 — its linear
global attention (LGA); "CARE Transformer: Mobile-Friendly Linear Visual Transformer via Decoupled
Dual Interaction", arXiv 2411.16170 — its global (linear-attention) branch.
All three are ``ak.linear_attention`` plus projections; only the normaliser differs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from attnkit.ops.linear.call import linear_attention
from attnkit.ops.linear.feature_maps import resolve_feature_map
from attnkit.reference.naive_modules import naive_care, naive_l2vit, naive_linear_module
from attnkit.registry import (
    Family,
    InputKind,
    Paper,
    check_input,
    divisible,
    float_option,
    int_option,
    named_errors,
    register,
)


@dataclass(frozen=True)
class LinearAttentionConfig:
    dim: int
    num_heads: int
    causal: bool = True
    feature_map: str = "elu+1"
    normalize: bool = True
    eps: float = 1e-6


class LinearAttention(nn.Module):
    """Linear attention on ``x (B, N, C)`` (or cross: ``forward(x, context)``): Katharopoulos defaults.

    ``q, k, v = x W_q, x W_k, x W_v`` (no bias) -> ``(B, N, H, D)`` -> ``ak.linear_attention`` with
    phi = elu+1, normalisation, no q scale -> ``W_o``.

    Example:
        >>> m = LinearAttention(64, 4, causal=True)   # causal=False by default, as every module
        >>> y = m(torch.randn(2, 100, 64))
    """

    def __init__(self, dim: int, num_heads: int, causal: bool = False, feature_map: str = "elu+1",
                 normalize: bool = True, eps: float = 1e-6):
        super().__init__()
        divisible(self, dim, num_heads)
        float_option(self, "eps", eps, minimum=0.0)
        with named_errors(self):
            resolve_feature_map(feature_map)
        self.config = LinearAttentionConfig(dim, num_heads, causal, feature_map, normalize, eps)
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        c = self.config
        check_input(self, x, "(B, N, C)", channels=c.dim, meta="the linear_attention op has no meta path")
        ctx = x if context is None else check_input(self, context, "(B, M, C)", channels=c.dim, name="context")
        B, N, C = x.shape
        q = self.q(x).view(B, N, c.num_heads, C // c.num_heads)  # (B, N, H, D)
        k, v = self.kv(ctx).view(B, ctx.shape[1], 2, c.num_heads, C // c.num_heads).unbind(2)  # (B, M, H, D)
        o = linear_attention(q, k, v, causal=c.causal, feature_map=c.feature_map, normalize=c.normalize,
                             scale=1.0, eps=c.eps)
        return self.out(o.reshape(B, N, C))  # (B, N, C)


class L2ViTAttention(nn.Module):
    """L2ViT linear global attention (LGA) on channels-last ``x (B, h, w, C)``.

    phi = ReLU; ``O = tau_h * phi(Q)(phi(K)^T V) / max(phi(Q) . sum_s phi(k_s), 100)``; tau learnable per
    head, init D^-1/2. Both numerator and denominator are ``ak.linear_attention`` calls (non-causal,
    unnormalised; the denominator is the op with v = 1). The clamp is part of the trained function.
    The local concentration module (LCM) is a separate conv block, not included here.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, clamp_min: float = 100.0):
        super().__init__()
        divisible(self, dim, num_heads)
        self.dim, self.num_heads = dim, num_heads
        self.clamp_min = float_option(self, "clamp_min", clamp_min, minimum=0.0, exclusive=True)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.temperature = nn.Parameter(torch.full((num_heads,), (dim // num_heads) ** -0.5))
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, "(B, Y, X, C)", channels=self.dim, meta="the linear_attention op has no meta path")
        B, h, w, C = x.shape
        H = self.num_heads
        q, k, v = self.qkv(x).view(B, h * w, 3, H, C // H).unbind(2)  # (B, N, H, D) each
        # numerator and denominator in fp32 until the division: for half inputs they can exceed fp16's range
        wide = torch.promote_types(x.dtype, torch.float32)
        num = linear_attention(q, k, v, causal=False, feature_map="relu", scale=1.0, out_dtype=wide)
        den = linear_attention(q, k, torch.ones_like(v[..., :1]), causal=False, feature_map="relu", scale=1.0,
                               out_dtype=wide)
        o = (self.temperature[:, None] * num / den.clamp_min(self.clamp_min)).to(x.dtype)  # (B, N, H, D)
        return self.out(o.reshape(B, h, w, C))


class CAREAttention(nn.Module):
    """CARE global branch on channels-last ``x (B, h, w, g)``.

    ``[Q, K] = x W_qk`` (1x1 conv = Linear, with bias), ``V = x`` (no value projection), heads of width
    ``d_att``; phi = elu+1; normalised non-causal with the *mean* normaliser, i.e. the sum-normalised op
    with eps scaled by N. The depthwise-conv branches and the dual interaction are conv blocks, not here.
    """

    def __init__(self, dim: int, head_dim: int = 16, eps: float = 1e-6):
        super().__init__()
        int_option(self, "dim", dim, 1)
        if dim % int_option(self, "head_dim", head_dim, 1):
            raise ValueError(f"{type(self).__name__}: dim ({dim}) must be divisible by head_dim ({head_dim})")
        self.dim, self.head_dim, self.eps = dim, head_dim, float_option(self, "eps", eps, minimum=0.0)
        self.qk = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, "(B, Y, X, C)", channels=self.dim, meta="the linear_attention op has no meta path")
        B, h, w, C = x.shape
        N, H = h * w, C // self.head_dim
        q, k = self.qk(x).view(B, N, 2, H, self.head_dim).unbind(2)  # (B, N, H, d_att)
        v = x.reshape(B, N, H, self.head_dim)  # (B, N, H, d_att)
        o = linear_attention(q, k, v, causal=False, feature_map="elu+1", normalize=True, scale=1.0,
                             eps=self.eps * N)
        return o.reshape(B, h, w, C)


def _lin_flops(cfg: dict) -> float:
    B, N, C, H = cfg.get("batch", 1), cfg["seq_len"], cfg["dim"], cfg["num_heads"]
    D = C // H
    return float(2 * B * N * C * C * 4 + B * H * N * 4 * D * (D + 1))


def _vis_flops(cfg: dict) -> float:
    B, N, C = cfg.get("batch", 1), cfg["height"] * cfg["width"], cfg["dim"]
    H = cfg.get("num_heads") or C // cfg.get("head_dim", 16)
    D = C // H
    return float(2 * B * N * C * C * 4 + B * H * N * 4 * D * (D + 1))


_LIN = {"dim": 32, "num_heads": 4, "causal": True}
_L2 = {"dim": 32, "num_heads": 2}
_CARE = {"dim": 32, "head_dim": 16}
_LIN_TINY = {"dim": 8, "num_heads": 2}
_L2_TINY = {"dim": 8, "num_heads": 2}
_CARE_TINY = {"dim": 8, "head_dim": 4}
_SEQ_IN, _SEQ_TINY_IN = {"batch": 2, "seq_len": 33}, {"batch": 1, "seq_len": 6}
_IMG_IN, _IMG_TINY_IN = {"batch": 2, "height": 6, "width": 5}, {"batch": 1, "height": 3, "width": 4}


def _vis_shape(c: dict) -> tuple[int, ...]:
    return (c["batch"], c["height"], c["width"], c["dim"])


register(
    name="linear_attention", family=Family.LINEAR,
    paper=Paper("Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention", "2006.16236", 2020),
    patterns=("noncausal-self", "causal-self", "noncausal-cross"),
    complexity="O(N H D^2)", flops=_lin_flops,
    options=lambda c: {"dim": c["dim"], "num_heads": c["num_heads"], "causal": c["causal"]},
    reference=naive_linear_module, functional=linear_attention, default_config=_LIN, tiny_config=_LIN_TINY,
    default_input=_SEQ_IN, tiny_input=_SEQ_TINY_IN,
    notes="phi = elu+1, normalised, eps 1e-6 added to the denominator, no q scale (it would cancel). "
          "Cross-attention (forward(x, context)) is non-causal only: causal needs M == N.",
)(LinearAttention)

register(
    name="l2vit_lga", family=Family.LINEAR,
    paper=Paper("The Linear Attention Resurrection in Vision Transformer", "2501.16182", 2025),
    patterns=("noncausal-self",), complexity="O(N H D^2)", flops=_vis_flops,
    options=lambda c: {"dim": c["dim"], "num_heads": c["num_heads"]}, reference=naive_l2vit,
    functional=linear_attention, default_config=_L2, tiny_config=_L2_TINY, input_kind=InputKind.IMAGE,
    default_input=_IMG_IN, tiny_input=_IMG_TINY_IN,
    shape=_vis_shape,
    notes="LGA op only (ReLU kernel, learnable per-head numerator temperature, denominator clamped at 100); "
          "LCM/LWA blocks are outside this token mixer.",
)(L2ViTAttention)

register(
    name="care_attention", family=Family.LINEAR,
    paper=Paper("CARE Transformer: Mobile-Friendly Linear Visual Transformer via Decoupled Dual Interaction",
                "2411.16170", 2024),
    patterns=("noncausal-self",), complexity="O(N g d_att)", flops=_vis_flops,
    options=lambda c: {"dim": c["dim"], "head_dim": c["head_dim"]}, reference=naive_care,
    functional=linear_attention, default_config=_CARE, tiny_config=_CARE_TINY, input_kind=InputKind.IMAGE,
    default_input=_IMG_IN, tiny_input=_IMG_TINY_IN,
    shape=_vis_shape,
    notes="Global branch only (elu+1, mean normaliser = sum normaliser with eps*N, V = input without "
          "projection); channel split, conv branches and dual interaction are not token mixing.",
)(CAREAttention)
