"""MoH: Multi-Head Attention as Mixture-of-Head Attention (arXiv 2410.11842).

The module: parameters and projections around the op in ``attnkit.ops.per_head.moh``, whose docstring
describes the algorithm.
"""
from __future__ import annotations

import torch
from torch import nn

from attnkit.masks import causal as causal_mask
from attnkit.ops.dense.call import attention
from attnkit.ops.per_head.moh import moh_gates
from attnkit.reference.naive_modules import naive_moh
from attnkit.registry import Family, Paper, check_input, divisible, int_option, register


def _flops(cfg: dict) -> float:
    b, n, c, h = cfg["batch"], cfg["seq_len"], cfg["dim"], cfg["num_heads"]
    return 2 * b * n * c * 4 * c + 4 * b * h * n * n * (c // h) + 2 * b * n * c * (h + 2)


_DEFAULT = {"dim": 64, "num_heads": 8, "shared_heads": 2, "topk": 4, "causal": True}
_TINY = {"dim": 8, "num_heads": 4, "shared_heads": 1, "topk": 2}


def _options(c: dict) -> dict:
    return {"dim": c["dim"], "num_heads": c["num_heads"], "shared_heads": c["shared_heads"], "topk": c["topk"],
            "causal": c["causal"]}


@register(
    name="moh", family=Family.HEAD,
    paper=Paper("MoH: Multi-Head Attention as Mixture-of-Head Attention", "2410.11842", 2024),
    patterns=("noncausal-self", "causal-self"), complexity="O(N^2 d (h_s + K))", flops=_flops,
    options=_options, reference=naive_moh, functional=(attention, moh_gates),
    default_config=_DEFAULT, tiny_config=_TINY, default_input={"batch": 2, "seq_len": 32},
    tiny_input={"batch": 1, "seq_len": 6},
    notes="Released-code gate rescaling (active heads weigh 1 under uniform routing); when one group is "
          "empty the group gate is dropped (weight 1). Every head is computed and unselected ones are "
          "zero-gated: the FLOP count is MHA's (per-token head gathering is not implemented). "
          "aux_loss = sum_j f_j P_j (paper's L_b; the reference multiplies by h_r); weight it by beta=0.01.",
)
class MoHAttention(nn.Module):
    """Mixture-of-Head attention over sequences.

    Args:
        dim: model width ``C``; num_heads: ``H`` (head dim ``C // H``).
        shared_heads: always-on heads ``h_s`` (the first ``h_s``); the other ``H - h_s`` are routed.
        topk: routed heads active per token ``K``.
        causal: causal self-attention.

    Shapes:
        ``x (B, N, C)`` -> ``(B, N, C)``; after a forward, ``self.aux_loss`` holds the balance loss.

    Example:
        >>> m = MoHAttention(64, 8, shared_heads=2, topk=4)
        >>> y = m(torch.randn(2, 32, 64)); loss = y.pow(2).mean() + 0.01 * m.aux_loss
    """

    def __init__(self, dim: int, num_heads: int, *, shared_heads: int = 0, topk: int | None = None,
                 causal: bool = False, bias: bool = False):
        super().__init__()
        who = type(self).__name__
        divisible(self, dim, num_heads)
        if not 0 <= int_option(self, "shared_heads", shared_heads, 0) <= num_heads:
            raise ValueError(f"{who}: shared_heads must be in [0, num_heads={num_heads}], got {shared_heads}")
        h_r = num_heads - shared_heads
        topk = h_r if topk is None else int_option(self, "topk", topk, 0)
        if h_r and not 1 <= topk <= h_r:
            raise ValueError(f"{who}: topk must be in [1, routed heads = {h_r}], got {topk}")
        self.dim = dim
        self.num_heads, self.head_dim, self.shared_heads, self.topk, self.causal = (
            num_heads, dim // num_heads, shared_heads, topk, causal)
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)
        self.w_h = nn.Parameter(torch.zeros(dim, 2)) if shared_heads and h_r else None
        self.w_s = nn.Parameter(torch.randn(dim, shared_heads) * dim ** -0.5) if shared_heads else None
        self.w_r = nn.Parameter(torch.randn(dim, h_r) * dim ** -0.5) if h_r else None
        self.aux_loss = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, "(B, N, C)", channels=self.dim)
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).unbind(2)  # (B, N, H, D)
        o = attention(q, k, v, mask=causal_mask() if self.causal else None)  # (B, N, H, D)
        gates, self.aux_loss = moh_gates(x, self.w_h, self.w_s, self.w_r, self.topk)  # (B, N, H)
        return self.proj((o * gates.unsqueeze(-1)).reshape(b, n, -1))

    def __getstate__(self) -> dict:
        # aux_loss holds the last forward's graph, which deepcopy and pickle cannot copy: keep its value only
        state = dict(super().__getstate__())
        state["aux_loss"] = state["aux_loss"].detach()
        return state

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, shared={self.shared_heads}, topk={self.topk}, causal={self.causal}"

