"""Gaussian Adaptive Attention is All You Need: Robust Contextual Representations Across Multiple
Modalities (arXiv 2401.11143) — GAAM, learnable Gaussian feature re-weighting.

The module: parameters and projections around the op in ``attnkit.ops.dense.gaussian``, whose docstring
describes the algorithm.
"""

from __future__ import annotations

import torch
from torch import nn

from attnkit.ops.dense.gaussian import gaussian_adaptive
from attnkit.reference.naive_modules import naive_gaussian_adaptive
from attnkit.registry import Family, Paper, check_input, choice_option, divisible, float_option, int_option, register


def _flops(cfg: dict) -> float:
    return 12.0 * cfg["batch"] * cfg["seq_len"] * cfg["dim"] * cfg["num_gaussians"]


_DEFAULT = {"dim": 64, "num_heads": 4, "num_gaussians": 1}
_TINY = {"dim": 8, "num_heads": 2, "num_gaussians": 2}  # the mixture path


def _options(c: dict) -> dict:
    return {"dim": c["dim"], "num_heads": c["num_heads"], "num_gaussians": c["num_gaussians"]}


@register(
    name="gaussian_adaptive", family=Family.DENSE,
    paper=Paper("Gaussian Adaptive Attention is All You Need: Robust Contextual Representations Across "
                "Multiple Modalities", "2401.11143", 2024),
    patterns=("noncausal-self",), complexity="O(N C)", flops=_flops, options=_options,
    reference=naive_gaussian_adaptive, functional=gaussian_adaptive, default_config=_DEFAULT, tiny_config=_TINY,
    default_input={"batch": 2, "seq_len": 32}, tiny_input={"batch": 1, "seq_len": 6},
    notes="Statistics along the token axis by default (non-causal); population variance with eps inside "
          "the sqrt; width parametrised as c (G = exp(-z^2/2c^2), xi = c^2), init c=2, offsets 0. "
          "num_gaussians>1 mixes the Gaussians with softmax weights and divides G by its sum along the axis "
          "(attnkit's form). Attribution: the paper's formula (section 3) is one Gaussian, population variance, "
          "no normalisation; the authors' released code normalises G along the axis, uses the unbiased variance, "
          "splits heads over the statistics axis and multiplies the Gaussians, and has no softmax-weighted "
          "mixture. The op offers unbiased= and combine='product'; the head split over the statistics axis is "
          "not offered yet.",
)
class GaussianAdaptiveAttention(nn.Module):
    """GAAM block: ``x (B, N, C)`` -> ``x * G(x)`` with per-head learnable Gaussians.

    Args:
        dim: ``C``; num_heads: ``h`` (``C % h == 0``); num_gaussians: mixture size ``G``.
        axis: statistics axis (1 tokens, -1 features); init_c: initial width; eps: variance epsilon.

    Example:
        >>> y = GaussianAdaptiveAttention(64, 4)(torch.randn(2, 32, 64))
    """

    def __init__(self, dim: int, num_heads: int, *, num_gaussians: int = 1, axis: int = 1, init_c: float = 2.0,
                 eps: float = 1e-8):
        super().__init__()
        divisible(self, dim, num_heads)
        int_option(self, "num_gaussians", num_gaussians, 1)
        choice_option(self, "axis", axis, (1, -1, 2))
        float_option(self, "init_c", init_c, minimum=0.0, exclusive=True)
        self.dim, self.axis, self.eps = dim, axis, float_option(self, "eps", eps, minimum=0.0)
        self.offsets = nn.Parameter(torch.zeros(num_heads, num_gaussians))
        self.widths = nn.Parameter(torch.full((num_heads, num_gaussians), float(init_c)))
        self.mix_logits = nn.Parameter(torch.zeros(num_heads, num_gaussians)) if num_gaussians > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, "(B, N, C)", channels=self.dim)
        return gaussian_adaptive(x, self.offsets, self.widths, self.mix_logits, axis=self.axis,
                                 normalize=self.mix_logits is not None, eps=self.eps)

