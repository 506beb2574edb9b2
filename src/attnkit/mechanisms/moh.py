"""MoH: Multi-Head Attention as Mixture-of-Head Attention (arXiv 2410.11842).

Shared heads are always on; routed heads are chosen per token by a top-K router; a
two-stage gate weighs the shared against the routed group, and the per-head outputs are
summed with those weights (a broadcast multiply before the output projection).
"""

from __future__ import annotations

import torch
from torch import nn

from attnkit.masks import causal as causal_mask
from attnkit.ops.dense import attention
from attnkit.registry import Paper, register


def moh_gates(x: torch.Tensor, w_h: torch.Tensor | None, w_s: torch.Tensor | None, w_r: torch.Tensor | None,
              topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token head gates and the load-balance loss of MoH.

    Args:
        x: ``(B, N, C)`` tokens.
        w_h: ``(C, 2)`` shared-vs-routed gate, or None when one group is empty (its weight is 1).
        w_s: ``(C, h_s)`` shared-head router or None (``h_s = 0``).
        w_r: ``(C, h_r)`` routed-head router or None (``h_r = 0``).
        topk: active routed heads per token ``K`` (``1 <= K <= h_r``).

    Returns:
        ``(gates (B, N, h_s + h_r), balance_loss ())``, gates ordered shared heads first.
        The released code's rescaling is used: shared gates times ``h_s``, routed gates
        renormalised over the selected ``K`` and times ``K``, the group gate times 2, so
        uniform routing gives every active head weight 1 (the MHA identity is exact).
        ``balance_loss = sum_j f_j P_j`` over routed heads (the paper's ``L_b``).

    Example:
        >>> g, lb = moh_gates(torch.randn(2, 16, 32), torch.randn(32, 2), torch.randn(32, 2), torch.randn(32, 6), 2)
    """
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # router in fp32
    parts, loss = [], xf.new_zeros(())
    both = w_s is not None and w_r is not None
    alpha = torch.softmax(xf @ w_h.to(xf.dtype), dim=-1) * 2 if both else None  # (B, N, 2)
    if w_s is not None:
        h_s = w_s.shape[1]
        g = torch.softmax(xf @ w_s.to(xf.dtype), dim=-1) * h_s  # (B, N, h_s)
        parts.append(g * alpha[..., :1] if both else g)
    if w_r is not None:
        h_r = w_r.shape[1]
        if not 1 <= topk <= h_r:
            raise ValueError(f"topk must be in [1, routed heads = {h_r}], got {topk}")
        p = torch.softmax(xf @ w_r.to(xf.dtype), dim=-1)  # (B, N, h_r)
        top = torch.topk(p, topk, dim=-1, sorted=False).indices
        sel = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, top, True)
        ps = p * sel
        g = ps / ps.sum(-1, keepdim=True) * topk
        parts.append(g * alpha[..., 1:] if both else g)
        f = sel.to(p.dtype).flatten(0, -2).mean(0)  # (h_r,) fraction of tokens routed to each head
        loss = (f * p.flatten(0, -2).mean(0)).sum()
    return torch.cat(parts, dim=-1).to(x.dtype), loss.to(x.dtype)


def _flops(cfg: dict) -> float:
    b, n, c, h = cfg["batch"], cfg["seq_len"], cfg["dim"], cfg["num_heads"]
    return 2 * b * n * c * 4 * c + 4 * b * h * n * n * (c // h) + 2 * b * n * c * (h + 2)


_DEFAULT = {"batch": 2, "seq_len": 32, "dim": 64, "num_heads": 8, "shared_heads": 2, "topk": 4, "causal": True}


def _example(config: dict | None = None):
    c = {**_DEFAULT, **(config or {})}
    m = MoHAttention(c["dim"], c["num_heads"], shared_heads=c["shared_heads"], topk=c["topk"], causal=c["causal"])
    return m, (torch.randn(c["batch"], c["seq_len"], c["dim"]),)


@register(
    name="moh", family="sparse",
    paper=Paper("MoH: Multi-Head Attention as Mixture-of-Head Attention", "2410.11842", 2024),
    patterns=("noncausal-self", "causal-self"), complexity="O(N^2 d (h_s + K))", flops=_flops,
    example=_example, default_config=_DEFAULT,
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
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if not 0 <= shared_heads <= num_heads:
            raise ValueError(f"shared_heads must be in [0, num_heads={num_heads}], got {shared_heads}")
        h_r = num_heads - shared_heads
        topk = h_r if topk is None else topk
        if h_r and not 1 <= topk <= h_r:
            raise ValueError(f"topk must be in [1, routed heads = {h_r}], got {topk}")
        self.num_heads, self.head_dim, self.shared_heads, self.topk, self.causal = (
            num_heads, dim // num_heads, shared_heads, topk, causal)
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)
        self.w_h = nn.Parameter(torch.zeros(dim, 2)) if shared_heads and h_r else None
        self.w_s = nn.Parameter(torch.randn(dim, shared_heads) * dim ** -0.5) if shared_heads else None
        self.w_r = nn.Parameter(torch.randn(dim, h_r) * dim ** -0.5) if h_r else None
        self.aux_loss = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"x must be (B, N, C), got shape {tuple(x.shape)}")
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).unbind(2)  # (B, N, H, D)
        o = attention(q, k, v, mask=causal_mask() if self.causal else None)  # (B, N, H, D)
        gates, self.aux_loss = moh_gates(x, self.w_h, self.w_s, self.w_r, self.topk)  # (B, N, H)
        return self.proj((o * gates.unsqueeze(-1)).reshape(b, n, -1))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, shared={self.shared_heads}, topk={self.topk}, causal={self.causal}"
