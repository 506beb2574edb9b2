"""MoH: Multi-Head Attention as Mixture-of-Head Attention (arXiv 2410.11842).

Shared heads are always on; routed heads are chosen per token by a top-K router; a
two-stage gate weighs the shared against the routed group, and the per-head outputs are
summed with those weights (a broadcast multiply before the output projection).
"""


from __future__ import annotations

import torch


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

