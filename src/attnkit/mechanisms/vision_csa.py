"""CSA: class-semantics-based channel and temporal attention for action detection.

"Class Semantics-based Attention for Action Detection", arXiv 2109.02613 (ICCV 2021). The op is
``attnkit.ops.vision.csa.class_semantic_attention``.
"""

from __future__ import annotations

import torch
from torch import nn

from attnkit.ops.vision.csa import FUSES, class_semantic_attention
from attnkit.reference.naive_vision_c import naive_csa_module
from attnkit.registry import Family, InputKind, Paper, check_input, choice_option, int_option, register


def _flops(c: dict) -> float:
    b, t, d = c["batch"], c["seq_len"], c["dim"]
    cr = c.get("semantic_dim") or d
    hidden = max(1, cr // c["reduction"])
    fusion = 4 * d * d if c["fuse"] == "concat" else d
    return float(b * t * (cr + 2 * c["kernel_size"] * cr + 2 * d + fusion) + 2 * b * hidden * (cr + d))


@register(
    name="class_semantic", family=Family.VISION,
    paper=Paper("Class Semantics-based Attention for Action Detection", "2109.02613", 2021),
    patterns=("noncausal-self",), complexity="O(B T C (C + k))", flops=_flops,
    options=lambda c: {"dim": c["dim"], "semantic_dim": c.get("semantic_dim"), "reduction": c["reduction"],
                       "kernel_size": c["kernel_size"], "fuse": c["fuse"]},
    reference=naive_csa_module, functional=class_semantic_attention, input_kind=InputKind.SEQUENCE,
    default_config={"dim": 256, "semantic_dim": None, "reduction": 4, "kernel_size": 3, "fuse": "concat"},
    default_input={"batch": 16, "seq_len": 100},
    tiny_config={"dim": 6, "reduction": 2}, tiny_input={"batch": 2, "seq_len": 7},
    notes="Temporal sequences channels-last (B, T, C) (BMN's features are (B, C, T): transpose). The gates come "
          "from the class-semantic features r (forward(x, r); r defaults to x, the self-attention case the "
          "registry tests) and are applied to x: channel gate sigmoid(MLP(mean_T r)) with hidden C_r / "
          "reduction (4), local temporal gate sigmoid(conv1d_k(r)) with k = 3 and zero padding, fusion by a "
          "1x1 conv over the concatenation (fuse='concat') or a sum (fuse='sum'). The paper's text says "
          "channel and local-temporal attention from R applied to F and fused; the MLP width, k, the padding "
          "and the fusion form could not be read from the paper here and are this library's choices.",
)
class ClassSemanticAttention(nn.Module):
    """CSA on a temporal feature sequence ``x (B, T, C)`` with gates from ``r (B, T, C_r)`` (default ``x``).

    Args:
        dim: ``C`` of the encoded features. semantic_dim: ``C_r`` of the class-semantic features (None: ``C``).
        reduction: the channel MLP's squeeze ratio. kernel_size: the temporal gate's odd kernel (3).
        fuse: ``"concat"`` (1x1 conv over both attended copies) or ``"sum"``.
    """

    def __init__(self, dim: int, semantic_dim: int | None = None, reduction: int = 4, kernel_size: int = 3,
                 fuse: str = "concat"):
        super().__init__()
        self.dim = int_option(self, "dim", dim, 1)
        self.semantic_dim = dim if semantic_dim is None else int_option(self, "semantic_dim", semantic_dim, 1)
        self.reduction = int_option(self, "reduction", reduction, 1)
        self.kernel_size = int_option(self, "kernel_size", kernel_size, 1)
        if kernel_size % 2 == 0:
            raise ValueError(f"{type(self).__name__}: kernel_size must be odd (centred window), got {kernel_size}")
        self.fuse = choice_option(self, "fuse", fuse, FUSES)
        hidden = max(1, self.semantic_dim // self.reduction)
        self.channel_fc1 = nn.Linear(self.semantic_dim, hidden)
        self.channel_fc2 = nn.Linear(hidden, dim)
        self.temporal_conv = nn.Conv1d(self.semantic_dim, 1, kernel_size)
        self.fusion = nn.Linear(2 * dim, dim) if fuse == "concat" else None

    def forward(self, x: torch.Tensor, r: torch.Tensor | None = None) -> torch.Tensor:
        """``x (B, T, C)``, ``r (B, T, C_r)`` (default ``x``) -> ``(B, T, C)``."""
        check_input(self, x, "(B, T, C)", channels=self.dim)
        if r is None:
            if self.semantic_dim != self.dim:
                raise ValueError(f"{type(self).__name__}: r (B, T, C_r={self.semantic_dim}) is required when "
                                 f"semantic_dim differs from dim ({self.dim})")
            r = x
        else:
            check_input(self, r, "(B, T, C)", channels=self.semantic_dim, name="r")
            if r.shape[:2] != x.shape[:2]:
                raise ValueError(f"{type(self).__name__}: r must share x's (B, T) = {tuple(x.shape[:2])}, got "
                                 f"shape {tuple(r.shape)}")
        fusion = self.fusion
        return class_semantic_attention(
            x, r, self.channel_fc1.weight, self.channel_fc1.bias, self.channel_fc2.weight, self.channel_fc2.bias,
            self.temporal_conv.weight, self.temporal_conv.bias, None if fusion is None else fusion.weight,
            None if fusion is None else fusion.bias, self.fuse)
