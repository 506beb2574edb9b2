"""RCMHA: Relative Convolutional Multi-Head Attention for Natural Language Modelling (arXiv 2308.03429).

Projected q, k, v each pass a causal depthwise 1-D convolution along the sequence (Primer's
MDHA), and the scores get learned relative-position terms (Transformer-XL style, labml's
learned variant): ``[(q_t + u)·k_s + q_t·R[t-s] + b[t-s]] / sqrt(D)``.
"""


from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from attnkit._validate import check_qkv, resolve_scale
from attnkit.kernels.gather import attend_gathered, compute_dtype
from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.reference.naive_dense import naive_relative_attention


@dataclass(frozen=True, eq=False)
class RelativeCall:
    """A validated ``relative_position_attention`` call."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    u: torch.Tensor
    rel_k: torch.Tensor
    rel_b: torch.Tensor
    causal: bool
    scale: float

    def describe(self) -> str:
        return (f"q {tuple(self.q.shape)} k {tuple(self.k.shape)} v {tuple(self.v.shape)} {self.q.dtype}, "
                f"{'causal' if self.causal else 'non-causal'}, P = {self.rel_k.shape[0] // 2}, scale {self.scale:.4g}")


def make_call(q, k, v, u, rel_k, rel_b, *, causal=True, scale=None) -> RelativeCall:
    hq, hkv = check_qkv(q, k, v)
    if hq != hkv:
        raise ValueError(f"relative_position_attention needs as many K/V heads as query heads, got {hq} and {hkv}")
    _, Nq, H, D = q.shape
    Nk = k.shape[1]
    P = rel_k.shape[0] // 2
    R = rel_k.shape[0]
    if tuple(u.shape) != (H, D) or tuple(rel_k.shape) != (R, H, D) or tuple(rel_b.shape) != (R, H):
        raise ValueError(f"u, rel_k, rel_b must have shapes (H, D), (2P, H, D), (2P, H) with (H, D) = ({H}, {D}); "
                         f"got {tuple(u.shape)}, {tuple(rel_k.shape)}, {tuple(rel_b.shape)}")
    if max(Nq, Nk) > P:
        raise ValueError(f"sequence length {max(Nq, Nk)} exceeds the relative range P = {P} (rel_k has 2P rows)")
    return RelativeCall(q, k, v, u, rel_k, rel_b, bool(causal), resolve_scale(scale, D))


def _dense(c: RelativeCall) -> torch.Tensor:
    q, k, v, u, rel_k, rel_b, scale = c.q, c.k, c.v, c.u, c.rel_k, c.rel_b, c.scale
    B, Nq, H, D = q.shape
    Nk = k.shape[1]
    P = rel_k.shape[0] // 2
    cdt = compute_dtype(q.dtype)
    qh = q.to(cdt).transpose(1, 2)  # (B, H, Nq, D)
    # q·R[delta] only for the offsets that occur: delta in [-(Nk-1), Nq-1]
    lo = P - (Nk - 1)
    rk = rel_k[lo:P + Nq].to(cdt)  # (Nq+Nk-1, H, D)
    qr = torch.einsum("bhqd,rhd->bhqr", qh, rk) + rel_b[lo:P + Nq].to(cdt).t().unsqueeze(1)  # (B, H, Nq, R)
    rel = torch.arange(Nq, device=q.device)[:, None] - torch.arange(Nk, device=q.device) + (Nk - 1)  # (Nq, Nk)
    bias = torch.gather(qr, -1, rel.expand(B, H, Nq, Nk)) * scale  # (B, H, Nq, Nk)
    allowed = (rel >= Nk - 1) if c.causal else None
    out, _ = attend_gathered(qh + u.to(cdt).view(1, H, 1, D), k.to(cdt).transpose(1, 2), v.to(cdt).transpose(1, 2),
                             allowed, scale, bias=bias)  # (B, H, Nq, Dv)
    return out.transpose(1, 2).to(q.dtype)


def _reference(c: RelativeCall) -> torch.Tensor:
    # the naive twin divides by sqrt(D); another scale s enters linearly through k, R and b (times s sqrt(D))
    f = c.scale * math.sqrt(c.q.shape[-1])
    k, rel_k, rel_b = (c.k, c.rel_k, c.rel_b) if f == 1.0 else (c.k * f, c.rel_k * f, c.rel_b * f)
    return naive_relative_attention(c.q, k, c.v, c.u, rel_k, rel_b, causal=c.causal)


DISPATCHER = Dispatcher("relative_position_attention", [
    Backend("dense", _dense, suits=lambda c: (True, "the fast path"),
            note="materialised scores, relative terms gathered from q·R over the offsets that occur",
            detail=lambda c: f"scores in {compute_dtype(c.q.dtype)}"),
    Backend("reference", _reference, auto=False, note="naive_relative_attention: R gathered per (t, s) pair"),
])
register_op("relative_position_attention", make_call, DISPATCHER)


def relative_position_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, u: torch.Tensor,
                                rel_k: torch.Tensor, rel_b: torch.Tensor, *, causal: bool = True,
                                scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """Attention with a content bias and learned relative key/scalar terms.

    Args:
        q: ``(B, Nq, H, D)``; k: ``(B, Nk, H, D)``; v: ``(B, Nk, H, Dv)``.
        u: ``(H, D)`` global content bias.
        rel_k: ``(2P, H, D)`` relative key embeddings, index ``t - s + P`` for offset ``t - s``.
        rel_b: ``(2P, H)`` relative scalar biases, same indexing.
        causal: keys ``s <= t`` only.
        scale: default ``D ** -0.5``, applied to every term.
        backend: None / ``"dense"`` (the fast path) or ``"reference"``;
            see ``ak.explain("relative_position_attention", ...)``.

    Returns:
        ``(B, Nq, H, Dv)``.

    Example:
        >>> q = k = v = torch.randn(1, 16, 2, 8)
        >>> out = relative_position_attention(q, k, v, torch.zeros(2, 8), torch.zeros(64, 2, 8), torch.zeros(64, 2))
    """
    call = make_call(q, k, v, u, rel_k, rel_b, causal=causal, scale=scale)
    return DISPATCHER.run(call, backend)
