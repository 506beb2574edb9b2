"""ECA: Efficient Channel Attention as a CNN block.

"ECA-Net: Efficient Channel Attention for Deep Convolutional Neural Networks", arXiv 1910.03151 (CVPR 2020).
A channel gate ``sigmoid(conv1d(GAP(x)))`` with an adaptive odd kernel size ``k(C)`` and ``k`` parameters.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from attnkit.ops.channel import check_channels_first, eca_attention, eca_kernel_size
from attnkit.reference.naive_channel import naive_eca_module
from attnkit.registry import Family, InputKind, Paper, float_option, int_option, register


class EfficientChannelAttention(nn.Module):
    """ECA on ``(B, C, H, W)`` maps.

    Args:
        channels: ``C``.
        kernel_size: the odd 1-D kernel size; None: ECA's adaptive ``k(C)`` (:func:`eca_kernel_size`).
        gamma, b: the adaptive rule's constants (paper: 2 and 1).
        min_kernel_size: lower bound on the adaptive ``k`` (paper: 1, no bound; timm: 3).
        bias: a bias on the 1-D conv (paper: none).
    """

    def __init__(self, channels: int, kernel_size: int | None = None, gamma: float = 2.0, b: float = 1.0,
                 min_kernel_size: int = 1, bias: bool = False):
        super().__init__()
        self.channels = int_option(self, "channels", channels, 1)
        float_option(self, "gamma", gamma, minimum=0.0, exclusive=True)
        float_option(self, "b", b)
        int_option(self, "min_kernel_size", min_kernel_size, 1)
        if kernel_size is None:
            kernel_size = eca_kernel_size(channels, gamma, b, min_kernel_size)
        k = int_option(self, "kernel_size", kernel_size, 1)
        if k % 2 == 0:
            raise ValueError(f"{type(self).__name__}: kernel_size must be odd (same padding over channels), got {k}")
        self.kernel_size = k
        bound = 1.0 / math.sqrt(k)  # nn.Conv1d's default initialisation (fan_in = k)
        self.weight = nn.Parameter(torch.empty(k).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(1).uniform_(-bound, bound)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, C, H, W)`` -> ``(B, C, H, W)``."""
        check_channels_first(self, x, self.channels)
        return eca_attention(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}, bias={self.bias is not None}"

    @classmethod
    def from_timm(cls, timm_module: nn.Module) -> EfficientChannelAttention:
        """The attnkit module with the options and weights of a ``timm.layers.EcaModule``.

        timm clamps the adaptive kernel to at least 3; the kernel size is read from its conv, so the
        result reproduces it. timm's ``use_mlp`` experiment and gates other than sigmoid are refused.
        """
        conv = getattr(timm_module, "conv", None)
        if not isinstance(conv, nn.Conv1d) or getattr(timm_module, "conv2", None) is not None:
            raise ValueError(f"{cls.__name__}.from_timm: expected an EcaModule without use_mlp, "
                             f"got {type(timm_module).__name__}")
        if type(getattr(timm_module, "gate", None)).__name__ != "Sigmoid":  # nn.Sigmoid or timm's own
            raise ValueError(f"{cls.__name__}.from_timm: only the sigmoid gate is supported, got "
                             f"{type(getattr(timm_module, 'gate', None)).__name__}")
        # timm builds the conv before knowing C when channels=None; 1 channel in, 1 out, so C is free here
        k = conv.kernel_size[0]
        m = cls(channels=getattr(timm_module, "channels", None) or 1, kernel_size=k, bias=conv.bias is not None)
        with torch.no_grad():
            m.weight.copy_(conv.weight.reshape(k))
            if conv.bias is not None:
                m.bias.copy_(conv.bias)
        m.channels = None  # timm's module takes any channel count
        return m.to(conv.weight.dtype)


def _flops(cfg: dict) -> float:
    B, C = cfg["batch"], cfg["channels"]
    Y, X = cfg["input_size"]
    k = cfg.get("kernel_size") or eca_kernel_size(C, cfg.get("gamma", 2.0), cfg.get("b", 1.0),
                                                 cfg.get("min_kernel_size", 1))
    return float(B * (2 * C * Y * X + 2 * C * k + 4 * C))  # pool + scale, the conv, the sigmoid


def _options(c: dict) -> dict:
    return {"channels": c["channels"], "kernel_size": c.get("kernel_size"), "min_kernel_size": c["min_kernel_size"],
            "bias": c["bias"]}


register(name="eca", family=Family.CHANNEL,
         paper=Paper("ECA-Net: Efficient Channel Attention for Deep Convolutional Neural Networks", "1910.03151",
                     2019),
         patterns=("noncausal-self",), complexity="O(C (H W + k))", flops=_flops, options=_options,
         reference=naive_eca_module, functional=eca_attention,
         default_config={"channels": 96, "kernel_size": None, "min_kernel_size": 1, "bias": False},
         tiny_config={"channels": 8, "kernel_size": 3},
         default_input={"batch": 2, "input_size": (14, 14)}, tiny_input={"batch": 2, "input_size": (3, 4)},
         shape=lambda c: (c["batch"], c["channels"], *c["input_size"]), input_kind=InputKind.CNN,
         notes="Adaptive k = nearest odd |log2(C)/gamma + b/gamma| with ties upward (the authors' code), no "
               "lower bound (k = 1 for C <= 4). timm's EcaModule clamps k >= 3 (min_kernel_size=3 here) and "
               "from_timm copies its kernel; timm's use_mlp experiment is not part of the paper and is refused. "
               "The released ECA-ResNet-50 used per-stage kernels (3, 5, 5, 7): pass kernel_size explicitly. "
               "Pooling and gate in float32 for half inputs.")(EfficientChannelAttention)
