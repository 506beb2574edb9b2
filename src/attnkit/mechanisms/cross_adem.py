"""ADEM-VL: Adaptive and Embedded Fusion for Efficient Vision-Language Tuning (arXiv 2410.17779).

Vision features, embedded once into the language width, are fused into the text hidden states by a
cross-attention without projection matrices (§3.2-3.4): ``x + S x_v`` with scores ``phi(x) phi(x_v)^T``
(``phi`` = SiLU), the lowest scores of every text token dropped. The layer has no parameter; the op is
:func:`~attnkit.ops.cross.adem.adem_fusion`.
"""

from __future__ import annotations

import torch
from torch import nn

from attnkit.ops.cross.adem import FEATURE_MAPS, NORMALIZE, adem_fusion
from attnkit.reference.naive_cross import naive_adem_module
from attnkit.registry import Family, Paper, check_input, choice_option, float_option, int_option, register


def _flops(cfg: dict) -> float:
    b, n, c = cfg["batch"], cfg["seq_len"], cfg["dim"]
    m = cfg.get("context_len") or n
    return 4 * b * n * m * c


@register(
    name="adem_vl", family=Family.CROSS,
    paper=Paper("ADEM-VL: Adaptive and Embedded Fusion for Efficient Vision-Language Tuning", "2410.17779", 2024),
    patterns=("noncausal-self", "noncausal-cross"), complexity="O(Nt Nv d)", flops=_flops,
    options=lambda c: {"dim": c["dim"], "drop_ratio": c["drop_ratio"], "feature_map": c["feature_map"],
                       "normalize": c["normalize"]},
    reference=naive_adem_module, functional=adem_fusion,
    default_config={"dim": 64, "drop_ratio": 0.1, "feature_map": "silu", "normalize": "count"},
    tiny_config={"dim": 8, "drop_ratio": 0.3},
    default_input={"batch": 2, "seq_len": 64}, tiny_input={"batch": 1, "seq_len": 6},
    notes="Inferred where the paper is not explicit: normalisation of S (default 'count': divide by the kept "
          "visual tokens; 'softmax' and 'none' as options), drop ratio 0.1, weight 1. The multiscale vision "
          "tokens (pooled grids concatenated) and their embedding are the caller's context; the fused term is "
          "added where the layer is inserted. Without a context the text fuses with itself.",
)
class ADEMFusion(nn.Module):
    """ADEM-VL's parameter-free cross-attention fusion.

    Args:
        dim: ``C`` (checked on the inputs); drop_ratio: ``gamma``; feature_map: ``"silu"``, ``"relu"``,
        ``"identity"``; normalize: ``"count"``, ``"softmax"``, ``"none"``; weight: ``lambda``.

    Shapes:
        ``x (B, Nt, C)``, ``context (B, Nv, C)`` vision features -> ``(B, Nt, C)``.

    Example:
        >>> x = ADEMFusion(4096)(x, vision_tokens)
    """

    def __init__(self, dim: int, *, drop_ratio: float = 0.1, feature_map: str = "silu", normalize: str = "count",
                 weight: float = 1.0):
        super().__init__()
        self.dim = int_option(self, "dim", dim, 1)
        self.drop_ratio = float_option(self, "drop_ratio", drop_ratio, minimum=0.0)
        if self.drop_ratio >= 1:
            raise ValueError(f"{type(self).__name__}: drop_ratio must be in [0, 1), got {drop_ratio}")
        self.feature_map = choice_option(self, "feature_map", feature_map, FEATURE_MAPS)
        self.normalize = choice_option(self, "normalize", normalize, NORMALIZE)
        self.weight = float_option(self, "weight", weight)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        check_input(self, x, "(B, N, C)", channels=self.dim)
        ctx = x if context is None else check_input(self, context, "(B, M, C)", channels=self.dim, name="context")
        return adem_fusion(x, ctx, feature_map=self.feature_map, drop_ratio=self.drop_ratio,
                           normalize=self.normalize, weight=self.weight)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, drop_ratio={self.drop_ratio}, feature_map={self.feature_map}, "
                f"normalize={self.normalize}, weight={self.weight}")
