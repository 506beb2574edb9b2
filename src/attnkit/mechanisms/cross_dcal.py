"""Dual Cross-Attention Learning for Fine-Grained Visual Categorization and Object Re-Identification
(arXiv 2205.02151): global-local cross-attention (GLCA, §3.2) and pair-wise cross-attention (PWCA, §3.3).

GLCA lets only the top-R queries by the CLS token's attention rollout attend to every key
(:func:`~attnkit.ops.cross.glca.glca_attention`). PWCA, used in training only, lets the queries of one image
attend to the concatenated keys and values of that image and a distractor image with the same weights;
it is ``ak.attention`` over the concatenation (no new op).
"""

from __future__ import annotations

import torch
from torch import nn

from attnkit.ops.cross.glca import glca_attention
from attnkit.ops.dense.call import attention
from attnkit.reference.naive_cross import glca_scores, naive_glca_module, naive_pwca_module
from attnkit.registry import Family, Paper, check_input, divisible, float_option, register

_PAPER = Paper("Dual Cross-Attention Learning for Fine-Grained Visual Categorization and Object Re-Identification",
               "2205.02151", 2022)


def _glca_flops(cfg: dict) -> float:
    b, n, c = cfg["batch"], cfg["seq_len"], cfg["dim"]
    r = 1 + max(1, round(cfg["ratio"] * (n - 1)))
    return 2 * b * n * 3 * c * c + 2 * b * r * c * c + 2 * b * n * n * c + 4 * b * r * n * c


@register(
    name="dcal_glca", family=Family.CROSS, paper=_PAPER, patterns=("noncausal-self",),
    complexity="O(N^2 d) selection + O(R N d)", flops=_glca_flops,
    options=lambda c: {"dim": c["dim"], "num_heads": c["num_heads"], "ratio": c["ratio"]},
    reference=naive_glca_module, functional=glca_attention,
    default_config={"dim": 64, "num_heads": 4, "ratio": 0.1}, tiny_config={"dim": 8, "num_heads": 2, "ratio": 0.4},
    default_input={"batch": 2, "seq_len": 65}, tiny_input={"batch": 1, "seq_len": 6},
    notes="Token 0 is the CLS token and always among the R = 1 + max(1, round(ratio * (N - 1))) selected queries "
          "(the paper leaves this open). Without rollout= the selection ranks by this layer's one-layer rollout "
          "(0.5 S + 0.5 I, S head-averaged), computed without gradient in fp32 (fp64 for fp64 input); pass "
          "the CLS row of attention_rollout(maps) over the SA layers for the paper's multi-layer rollout. The "
          "output keeps the input's (B, N, C): the R selected rows hold GLCA's outputs, the others are zero. "
          "ratio 0.1 is the paper's FGVC setting (0.3 for Re-ID).",
)
class GlobalLocalCrossAttention(nn.Module):
    """DCAL's GLCA layer.

    Args:
        dim: ``C``; num_heads: ``H``; ratio: the fraction of patch tokens selected (``R - 1``).

    Shapes:
        ``x (B, N, C)`` (CLS first), optional ``rollout (B, N)`` selection scores -> ``(B, N, C)``,
        non-zero on the ``R`` selected rows.

    Example:
        >>> y = GlobalLocalCrossAttention(384, 6, ratio=0.1)(tokens)
    """

    def __init__(self, dim: int, num_heads: int, *, ratio: float = 0.1, qkv_bias: bool = True):
        super().__init__()
        divisible(self, dim, num_heads)
        self.dim, self.num_heads = dim, num_heads
        self.ratio = float_option(self, "ratio", ratio, minimum=0.0, exclusive=True)
        if self.ratio > 1:
            raise ValueError(f"{type(self).__name__}: ratio must be in (0, 1], got {ratio}")
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def num_selected(self, n: int) -> int:
        """``R``: the CLS token and ``max(1, round(ratio * (N - 1)))`` patches (all of them at most)."""
        return min(n, 1 + max(1, round(self.ratio * (n - 1))))

    def forward(self, x: torch.Tensor, rollout: torch.Tensor | None = None) -> torch.Tensor:
        check_input(self, x, "(B, N, C)", channels=self.dim, meta="the selected rows depend on the values")
        b, n, c = x.shape
        q, k, v = (t.reshape(b, n, self.num_heads, -1) for t in self.qkv(x).chunk(3, -1))   # (B, N, H, D)
        with torch.no_grad():
            if rollout is None:
                scores = glca_scores(q, k)
            else:
                if tuple(rollout.shape) != (b, n):
                    raise ValueError(f"{type(self).__name__}: rollout must be (B, N) = {(b, n)}, got "
                                     f"{tuple(rollout.shape)}")
                scores = rollout.detach().clone().to(torch.float64)
                scores[:, 0] = float("inf")
        out, idx = glca_attention(q, k, v, scores, self.num_selected(n))        # (B, R, H, D), (B, R)
        o = self.proj(out.reshape(b, idx.shape[1], c))                           # (B, R, C)
        rows = torch.arange(b, device=x.device)[:, None].expand_as(idx)
        return o.new_zeros(b, n, c).index_put((rows, idx), o)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, ratio={self.ratio}"


