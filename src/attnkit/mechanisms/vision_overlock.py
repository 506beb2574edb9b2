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

    ``q = BN(x W_q) / sqrt(C / G)`` ``(C/2 channels in G groups)``, ``k = BN(pool_{S x S}(context) W_k)``,
    ``v = BN(x W_v)``, kernel logits ``= (q . k) W_proj + b + rpb``, softmax per kernel; the first half of the
    channels is mixed with the small kernel, the second half with the large one; ``out = BN(mixed W_out)``.

    Args:
        channels: ``C`` (divisible by ``2 * groups``).
        context_channels: ``Cc`` of the guidance map; None: ``C`` (and ``forward(x)`` uses ``x`` itself).
        kernel_size: the large dynamic kernel (OverLoCK: 7 in the plug-and-play block, 13 / 7 in stages 3 / 4).
        small_kernel_size: the small one (OverLoCK: 5).
        groups: kernel groups per branch ``G`` (the authors' ``num_heads * 2``).
        regions: ``S``, region centres per axis (OverLoCK: 7).
        border: ``"clamp"`` (the authors' neighbourhood windows, shifted inside the image; needs
            ``Y, X >= kernel_size``) or ``"zero"`` (centred windows, zero padding; any size).
        rpb: a learned relative position bias per branch (the authors' code).
        value_proj: a 1x1 conv + BN on the values (the plug-and-play block); False mixes ``x`` directly (the
            Focus-Net block, whose input is already a fused projection).
    """

    def __init__(self, channels: int, context_channels: int | None = None, kernel_size: int = 7,
                 small_kernel_size: int = 5, groups: int = 4, regions: int = 7, border: str = "clamp",
                 rpb: bool = True, value_proj: bool = True):
        super().__init__()
        C = self.channels = int_option(self, "channels", channels, 1)
        Cc = self.context_channels = C if context_channels is None else int_option(
            self, "context_channels", context_channels, 1)
        G = self.groups = int_option(self, "groups", groups, 1)
        if C % (2 * G):
            raise ValueError(f"{type(self).__name__}: channels ({C}) must be divisible by 2 * groups ({2 * G}): two "
                             f"kernel branches of groups channel groups each")
        self.kernel_size = int_option(self, "kernel_size", kernel_size, 1)
        self.small_kernel_size = int_option(self, "small_kernel_size", small_kernel_size, 1)
        for name, k in (("kernel_size", kernel_size), ("small_kernel_size", small_kernel_size)):
            if k % 2 == 0:
                raise ValueError(f"{type(self).__name__}: {name} must be odd (a kernel centred on each pixel), got {k}")
        self.regions = int_option(self, "regions", regions, 1)
        self.border = choice_option(self, "border", border, BORDERS)
        self.scale = (C // G) ** -0.5  # the authors' head width C / G (the query groups are C / (2 G) wide)
        self.query = nn.Linear(C, C // 2, bias=False)
        self.query_norm = nn.BatchNorm1d(C // 2)
        self.key = nn.Linear(Cc, C // 2, bias=False)
        self.key_norm = nn.BatchNorm1d(C // 2)
        self.value = nn.Linear(C, C, bias=False) if value_proj else None
        self.value_norm = nn.BatchNorm1d(C) if value_proj else None
        s, k = self.small_kernel_size, self.kernel_size
        self.proj = nn.Linear(self.regions ** 2, s * s + k * k)
        if rpb:
            self.rpb_small = nn.Parameter(nn.init.trunc_normal_(torch.empty(G, 2 * s - 1, 2 * s - 1), std=0.02))
            self.rpb_large = nn.Parameter(nn.init.trunc_normal_(torch.empty(G, 2 * k - 1, 2 * k - 1), std=0.02))
        else:
            self.rpb_small = self.rpb_large = None
        self.out = nn.Linear(C, C, bias=False)
        self.out_norm = nn.BatchNorm1d(C)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``x (B, Y, X, C)``, ``context (B, Yc, Xc, Cc)`` or None (``x``) -> ``(B, Y, X, C)``."""
        check_channels_last(self, x, self.channels)
        B, Y, X, C = x.shape
        G = self.groups
        if context is None:
            if self.context_channels != C:
                raise ValueError(f"{type(self).__name__}: context_channels={self.context_channels} differs from "
                                 f"channels={C}: pass the guidance map as context")
            context = x
        else:
            check_channels_last(self, context, self.context_channels)
            if context.shape[0] != B:
                raise ValueError(f"{type(self).__name__}: context must have x's batch {B}, got {tuple(context.shape)}")
        if self.border == "clamp" and min(Y, X) < self.kernel_size:
            raise ValueError(f"{type(self).__name__}: border='clamp' needs a map of at least kernel_size="
                             f"{self.kernel_size} per side, got (Y, X) = {(Y, X)}; use border='zero'")
        S = self.regions
        # adaptive average pooling to S x S region centres: (B, Cc, S, S) -> (B, S*S, Cc)
        pooled = F.adaptive_avg_pool2d(context.permute(0, 3, 1, 2), S).flatten(2).transpose(1, 2)
        q = _proj(self.query, self.query_norm, x, self.training) * self.scale  # (B, Y, X, C/2)
        k = _proj(self.key, self.key_norm, pooled, self.training)  # (B, S*S, C/2)
        v = x if self.value is None else _proj(self.value, self.value_norm, x, self.training)  # (B, Y, X, C)
        rpb = None if self.rpb_small is None else (self.rpb_small, self.rpb_large)
        mixed = contmix(q.view(B, Y, X, G, C // (2 * G)), k.view(B, S * S, G, C // (2 * G)), v, self.proj.weight,
                        self.proj.bias, (self.small_kernel_size, self.kernel_size), rpb, self.border)
        return _proj(self.out, self.out_norm, mixed, self.training)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, context_channels={self.context_channels}, kernels=({self.small_kernel_size}"
                f", {self.kernel_size}), groups={self.groups}, regions={self.regions}, border={self.border!r}")


def _flops(cfg: dict) -> float:
    B, C = cfg["batch"], cfg["channels"]
    Y, X = cfg["input_size"]
    s, k, S = cfg.get("small_kernel_size", 5), cfg.get("kernel_size", 7), cfg.get("regions", 7)
    R, K = S * S, s * s + k * k
    G = cfg.get("groups", 4)
    proj = 2 * C * (C // 2) + 2 * C * C * 2  # query, value and output 1x1 convs
    dyn = 2 * (C // 2) * R + 2 * G * R * K + 5 * G * K + (C // 2) * 2 * (s * s + k * k)
    return float(B * Y * X * (proj + dyn) + B * R * 2 * C * (C // 2))


def _options(c: dict) -> dict:
    return {k: c[k] for k in ("channels", "kernel_size", "small_kernel_size", "groups", "regions", "border")}


register(name="overlock_dynamic", family=Family.VISION,
         paper=Paper("OverLoCK: An Overview-first-Look-Closely-next ConvNet with Context-Mixing Dynamic Kernels",
                     "2502.20087", 2025),
         patterns=("noncausal-self",), complexity="O(Y X (C^2 + C S^2 + G S^2 k^2 + C k^2))", flops=_flops,
         options=_options, reference=naive_contmix_module, functional=contmix,
         default_config={"channels": 64, "kernel_size": 7, "small_kernel_size": 5, "groups": 4, "regions": 7,
                         "border": "clamp"},
         tiny_config={"channels": 8, "kernel_size": 3, "small_kernel_size": 3, "groups": 2, "regions": 2},
         default_input={"batch": 2, "input_size": (14, 14)}, tiny_input={"batch": 2, "input_size": (4, 5)},
         shape=lambda c: (c["batch"], *c["input_size"], c["channels"]), input_kind=InputKind.IMAGE,
         notes="The ContMix token mixer of OverLoCK's blocks (Sec. 3.3) with the authors' code's details: BN "
               "after each 1x1 projection, query scale (C / G)^-1/2 with G = 2 * num_heads of their code (the "
               "query groups are C / (2G) wide), 7 x 7 adaptive-average-pooled region keys, one linear map from "
               "the 49 affinities to all kernel logits, a learned relative position bias, softmax per kernel, the "
               "first channel half mixed by the small kernel (5) and the second by the large one. The rest of the "
               "block (residual depthwise convs, the dilated re-parameterised lepe branch, SE, SiLU gate, GRN MLP, "
               "and in the Focus-Net the concatenation of x with the guidance) is not part of the mechanism. "
               "Layout: channels-last (B, Y, X, C) although the authors' block is CNN-shaped (BatchNorm2d, 1x1 "
               "convs), because the mixing is per-pixel (tokens with their own kernels), the dynamic aggregation "
               "op is channels-last, and 1x1 convs are linear layers there (weights (O, I, 1, 1) -> (O, I)); "
               "BatchNorm statistics are taken over every pixel, as BatchNorm2d. Top-down guidance: "
               "forward(x, context) takes the keys from the context map (any spatial size: it is pooled to 7 x 7); "
               "without it the keys come from x (the plug-and-play ContMixBlock). border='clamp' (default) is "
               "the authors' NATTEN windows (shifted inside the image at the borders, the true offset indexing the "
               "position bias) and refuses maps smaller than kernel_size (the authors upsample such maps "
               "bilinearly and pool back; not reproduced); border='zero' uses centred windows with zero padding "
               "(the dynamic_depthwise_conv op) and accepts any size. value_proj=False mixes x directly (the "
               "Focus-Net's DynamicConvBlock). No peer in timm.")(ContMix)
