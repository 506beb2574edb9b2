"""Gaussian Adaptive Attention is All You Need: Robust Contextual Representations Across Multiple
Modalities (arXiv 2401.11143) — GAAM, learnable Gaussian feature re-weighting.

The module: parameters and projections around the op in ``attnkit.ops.dense.gaussian``, whose docstring
describes the algorithm.
"""

from __future__ import annotations

import torch
from torch import nn

from attnkit.ops.dense.gaussian import gaussian_adaptive
from attnkit.reference.naive_sequence5 import naive_gaussian_adaptive_options
from attnkit.registry import Family, Paper, check_input, choice_option, divisible, float_option, int_option, register


def _flops(cfg: dict) -> float:
    return 12.0 * cfg["batch"] * cfg["seq_len"] * cfg["dim"] * cfg["num_gaussians"]


_DEFAULT = {"dim": 64, "num_heads": 4, "num_gaussians": 1}
_TINY = {"dim": 8, "num_heads": 2, "num_gaussians": 2}  # the mixture path


_OPTIONAL = ("axis", "normalize", "unbiased", "combine", "head_split")


def _options(c: dict) -> dict:
    return {"dim": c["dim"], "num_heads": c["num_heads"], "num_gaussians": c["num_gaussians"],
            **{k: c[k] for k in _OPTIONAL if k in c}}


@register(
    name="gaussian_adaptive", family=Family.DENSE,
    paper=Paper("Gaussian Adaptive Attention is All You Need: Robust Contextual Representations Across "
                "Multiple Modalities", "2401.11143", 2024),
    patterns=("noncausal-self",), complexity="O(N C)", flops=_flops, options=_options,
    reference=naive_gaussian_adaptive_options, functional=gaussian_adaptive, default_config=_DEFAULT, tiny_config=_TINY,
    default_input={"batch": 2, "seq_len": 32}, tiny_input={"batch": 1, "seq_len": 6},
    notes="Defaults follow the paper's formula (section 3): statistics along the token axis (non-causal), "
          "population variance with eps inside the sqrt, heads split the features, one Gaussian per head without "
          "normalisation; width parametrised as c (G = exp(-z^2/2c^2), xi = c^2), init c=2, offsets 0. "
          "num_gaussians>1 mixes the Gaussians with softmax weights and (normalize=None) divides G by its sum "
          "along the axis: the form of the authors' first released version (MHGAAM.py, commit c165512, "
          "2024-01-22; it also used the unbiased variance), replaced on 2024-01-30 by the product of Gaussians "
          "that the repository's current GaussianBlock.py keeps. The current released code differs from the "
          "defaults in four choices, each an option here: normalize=True (G divided by its sum along the axis), "
          "unbiased=True (torch.var's n/(n-1)), combine='product' (the Gaussians multiplied) and "
          "head_split='axis' (heads cut the statistics axis itself into consecutive chunks of n//h positions, the "
          "last taking the remainder, each with its own statistics). Not reproduced: its 1/sqrt(2 pi c^2) "
          "density factor (a per-head constant that normalize=True cancels) and the clamp(min=eps) of the "
          "normalising sum.",
)
class GaussianAdaptiveAttention(nn.Module):
    """GAAM block: ``x (B, N, C)`` -> ``x * G(x)`` with per-head learnable Gaussians.

    Args:
        dim: ``C``; num_heads: ``h`` (``C % h == 0`` with ``head_split="features"``); num_gaussians: ``G``.
        axis: statistics axis (1 tokens, -1 features); init_c: initial width; eps: variance epsilon.
        normalize: divide G by its sum along the axis; None (default) = only for a mixture (``G > 1``).
        unbiased: the unbiased variance (released code); combine: ``"mixture"`` (softmax weights) or
        ``"product"`` (released code); head_split: ``"features"`` or ``"axis"`` (released code: heads cut the
        statistics axis into consecutive chunks, which then needs at least ``h`` positions).
        The released code's choices together: ``normalize=True, unbiased=True, combine="product",
        head_split="axis"``.

    Shapes:
        ``x (B, N, C)`` -> ``(B, N, C)``.

    Example:
        >>> y = GaussianAdaptiveAttention(64, 4)(torch.randn(2, 32, 64))
    """

    def __init__(self, dim: int, num_heads: int, *, num_gaussians: int = 1, axis: int = 1, init_c: float = 2.0,
                 eps: float = 1e-8, normalize: bool | None = None, unbiased: bool = False, combine: str = "mixture",
                 head_split: str = "features"):
        super().__init__()
        self.head_split = choice_option(self, "head_split", head_split, ("features", "axis"))
        if head_split == "features":
            divisible(self, dim, num_heads)
        else:
            int_option(self, "dim", dim, 1)
            int_option(self, "num_heads", num_heads, 1)
        int_option(self, "num_gaussians", num_gaussians, 1)
        choice_option(self, "axis", axis, (1, -1, 2))
        float_option(self, "init_c", init_c, minimum=0.0, exclusive=True)
        self.combine = choice_option(self, "combine", combine, ("mixture", "product"))
        choice_option(self, "normalize", normalize, (None, True, False))
        choice_option(self, "unbiased", unbiased, (True, False))
        self.normalize = num_gaussians > 1 if normalize is None else bool(normalize)
        self.unbiased = bool(unbiased)
        self.dim, self.num_heads, self.axis = dim, num_heads, axis
        self.eps = float_option(self, "eps", eps, minimum=0.0)
        self.offsets = nn.Parameter(torch.zeros(num_heads, num_gaussians))
        self.widths = nn.Parameter(torch.full((num_heads, num_gaussians), float(init_c)))
        mixed = num_gaussians > 1 and combine == "mixture"  # a product has no mixture weights
        self.mix_logits = nn.Parameter(torch.zeros(num_heads, num_gaussians)) if mixed else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, "(B, N, C)", channels=self.dim)
        if self.head_split == "axis" and x.shape[1 if self.axis == 1 else 2] < self.num_heads:
            raise ValueError(f"{type(self).__name__}: head_split='axis' needs at least num_heads={self.num_heads} "
                             f"positions along axis {self.axis}, got x of shape {tuple(x.shape)}")
        return gaussian_adaptive(x, self.offsets, self.widths, self.mix_logits, axis=self.axis,
                                 normalize=self.normalize, eps=self.eps, unbiased=self.unbiased,
                                 combine=self.combine, head_split=self.head_split)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.num_heads}, axis={self.axis}, normalize={self.normalize}, "
                f"unbiased={self.unbiased}, combine={self.combine}, head_split={self.head_split}")