def _pwca_flops(cfg: dict) -> float:
    b, n, c = cfg["batch"], cfg["seq_len"], cfg["dim"]
    m = cfg.get("context_len") or n
    return 2 * b * (n + m) * 3 * c * c + 2 * b * n * c * c + 4 * b * n * (n + m) * c


@register(
    name="dcal_pwca", family=Family.CROSS, paper=_PAPER, patterns=("noncausal-self", "noncausal-cross"),
    complexity="O(N (N + M) d)", flops=_pwca_flops,
    options=lambda c: {"dim": c["dim"], "num_heads": c["num_heads"]},
    reference=naive_pwca_module, functional=attention,
    default_config={"dim": 64, "num_heads": 4}, tiny_config={"dim": 8, "num_heads": 2},
    default_input={"batch": 2, "seq_len": 65}, tiny_input={"batch": 2, "seq_len": 6},
    notes="No new op: ak.attention over [K1; K2], [V1; V2] with the layer's own qkv weights (shared with "
          "self-attention, as the paper). The distractor is the context when given, else the batch rolled by one "
          "(a derangement for B > 1; with B = 1 the image is its own pair, which is self-attention exactly). "
          "Gradients flow into the distractor's keys and values. Training-only in the paper.",
)
class PairwiseCrossAttention(nn.Module):
    """DCAL's PWCA layer: queries of ``x`` over ``x``'s and a distractor's keys and values.

    Args:
        dim: ``C``; num_heads: ``H``.

    Shapes:
        ``x (B, N, C)``, optional distractor ``context (B, M, C)`` -> ``(B, N, C)``.

    Example:
        >>> y = PairwiseCrossAttention(384, 6)(tokens, tokens[torch.randperm(len(tokens))])
    """

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = True):
        super().__init__()
        divisible(self, dim, num_heads)
        self.dim, self.num_heads = dim, num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        check_input(self, x, "(B, N, C)", channels=self.dim)
        other = x.roll(1, 0) if context is None else check_input(self, context, "(B, M, C)", channels=self.dim,
                                                                 name="context")
        b, n, c = x.shape
        h = self.num_heads
        q, k, v = (t.reshape(b, n, h, -1) for t in self.qkv(x).chunk(3, -1))               # (B, N, H, D)
        _, k2, v2 = (t.reshape(b, other.shape[1], h, -1) for t in self.qkv(other).chunk(3, -1))   # (B, M, H, D)
        o = attention(q, torch.cat([k, k2], 1), torch.cat([v, v2], 1))                    # (B, N, H, D)
        return self.proj(o.reshape(b, n, c))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}"
