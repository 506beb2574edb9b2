"""Focal modulation (FocalNets) as a channels-last token mixer.

"Focal Modulation Networks", arXiv 2203.11926 (NeurIPS 2022), §3.2.

``[q, z_0, gates] = f(x)``; ``L`` hierarchical depthwise levels plus a global level gated per pixel;
``y = proj(post_norm(q * h(sum_l gates_l z_l)))``. :meth:`FocalModulation.from_timm` copies timm's
``focalnet.FocalModulation`` (1x1 convolutions on ``(B, C, Y, X)``) into the linear layers here.
"""

from __future__ import annotations

import torch
from torch import nn

from attnkit.ops.vision.common import channels_last_hint
from attnkit.ops.vision.focal import focal_modulation
from attnkit.reference.naive_vision import naive_focal_modulation_module
from attnkit.registry import Family, InputKind, Paper, check_input, int_option, register


def _flops(cfg: dict) -> float:
    y, x = cfg["input_size"]
    n, c, L = cfg.get("batch", 1) * y * x, cfg["dim"], cfg["focal_level"]
    ks = [cfg["focal_window"] + cfg["focal_factor"] * i for i in range(L)]
    return float(2 * n * c * (2 * c + L + 1) + 4 * n * c * c + 2 * n * c * sum(k * k for k in ks) + 4 * n * c * L)


def _options(cfg: dict) -> dict:
    return {k: cfg[k] for k in ("dim", "focal_level", "focal_window", "focal_factor", "normalize_modulator",
                                "post_norm")}


@register(
    name="focal_modulation", family=Family.VISION,
    paper=Paper("Focal Modulation Networks", "2203.11926", 2022),
    patterns=("noncausal-self",), complexity="O(N C (C + sum_l k_l^2))", flops=_flops, options=_options,
    reference=naive_focal_modulation_module, functional=focal_modulation,
    default_config={"dim": 96, "focal_level": 2, "focal_window": 3, "focal_factor": 2, "normalize_modulator": False,
                    "post_norm": False},
    tiny_config={"dim": 4}, default_input={"batch": 1, "input_size": (56, 56)},
    tiny_input={"batch": 1, "input_size": (5, 6)}, input_kind=InputKind.IMAGE,
    notes="As the paper and its code (and timm's focalnet.FocalModulation): gates are raw linear outputs, levels "
          "are hierarchical (z_l from z_{l-1}), the global level pools the last level, depthwise convs have no "
          "bias, kernel k_l = focal_window + focal_factor * l. Channels-last: f, h and proj are Linear layers "
          "(timm's 1x1 convs); post_norm is LayerNorm(C) (timm's LayerNorm2d; from_timm copies its eps). "
          "FocalNet-T/S/B SRF: focal_level 2, LRF: 3.",
)
class FocalModulation(nn.Module):
    """FocalNets' focal modulation on ``x (B, Y, X, C)`` -> ``(B, Y, X, C)``.

    Args:
        dim: ``C``.
        focal_level: ``L`` depthwise levels (2 or 3 in FocalNet).
        focal_window: first kernel size (odd); focal_factor: kernel growth per level (even keeps it odd).
        normalize_modulator: divide the gated sum by ``L + 1``.
        post_norm: LayerNorm on ``q * h(Z)`` before ``proj`` (the largest FocalNets).
        bias: bias on ``f`` and ``h`` (``proj`` always has one).
        norm_eps: the post-norm's epsilon.

    Example:
        >>> m = FocalModulation(96, focal_level=2)
        >>> y = m(torch.randn(2, 56, 56, 96))
    """

    def __init__(self, dim: int, focal_level: int = 2, focal_window: int = 3, focal_factor: int = 2,
                 normalize_modulator: bool = False, post_norm: bool = False, bias: bool = True,
                 norm_eps: float = 1e-5):
        super().__init__()
        self.dim = int_option(self, "dim", dim, 1)
        self.focal_level = int_option(self, "focal_level", focal_level, 1)
        self.focal_window = int_option(self, "focal_window", focal_window, 1)
        self.focal_factor = int_option(self, "focal_factor", focal_factor, 0)
        self.kernel_sizes = [focal_window + focal_factor * i for i in range(focal_level)]
        if any(k % 2 == 0 for k in self.kernel_sizes):
            raise ValueError(f"{type(self).__name__}: focal_window must be odd and focal_factor even (kernels "
                             f"{self.kernel_sizes} must be odd, centred on each pixel)")
        self.normalize_modulator = bool(normalize_modulator)
        self.f = nn.Linear(dim, 2 * dim + focal_level + 1, bias=bias)
        self.h = nn.Linear(dim, dim, bias=bias)
        self.proj = nn.Linear(dim, dim)
        self.focal_layers = nn.ModuleList(
            nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim, bias=False) for k in self.kernel_sizes)
        self.norm = nn.LayerNorm(dim, eps=norm_eps) if post_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels_last_hint(type(self).__name__, x, self.dim)
        check_input(self, x, "(B, Y, X, C)", channels=self.dim)
        C = self.dim
        q, ctx, gates = self.f(x).split([C, C, self.focal_level + 1], dim=-1)  # (B, Y, X, C), (.., C), (.., L+1)
        y = focal_modulation(q, ctx, gates, [c.weight for c in self.focal_layers], self.h.weight, self.h.bias,
                             normalize=self.normalize_modulator)
        if self.norm is not None:
            y = self.norm(y)
        return self.proj(y)

    @classmethod
    def from_timm(cls, module) -> FocalModulation:
        """The same mixer from timm's ``focalnet.FocalModulation``:
        ``m(x) == module(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)``."""
        who = f"{cls.__name__}.from_timm"
        if type(module).__name__ != "FocalModulation" or not hasattr(module, "focal_layers"):
            raise TypeError(f"{who}: expected timm.models.focalnet.FocalModulation, got {type(module).__name__}")
        post = not isinstance(module.norm, nn.Identity)
        if post and not hasattr(module.norm, "eps"):
            raise ValueError(f"{who}: unsupported post-norm {type(module.norm).__name__}")
        m = cls(module.dim, module.focal_level, module.focal_window, module.focal_factor,
                module.normalize_modulator, post, bias=module.f.bias is not None,
                norm_eps=module.norm.eps if post else 1e-5)
        w = module.f.weight
        m = m.to(w.device, w.dtype)
        with torch.no_grad():
            for mine, theirs in ((m.f, module.f), (m.h, module.h), (m.proj, module.proj)):
                mine.weight.copy_(theirs.weight[:, :, 0, 0])  # 1x1 conv (O, I, 1, 1) -> Linear (O, I)
                if mine.bias is not None:
                    mine.bias.copy_(theirs.bias)
            for mine, theirs in zip(m.focal_layers, module.focal_layers):
                mine.weight.copy_(theirs[0].weight)
            if post:
                m.norm.weight.copy_(module.norm.weight)
                m.norm.bias.copy_(module.norm.bias)
        return m

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kernels={self.kernel_sizes}, normalize_modulator={self.normalize_modulator}"
