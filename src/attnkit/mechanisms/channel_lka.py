"""LKA: VAN's large-kernel attention as a CNN block.

"Visual Attention Network", arXiv 2202.09741 (2022). A 21 x 21 depthwise receptive field decomposed into a
5 x 5 depthwise conv, a 7 x 7 depthwise conv of dilation 3 and a 1 x 1 conv, used as a multiplicative gate.
"""

from __future__ import annotations

from torch import nn

from attnkit.ops.channel import check_channels_first, large_kernel_attention
from attnkit.reference.naive_channel import naive_lka_module
from attnkit.registry import Family, InputKind, Paper, int_option, register


class LargeKernelAttention(nn.Module):
    """LKA on ``(B, C, H, W)`` maps: ``x * PW(DW_dilated(DW(x)))`` (parameter names as VAN's code).

    Args:
        channels: ``C``.
        kernel_size: the first depthwise kernel (VAN: 5 = 2d - 1).
        dilated_kernel_size: the dilated depthwise kernel (VAN: 7 = ceil(21 / 3)).
        dilation: its dilation (VAN: 3).
    """

    def __init__(self, channels: int, kernel_size: int = 5, dilated_kernel_size: int = 7, dilation: int = 3):
        super().__init__()
        C = self.channels = int_option(self, "channels", channels, 1)
        k0 = int_option(self, "kernel_size", kernel_size, 1)
        k1 = int_option(self, "dilated_kernel_size", dilated_kernel_size, 1)
        self.dilation = int_option(self, "dilation", dilation, 1)
        for name, k in (("kernel_size", k0), ("dilated_kernel_size", k1)):
            if k % 2 == 0:
                raise ValueError(f"{type(self).__name__}: {name} must be odd (same padding), got {k}")
        self.conv0 = nn.Conv2d(C, C, k0, padding=k0 // 2, groups=C)
        self.conv_spatial = nn.Conv2d(C, C, k1, padding=self.dilation * (k1 - 1) // 2, dilation=self.dilation,
                                      groups=C)
        self.conv1 = nn.Conv2d(C, C, 1)

    def forward(self, x):
        """``x (B, C, H, W)`` -> ``(B, C, H, W)``."""
        check_channels_first(self, x, self.channels)
        return large_kernel_attention(x, self.conv0.weight, self.conv0.bias, self.conv_spatial.weight,
                                      self.conv_spatial.bias, self.conv1.weight, self.conv1.bias, self.dilation)


def _flops(cfg: dict) -> float:
    B, C = cfg["batch"], cfg["channels"]
    Y, X = cfg["input_size"]
    k0, k1 = cfg.get("kernel_size", 5), cfg.get("dilated_kernel_size", 7)
    return float(B * Y * X * (2 * C * (k0 * k0 + k1 * k1) + 2 * C * C + C))


def _options(c: dict) -> dict:
    return {k: c[k] for k in ("channels", "kernel_size", "dilated_kernel_size", "dilation")}


register(name="lka", family=Family.CHANNEL, paper=Paper("Visual Attention Network", "2202.09741", 2022),
         patterns=("noncausal-self",), complexity="O(H W C (k0^2 + k1^2 + C))", flops=_flops, options=_options,
         reference=naive_lka_module, functional=large_kernel_attention,
         default_config={"channels": 64, "kernel_size": 5, "dilated_kernel_size": 7, "dilation": 3},
         tiny_config={"channels": 4, "kernel_size": 3, "dilated_kernel_size": 3, "dilation": 2},
         default_input={"batch": 2, "input_size": (14, 14)}, tiny_input={"batch": 1, "input_size": (5, 6)},
         shape=lambda c: (c["batch"], c["channels"], *c["input_size"]), input_kind=InputKind.CNN,
         notes="The attention module of VAN's block only (the surrounding PW -> GELU -> LKA -> PW and shortcut "
               "belong to the block). Zero 'same' padding for both depthwise convs (dilated padding d (k - 1) / 2), "
               "so any H, W is accepted. No peer in timm.")(LargeKernelAttention)
