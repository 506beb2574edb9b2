"""RCMHA: Relative Convolutional Multi-Head Attention for Natural Language Modelling (arXiv 2308.03429).

Projected q, k, v each pass a causal depthwise 1-D convolution along the sequence (Primer's
MDHA), and the scores get learned relative-position terms (Transformer-XL style, labml's
learned variant): ``[(q_t + u)·k_s + q_t·R[t-s] + b[t-s]] / sqrt(D)``.
"""


from __future__ import annotations

import torch

from attnkit._validate import check_qkv, resolve_scale
from attnkit.kernels.gather import attend_gathered, compute_dtype


def relative_position_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, u: torch.Tensor,
                                rel_k: torch.Tensor, rel_b: torch.Tensor, *, causal: bool = True,
                                scale: float | None = None) -> torch.Tensor:
    """Attention with a content bias and learned relative key/scalar terms.

    Args:
        q: ``(B, Nq, H, D)``; k: ``(B, Nk, H, D)``; v: ``(B, Nk, H, Dv)``.
        u: ``(H, D)`` global content bias.
        rel_k: ``(2P, H, D)`` relative key embeddings, index ``t - s + P`` for offset ``t - s``.
        rel_b: ``(2P, H)`` relative scalar biases, same indexing.
        causal: keys ``s <= t`` only.

    Returns:
        ``(B, Nq, H, Dv)``.

    Example:
        >>> q = k = v = torch.randn(1, 16, 2, 8)
        >>> out = relative_position_attention(q, k, v, torch.zeros(2, 8), torch.zeros(64, 2, 8), torch.zeros(64, 2))
    """
    check_qkv(q, k, v)
    B, Nq, H, D = q.shape
    Nk = k.shape[1]
    P = rel_k.shape[0] // 2
    if max(Nq, Nk) > P:
        raise ValueError(f"sequence length {max(Nq, Nk)} exceeds the relative range P = {P} (rel_k has 2P rows)")
    scale = resolve_scale(scale, D)
    cdt = compute_dtype(q.dtype)
    qh = q.to(cdt).transpose(1, 2)  # (B, H, Nq, D)
    # q·R[delta] only for the offsets that occur: delta in [-(Nk-1), Nq-1]
    lo = P - (Nk - 1)
    rk = rel_k[lo:P + Nq].to(cdt)  # (Nq+Nk-1, H, D)
    qr = torch.einsum("bhqd,rhd->bhqr", qh, rk) + rel_b[lo:P + Nq].to(cdt).t().unsqueeze(1)  # (B, H, Nq, R)
    rel = torch.arange(Nq, device=q.device)[:, None] - torch.arange(Nk, device=q.device) + (Nk - 1)  # (Nq, Nk)
    bias = torch.gather(qr, -1, rel.expand(B, H, Nq, Nk)) * scale  # (B, H, Nq, Nk)
    allowed = (rel >= Nk - 1) if causal else None
    out, _ = attend_gathered(qh + u.to(cdt).view(1, H, 1, D), k.to(cdt).transpose(1, 2), v.to(cdt).transpose(1, 2),
                             allowed, scale, bias=bias)  # (B, H, Nq, Dv)
    return out.transpose(1, 2).to(q.dtype)

