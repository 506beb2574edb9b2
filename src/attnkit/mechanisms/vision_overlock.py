"""ContMix: OverLoCK's context-mixing dynamic-kernel token mixer with top-down guidance.

"OverLoCK: An Overview-first-Look-Closely-next ConvNet with Context-Mixing Dynamic Kernels", arXiv 2502.20087
(CVPR 2025), Sec. 3.3. Queries come from the pixels, keys from ``S x S`` region centres of a context map (the
Overview-Net's top-down guidance in the Focus-Net; the input itself in the plug-and-play block); each pixel's
affinities to the regions become a softmax-normalised ``k x k`` kernel per channel group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attnkit.ops.channel._common import check_channels_last
from attnkit.ops.vision.contmix import BORDERS, contmix
from attnkit.reference.naive_vision_a import naive_contmix_module
from attnkit.registry import Family, InputKind, Paper, choice_option, int_option, register


def _proj(lin: nn.Linear, bn: nn.BatchNorm1d, t: torch.Tensor, training: bool) -> torch.Tensor:
    """A 1x1 conv + BatchNorm2d on a channels-last map: a linear layer, then batch statistics over every pixel."""
    y = F.linear(t, lin.weight, lin.bias)
    if training and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    flat = y.reshape(-1, y.shape[-1])  # (B * pixels, C_out): BatchNorm's per-channel statistics
    return F.batch_norm(flat, bn.running_mean, bn.running_var, bn.weight, bn.bias, training, bn.momentum or 0.0,
                        bn.eps).view(y.shape)


class ContMix(nn.Module):
    """OverLoCK's ContMix on channels-last maps ``(B, Y, X, C)``, optionally guided by a context ``(B, Yc, Xc, Cc)``.

    ``q = BN(x W_q) / sqrt(C / G)`` (``C/2`` channels in ``G`` groups), ``k = BN(pool_{S x S}(context) W_k)``,
    ``v = BN(x W_v)``, kernel logits ``= (q . k) W_proj + b + rpb``, softmax per kernel; branch ``n`` of
    ``kernel_sizes`` mixes the ``n``-th equal chunk of the channels; ``out = BN(mixed W_out)``.

    Args:
        dim: ``C`` (divisible by ``len(kernel_sizes) * num_heads``).
        context_dim: ``Cc`` of the guidance map; None: ``C`` (and ``forward(x)`` uses ``x`` itself).
        kernel_sizes: odd kernel sizes in channel-chunk order (OverLoCK: ``(5, 7)``, the small kernel on the first
            half; its stage-3 blocks use ``(5, 13)``).
        num_heads: ``G``, kernel groups per branch (the authors' code calls ``G / 2`` ``num_heads``).
        regions: ``S``, region centres per axis (OverLoCK: 7).
        border: ``"clamp"`` (the authors' neighbourhood windows, shifted inside the image; needs
            ``Y, X >= max(kernel_sizes)``) or ``"zero"`` (centred windows, zero padding; any size).
        rpb: a learned relative position bias per branch (the authors' code).
        value_proj: a 1x1 conv + BN on the values (the plug-and-play block); False mixes ``x`` directly (the
            Focus-Net block, whose input is already a fused projection).
    """

    def __init__(self, dim: int, context_dim: int | None = None, kernel_sizes: tuple[int, ...] = (5, 7),
                 num_heads: int = 4, regions: int = 7, border: str = "clamp", rpb: bool = True,
                 value_proj: bool = True):
        super().__init__()
        who = type(self).__name__
        C = self.dim = int_option(self, "dim", dim, 1)
        Cc = self.context_dim = C if context_dim is None else int_option(self, "context_dim", context_dim, 1)
        G = self.num_heads = int_option(self, "num_heads", num_heads, 1)
        if not isinstance(kernel_sizes, (tuple, list)) or not kernel_sizes or any(
                isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0 for k in kernel_sizes):
            raise ValueError(f"{who}: kernel_sizes must be a non-empty tuple of odd ints (kernels centred on each "
                             f"pixel), got {kernel_sizes!r}")
        ks = self.kernel_sizes = tuple(kernel_sizes)
        if C % (len(ks) * G) or C % (2 * G):
            raise ValueError(f"{who}: dim ({C}) must be divisible by len(kernel_sizes) * num_heads ({len(ks) * G}) "
                             f"and by 2 * num_heads ({2 * G}): {len(ks)} kernel branches of num_heads channel groups "
                             f"each, half-width queries in num_heads groups")
        self.regions = int_option(self, "regions", regions, 1)
        self.border = choice_option(self, "border", border, BORDERS)
        self.scale = (C // G) ** -0.5  # the authors' head width C / G (the query groups are C / (2 G) wide)
        self.query = nn.Linear(C, C // 2, bias=False)
        self.query_norm = nn.BatchNorm1d(C // 2)
        self.key = nn.Linear(Cc, C // 2, bias=False)
        self.key_norm = nn.BatchNorm1d(C // 2)
        self.value = nn.Linear(C, C, bias=False) if value_proj else None
        self.value_norm = nn.BatchNorm1d(C) if value_proj else None
        self.proj = nn.Linear(self.regions ** 2, sum(k * k for k in ks))
        self.rpb = nn.ParameterList(
            [nn.Parameter(nn.init.trunc_normal_(torch.empty(G, 2 * k - 1, 2 * k - 1), std=0.02)) for k in ks]
        ) if rpb else None
        self.out = nn.Linear(C, C, bias=False)
        self.out_norm = nn.BatchNorm1d(C)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``x (B, Y, X, C)``, ``context (B, Yc, Xc, Cc)`` or None (``x``) -> ``(B, Y, X, C)``."""
        who = type(self).__name__
        check_channels_last(self, x, self.dim)
        B, Y, X, C = x.shape
        G, D = self.num_heads, C // (2 * self.num_heads)
        if context is None:
            if self.context_dim != C:
                raise ValueError(f"{who}: context_dim={self.context_dim} differs from dim={C}: pass the guidance "
                                 f"map as context")
            context = x
        else:
            check_channels_last(self, context, self.context_dim)
            if context.shape[0] != B:
                raise ValueError(f"{who}: context must have x's batch {B}, got {tuple(context.shape)}")
        if self.border == "clamp" and min(Y, X) < max(self.kernel_sizes):
            raise ValueError(f"{who}: border='clamp' needs a map of at least the largest of kernel_sizes="
                             f"{self.kernel_sizes} per side, got (Y, X) = {(Y, X)}; use border='zero'")
        S = self.regions
        # adaptive average pooling to S x S region centres: (B, Cc, S, S) -> (B, S*S, Cc)
        pooled = F.adaptive_avg_pool2d(context.permute(0, 3, 1, 2), S).flatten(2).transpose(1, 2)
        q = _proj(self.query, self.query_norm, x, self.training) * self.scale  # (B, Y, X, C/2)
        k = _proj(self.key, self.key_norm, pooled, self.training)  # (B, S*S, C/2)
        v = x if self.value is None else _proj(self.value, self.value_norm, x, self.training)  # (B, Y, X, C)
        mixed = contmix(q.view(B, Y, X, G, D), k.view(B, S * S, G, D), v, self.proj.weight, self.proj.bias,
                        self.kernel_sizes, None if self.rpb is None else tuple(self.rpb), self.border)
        return _proj(self.out, self.out_norm, mixed, self.training)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, context_dim={self.context_dim}, kernel_sizes={self.kernel_sizes}, "
                f"num_heads={self.num_heads}, regions={self.regions}, border={self.border!r}")


def _flops(cfg: dict) -> float:
    B, C = cfg["batch"], cfg["dim"]
    Y, X = cfg["input_size"]
    ks, S, G = tuple(cfg.get("kernel_sizes", (5, 7))), cfg.get("regions", 7), cfg.get("num_heads", 4)
    R, K = S * S, sum(k * k for k in ks)
    proj = 2 * C * (C // 2) + 2 * C * C * 2  # query, value and output 1x1 convs
    mix = sum(2 * (C // len(ks)) * k * k for k in ks)  # each branch's per-pixel kernel on its channel chunk
    dyn = 2 * (C // 2) * R + 2 * G * R * K + 5 * G * K + mix
    return float(B * Y * X * (proj + dyn) + B * R * 2 * C * (C // 2))


def _options(c: dict) -> dict:
    return {k: c[k] for k in ("dim", "kernel_sizes", "num_heads", "regions", "border")}


register(name="overlock_dynamic", family=Family.VISION,
         paper=Paper("OverLoCK: An Overview-first-Look-Closely-next ConvNet with Context-Mixing Dynamic Kernels",
                     "2502.20087", 2025),
         patterns=("noncausal-self",), complexity="O(Y X (C^2 + C S^2 + G S^2 k^2 + C k^2))", flops=_flops,
         options=_options, reference=naive_contmix_module, functional=contmix,
         default_config={"dim": 64, "kernel_sizes": (5, 7), "num_heads": 4, "regions": 7, "border": "clamp"},
         tiny_config={"dim": 8, "kernel_sizes": (3, 3), "num_heads": 2, "regions": 2},
         default_input={"batch": 2, "input_size": (14, 14)}, tiny_input={"batch": 2, "input_size": (4, 5)},
         shape=lambda c: (c["batch"], *c["input_size"], c["dim"]), input_kind=InputKind.IMAGE,
         notes="The ContMix token mixer of OverLoCK's blocks (Sec. 3.3) with the authors' code's details: BN "
               "after each 1x1 projection, query scale (C / G)^-1/2 with G = 2 * num_heads of their code (the "
               "query groups are C / (2G) wide; num_heads here is G, the authors' num_heads is G / 2), 7 x 7 "
               "adaptive-average-pooled region keys, one linear map from "
               "the 49 affinities to all kernel logits, a learned relative position bias, softmax per kernel, the "
               "first channel half mixed by the small kernel (5) and the second by the large one (kernel_sizes "
               "generalises to any number of equal channel chunks). The rest of the "
               "block (residual depthwise convs, the dilated re-parameterised lepe branch, SE, SiLU gate, GRN MLP, "
               "and in the Focus-Net the concatenation of x with the guidance) is not part of the mechanism. "
               "Layout: channels-last (B, Y, X, C) although the authors' block is CNN-shaped (BatchNorm2d, 1x1 "
               "convs), because the mixing is per-pixel (tokens with their own kernels), the dynamic aggregation "
               "op is channels-last, and 1x1 convs are linear layers there (weights (O, I, 1, 1) -> (O, I)); "
               "BatchNorm statistics are taken over every pixel, as BatchNorm2d. Top-down guidance: "
               "forward(x, context) takes the keys from the context map (any spatial size: it is pooled to 7 x 7); "
               "without it the keys come from x (the plug-and-play ContMixBlock). border='clamp' (default) is "
               "the authors' NATTEN windows (shifted inside the image at the borders, the true offset indexing the "
               "position bias) and refuses maps smaller than the largest kernel (the authors upsample such maps "
               "bilinearly and pool back; not reproduced); border='zero' uses centred windows with zero padding "
               "(the dynamic_depthwise_conv op) and accepts any size. value_proj=False mixes x directly (the "
               "Focus-Net's DynamicConvBlock). No peer in timm.")(ContMix)
