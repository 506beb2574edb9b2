"""KArAt: Kolmogorov-Arnold Attention (arXiv 2503.10632) — a learnable Fourier row operator in place of softmax.

Section 3 (modular form): each row ``a`` of the score matrix ``A = q k^T * scale`` goes through ``r`` KAN units,
``Phi_p(a) = sum_q sum_{m=1..G} alpha[p, q, m] cos(m a_q) + beta[p, q, m] sin(m a_q)``, and a learnable projector
``W (N, r)`` maps them back to ``N`` weights, ``sigma = W Phi(a)``; the output is ``sigma V``, with no softmax and
no normalisation. The coefficients are indexed by the key position ``q``, so ``N`` is fixed by the parameters.

attnkit's handling of ``N`` and causality (neither is in the paper): the parameters are sized for ``Nmax`` keys and
an input of ``N <= Nmax`` tokens uses their leading ``N`` positions; ``causal=True`` drops the masked terms
``q > i`` inside ``Phi`` and the weights ``j > i`` of ``sigma``, so row ``i`` reads only tokens ``<= i`` and a
prefix's outputs equal those of the whole sequence.

Backends: ``basis`` (the ``(rows, N, G)`` cos/sin basis of a block of query rows at a time, contracted with the
coefficients as one matmul) and ``reference``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit._validate import check_qkv, resolve_scale
from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.reference.naive_sequence3 import naive_kat_attention

# elements of one block's (B, H, rows, N, G) basis: 8 M (32 MB in fp32; cos and sin each)
CHUNK_ELEMENTS = 1 << 23


@dataclass(frozen=True, eq=False)
class KatCall:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    w: torch.Tensor
    causal: bool
    scale: float

    def describe(self) -> str:
        _, r, nmax, G = self.alpha.shape  # (H, r, Nmax, G)
        return f"q {tuple(self.q.shape)} {self.q.dtype}, r {r}, G {G}, Nmax {nmax}, causal {self.causal}"


def make_call(q, k, v, alpha, beta, w, *, causal=False, scale=None) -> KatCall:
    fn = "kat_attention"
    try:
        hq, hkv = check_qkv(q, k, v, same_extent=True)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{fn}: {e}") from None
    if hq != hkv:
        raise ValueError(f"{fn}: needs as many K/V heads as query heads, got {hq} and {hkv}")
    N = q.shape[1]
    if not isinstance(alpha, torch.Tensor) or alpha.dim() != 4 or alpha.shape[0] != hq:
        raise ValueError(f"{fn}: alpha must be (H, r, Nmax, G) with H={hq}, got {getattr(alpha, 'shape', alpha)}")
    H, r, nmax, _ = alpha.shape
    if not isinstance(beta, torch.Tensor) or beta.shape != alpha.shape:
        raise ValueError(f"{fn}: beta must have alpha's shape {tuple(alpha.shape)}, got {getattr(beta, 'shape', beta)}")
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != (H, nmax, r):
        raise ValueError(f"{fn}: w must be (H, Nmax, r) = {(H, nmax, r)}, got {getattr(w, 'shape', w)}")
    if N > nmax:
        raise ValueError(f"{fn}: {N} tokens, but the coefficients cover Nmax={nmax} key positions (N is fixed "
                         f"by the parameters; inputs may be shorter, not longer)")
    for name, t in (("alpha", alpha), ("beta", beta), ("w", w)):
        if t.dtype != q.dtype:
            raise TypeError(f"{fn}: {name} dtype {t.dtype} differs from q's {q.dtype}")
    if not isinstance(causal, bool):
        raise TypeError(f"{fn}: causal must be a bool, got {type(causal).__name__}")
    return KatCall(q, k, v, alpha, beta, w, causal, resolve_scale(scale, q.shape[-1]))


def _rows(c: KatCall) -> int:
    B, N, H, _ = c.q.shape
    return max(1, CHUNK_ELEMENTS // max(1, B * H * N * c.alpha.shape[-1]))


def _basis(c: KatCall) -> torch.Tensor:
    B, N, H, _ = c.q.shape
    _, r, _, G = c.alpha.shape
    m = torch.arange(1, G + 1, dtype=c.q.dtype, device=c.q.device)  # (G,)
    # coefficients of the first N key positions, cos and sin stacked: (H, N * G * 2, r)
    coef = torch.stack([c.alpha[:, :, :N], c.beta[:, :, :N]], -1).permute(0, 2, 3, 4, 1).reshape(H, N * G * 2, r)
    w = c.w[:, :N]  # (H, N, r)
    qh, kh, vh = (t.transpose(1, 2) for t in (c.q, c.k, c.v))  # (B, H, N, *)
    step = _rows(c)
    outs = []
    for i0 in range(0, N, step):
        i1 = min(N, i0 + step)
        a = (qh[:, :, i0:i1] @ kh.transpose(-1, -2)) * c.scale  # (B, H, rows, N)
        ang = a.unsqueeze(-1) * m  # (B, H, rows, N, G)
        basis = torch.stack([torch.cos(ang), torch.sin(ang)], -1)  # (B, H, rows, N, G, 2)
        if c.causal:  # drop the terms of future keys inside Phi
            keep = torch.arange(N, device=a.device) <= torch.arange(i0, i1, device=a.device).unsqueeze(1)  # (rows, N)
            basis = basis * keep.view(1, 1, i1 - i0, N, 1, 1).to(basis.dtype)
        phi = basis.reshape(B, H, i1 - i0, N * G * 2) @ coef.unsqueeze(0)  # (B, H, rows, r)
        sigma = phi @ w.transpose(-1, -2).unsqueeze(0)  # (B, H, rows, N)
        if c.causal:  # and the weights on future values
            sigma = sigma * keep.to(sigma.dtype)
        outs.append(sigma @ vh)  # (B, H, rows, Dv)
    return torch.cat(outs, 2).transpose(1, 2)  # (B, N, H, Dv)


def _reference(c: KatCall) -> torch.Tensor:
    return naive_kat_attention(c.q, c.k, c.v, c.alpha, c.beta, c.w, causal=c.causal, scale=c.scale)


DISPATCHER = Dispatcher("kat_attention", [
    Backend("basis", _basis, note="cos/sin basis of a block of query rows, one matmul with the coefficients",
            detail=lambda c: f"{_rows(c)} query rows per block"),
    Backend("reference", _reference, auto=False, note="naive_kat_attention"),
])
register_op("kat_attention", make_call, DISPATCHER)


def kat_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                  w: torch.Tensor, *, causal: bool = False, scale: float | None = None,
                  backend: str | None = None) -> torch.Tensor:
    """KArAt's modular Fourier attention: ``sigma(A) V`` with ``sigma = W Phi`` learned per head.

    Args:
        q, k: ``(B, N, H, D)``; v: ``(B, N, H, Dv)``.
        alpha, beta: ``(H, r, Nmax, G)`` cos / sin coefficients (``N <= Nmax``; the leading ``N`` are used).
        w: ``(H, Nmax, r)`` the projector back to key positions.
        causal: row ``i`` reads keys ``<= i`` only (terms dropped inside ``Phi`` and in ``sigma``).
        scale: score scale (default ``D ** -0.5``). backend: None, ``"basis"`` or ``"reference"``.

    Returns:
        ``(B, N, H, Dv)``. Rows of ``sigma`` are not distributions (no softmax, no normalisation).

    Example:
        >>> o = kat_attention(q, k, v, alpha, beta, w)   # alpha (H, 12, 197, 3), w (H, 197, 12)
    """
    return DISPATCHER.run(make_call(q, k, v, alpha, beta, w, causal=causal, scale=scale), backend)


__all__ = ["kat_attention"]
