"""ELA: Efficient Local Attention as a CNN block (variants T / B / S / L).

"ELA: Efficient Local Attention for Deep Convolutional Neural Networks", arXiv 2403.01123 (2024). Strip-pooled
descriptors along H and W, one shared 1-D conv + GroupNorm + sigmoid, ``out = x * y_h * y_w``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from attnkit.ops.channel import check_channels_first, ela_attention
from attnkit.reference.naive_channel import naive_ela_module
from attnkit.registry import Family, InputKind, Paper, choice_option, float_option, int_option, register

# variant -> (kernel size, channels per conv group (1: depthwise), GroupNorm groups), arXiv 2403.01123 Table 5
VARIANTS = {"T": (5, 1, 32), "B": (7, 1, 16), "S": (5, 8, 16), "L": (7, 8, 16)}
ACTS = ("none", "silu", "relu")


class EfficientLocalAttention(nn.Module):
    """ELA on ``(B, C, H, W)`` maps.

    Args:
        channels: ``C``.
        variant: ``"T"``, ``"B"``, ``"S"`` or ``"L"``: kernel size, conv groups and norm groups of the paper.
        kernel_size, group_channels, norm_groups: override the variant's (``group_channels`` channels per conv
            group: 1 is depthwise, 8 is ELA-S/L); ``norm_groups=0``: no GroupNorm.
        shared: one conv and one norm for both directions (paper); False: separate ones (timm).
        act: ``"none"`` (paper), ``"silu"`` (timm) or ``"relu"``, between the norm and the sigmoid.
        bias: a bias on the conv(s) (paper: none). skip: add ``x`` to the output (timm's ``has_skip``).
    """

    def __init__(self, channels: int, variant: str = "B", kernel_size: int | None = None,
                 group_channels: int | None = None, norm_groups: int | None = None, shared: bool = True,
                 act: str = "none", bias: bool = False, skip: bool = False, eps: float = 1e-5):
        super().__init__()
        C = self.channels = int_option(self, "channels", channels, 1)
        choice_option(self, "variant", variant, tuple(VARIANTS))
        choice_option(self, "act", act, ACTS)
        k0, gc0, ng0 = VARIANTS[variant]
        k = int_option(self, "kernel_size", k0 if kernel_size is None else kernel_size, 1)
        gc = int_option(self, "group_channels", gc0 if group_channels is None else group_channels, 1)
        ng = int_option(self, "norm_groups", ng0 if norm_groups is None else norm_groups, 0)
        self.eps = float_option(self, "eps", eps, minimum=0.0, exclusive=True)
        if k % 2 == 0:
            raise ValueError(f"{type(self).__name__}: kernel_size must be odd (same padding), got {k}")
        if C % gc:
            raise ValueError(f"{type(self).__name__}: group_channels ({gc}) must divide channels ({C})")
        if ng and C % ng:
            raise ValueError(f"{type(self).__name__}: norm_groups ({ng}) must divide channels ({C})")
        self.variant, self.kernel_size, self.group_channels, self.norm_groups = variant, k, gc, ng
        self.shared, self.act, self.skip = bool(shared), act, bool(skip)
        self.groups = C // gc
        bound = 1.0 / math.sqrt(gc * k)  # nn.Conv1d's default initialisation

        def conv_params():
            w = nn.Parameter(torch.empty(C, gc, k).uniform_(-bound, bound))
            return w, (nn.Parameter(torch.empty(C).uniform_(-bound, bound)) if bias else None)

        def norm_params():
            return (nn.Parameter(torch.ones(C)), nn.Parameter(torch.zeros(C))) if ng else (None, None)

        self.weight, self.bias = conv_params()
        self.norm_weight, self.norm_bias = norm_params()
        if not self.shared:
            self.weight_w, self.bias_w = conv_params()
            self.norm_weight_w, self.norm_bias_w = norm_params()

    def op_kwargs(self) -> dict:
        """The keyword arguments of :func:`attnkit.ops.channel.ela_attention` for this module's parameters."""
        sep = not self.shared
        return {"groups": self.groups, "norm_groups": self.norm_groups or None, "norm_weight": self.norm_weight,
                "norm_bias": self.norm_bias, "eps": self.eps, "act": self.act, "skip": self.skip,
                "weight_w": self.weight_w if sep else None, "bias_w": self.bias_w if sep else None,
                "norm_weight_w": self.norm_weight_w if sep else None, "norm_bias_w": self.norm_bias_w if sep else None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, C, H, W)`` -> ``(B, C, H, W)``."""
        check_channels_first(self, x, self.channels)
        return ela_attention(x, self.weight, self.bias, **self.op_kwargs())

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, kernel_size={self.kernel_size}, groups={self.groups}, "
                f"norm_groups={self.norm_groups}, shared={self.shared}, act={self.act!r}, skip={self.skip}")

    @classmethod
    def from_timm(cls, timm_module: nn.Module) -> EfficientLocalAttention:
        """The attnkit module with the options and weights of a ``timm.layers.coord_attn.EfficientLocalAttn``.

        timm's choices: separate H and W convs and norms (``shared=False``), depthwise convs, GroupNorm with one
        group (or none), an activation before the gate, optional skip. Gates other than sigmoid are refused.
        """
        conv_h, conv_w = timm_module.conv_h, timm_module.conv_w
        C, k = conv_h.in_channels, conv_h.kernel_size[0]
        if conv_h.groups != C or type(timm_module.gate).__name__ != "Sigmoid":  # nn.Sigmoid or timm's own
            raise ValueError(f"{cls.__name__}.from_timm: expected depthwise convs and a sigmoid gate")
        acts = {nn.SiLU: "silu", nn.ReLU: "relu", nn.Identity: "none"}
        if type(timm_module.act) not in acts:
            raise ValueError(f"{cls.__name__}.from_timm: unsupported activation {type(timm_module.act).__name__}")
        norm_h = timm_module.norm_h
        has_norm = isinstance(norm_h, nn.GroupNorm)
        m = cls(C, kernel_size=k, group_channels=1, norm_groups=norm_h.num_groups if has_norm else 0, shared=False,
                act=acts[type(timm_module.act)], bias=conv_h.bias is not None, skip=timm_module.has_skip,
                eps=norm_h.eps if has_norm else 1e-5)
        with torch.no_grad():
            m.weight.copy_(conv_h.weight.reshape(C, 1, k))  # (C, 1, k, 1) -> (C, 1, k)
            m.weight_w.copy_(conv_w.weight.reshape(C, 1, k))  # (C, 1, 1, k) -> (C, 1, k)
            if m.bias is not None:
                m.bias.copy_(conv_h.bias)
                m.bias_w.copy_(conv_w.bias)
            if has_norm:
                m.norm_weight.copy_(norm_h.weight)
                m.norm_bias.copy_(norm_h.bias)
                m.norm_weight_w.copy_(timm_module.norm_w.weight)
                m.norm_bias_w.copy_(timm_module.norm_w.bias)
        return m.to(conv_h.weight.dtype)


def _flops(cfg: dict) -> float:
    B, C = cfg["batch"], cfg["channels"]
    Y, X = cfg["input_size"]
    k, gc, _ = VARIANTS[cfg.get("variant", "B")]
    k = cfg.get("kernel_size") or k
    gc = cfg.get("group_channels") or gc
    return float(B * C * (2 * Y * X + 2 * k * gc * (Y + X) + 10 * (Y + X) + 2 * Y * X))  # pools, convs, GN, gates


def _options(c: dict) -> dict:
    return {k: c[k] for k in ("channels", "variant", "kernel_size", "group_channels", "norm_groups", "shared", "act",
                              "bias", "skip") if k in c}


register(name="ela", family=Family.CHANNEL,
         paper=Paper("ELA: Efficient Local Attention for Deep Convolutional Neural Networks", "2403.01123", 2024),
         patterns=("noncausal-self",), complexity="O(C H W + C k (H + W))", flops=_flops, options=_options,
         reference=naive_ela_module, functional=ela_attention,
         default_config={"channels": 96, "variant": "B", "shared": True, "act": "none", "bias": False, "skip": False},
         tiny_config={"channels": 16, "variant": "S", "norm_groups": 4, "bias": True},
         default_input={"batch": 2, "input_size": (14, 14)}, tiny_input={"batch": 2, "input_size": (3, 5)},
         shape=lambda c: (c["batch"], c["channels"], *c["input_size"]), input_kind=InputKind.CNN,
         notes="Paper: one conv and one GroupNorm shared by the H and W strips, no activation before the sigmoid; "
               "variants T (k5, depthwise, GN32), B (k7, depthwise, GN16), S (k5, 8 channels per group, GN16), "
               "L (k7, 8 per group, GN16). timm's EfficientLocalAttn differs: separate convs and norms "
               "(shared=False), GroupNorm with 1 group (norm_groups=1), SiLU before the gate (act='silu'), "
               "kernel 7 depthwise, optional skip; from_timm builds that configuration with timm's weights. "
               "Strips pooled and gates computed in float32 for half inputs.")(EfficientLocalAttention)
