"""Softplus Attention with Re-weighting Boosts Length Extrapolation in Large Language Models
(arXiv 2501.13428) — LSSA (length-scaled softplus attention) and LSSAR (with re-weighting).

Softmax is read as "positive map + l1 normalisation": LSSA uses QK-norm, softplus and the
invariance-entropy length scale ``ln(d) ln(N_t)``; LSSAR sharpens the weights with
``ReLU(N_t A - O_t)^p`` and normalises again.
"""


from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnkit._validate import check_qkv, int_arg
from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.reference.naive_dense import naive_lssa

_CHUNK_ELEMS = 1 << 24  # score elements per query chunk



@dataclass(frozen=True, eq=False)
class SoftplusCall:
    """A validated ``softplus_attention`` call."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    causal: bool
    p: float | None
    offset: float
    short_rows: int
    eps: float

    def describe(self) -> str:
        kind = "LSSA" if self.p is None else f"LSSAR p={self.p:g}"
        return (f"q {tuple(self.q.shape)} k {tuple(self.k.shape)} v {tuple(self.v.shape)} {self.q.dtype}, {kind}, "
                f"{'causal' if self.causal else 'non-causal'}")

    def chunk_rows(self) -> int:
        """Query rows per chunk of the fast path: about ``_CHUNK_ELEMS`` score elements each."""
        B, _, hq, _ = self.q.shape
        return max(1, _CHUNK_ELEMS // max(B * hq * self.k.shape[1], 1))


def make_call(q, k, v, *, causal=True, p=None, offset=1.0, short_rows=3, eps=1e-6) -> SoftplusCall:
    check_qkv(q, k, v)
    if p is not None and not p > 0:
        raise ValueError(f"p must be positive or None, got {p}")
    short_rows = int_arg("short_rows", short_rows, 0)
    return SoftplusCall(q, k, v, bool(causal), p, offset, short_rows, eps)


def _chunked(c: SoftplusCall) -> torch.Tensor:
    q, k, v, causal, p, offset, short_rows, eps = c.q, c.k, c.v, c.causal, c.p, c.offset, c.short_rows, c.eps
    _, Nq, hq, D = q.shape
    Nk, hkv = k.shape[1], k.shape[2]
    cdt = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    qn = F.normalize(q.to(cdt), dim=-1, eps=eps).transpose(1, 2)  # (B, H, Nq, D)
    kn = F.normalize(k.to(cdt), dim=-1, eps=eps).repeat_interleave(hq // hkv, dim=2).transpose(1, 2)  # (B, H, Nk, D)
    vv = v.to(cdt).repeat_interleave(hq // hkv, dim=2).transpose(1, 2)  # (B, H, Nk, Dv)
    rows = c.chunk_rows()
    outs = []
    for t0 in range(0, Nq, rows):
        t = torch.arange(t0, min(Nq, t0 + rows), device=q.device)
        vis = (t[:, None] >= torch.arange(Nk, device=q.device)) if causal else None  # (c, Nk)
        n_t = (vis.sum(-1) if causal else torch.full_like(t, Nk)).to(cdt)  # (c,) visible keys per row
        lam = (math.log(D) * torch.log(n_t)).unsqueeze(-1)  # (c, 1)
        a = F.softplus(lam * (qn[:, :, t0:t0 + len(t)] @ kn.transpose(-1, -2)))  # (B, H, c, Nk)
        if causal:
            a = a * vis  # multiplicative mask after softplus (an additive -inf has NaN-prone grads)
        a = a / a.sum(-1, keepdim=True)
        if p is not None:
            o_t = torch.where(n_t > short_rows, offset, 0.0).unsqueeze(-1)  # (c, 1)
            r = torch.relu(n_t.unsqueeze(-1) * a - o_t)
            if causal:
                r = r * vis
            # l1 normalisation is scale-free: divide by the row max before ^p so N^p cannot overflow
            mx = r.amax(-1, keepdim=True).detach()
            r = (r / torch.where(mx > 0, mx, 1.0)) ** p
            s = r.sum(-1, keepdim=True)
            a = r / torch.where(s > 0, s, 1.0)
        outs.append(a @ vv)  # (B, H, c, Dv)
    return torch.cat(outs, dim=2).transpose(1, 2).to(q.dtype)  # (B, Nq, H, Dv)


def _chunked_detail(c: SoftplusCall) -> str:
    rows = c.chunk_rows()
    half = c.q.dtype in (torch.float16, torch.bfloat16)
    return (f"{-(-c.q.shape[1] // rows)} query chunk(s) of up to {rows} rows, "
            f"weights in {'float32' if half else c.q.dtype}")


def _reference(c: SoftplusCall) -> torch.Tensor:
    return naive_lssa(c.q, c.k, c.v, causal=c.causal, p=c.p, offset=c.offset, short_rows=c.short_rows, eps=c.eps)


DISPATCHER = Dispatcher("softplus_attention", [
    Backend("chunked", _chunked, suits=lambda c: (True, "the fast path"),
            note="materialised weights, a chunk of query rows at a time", detail=_chunked_detail),
    Backend("reference", _reference, auto=False, note="naive_lssa: row by row as the paper's equations read"),
])
register_op("softplus_attention", make_call, DISPATCHER)


def softplus_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                       p: float | None = None, offset: float = 1.0, short_rows: int = 3,
                       eps: float = 1e-6, backend: str | None = None) -> torch.Tensor:
    """LSSA, or LSSAR when ``p`` is given.

    Args:
        q: ``(B, Nq, Hq, D)``; k: ``(B, Nk, Hkv, D)``; v: ``(B, Nk, Hkv, Dv)`` (GQA allowed).
        causal: query ``t`` sees keys ``u <= t`` (top-left aligned), else every key.
        p: re-weighting power (paper: 3 or 15); None gives plain LSSA.
        offset: ``O_t`` of the re-weighting for rows with more than ``short_rows`` visible keys
            (shorter rows use 0 so they are not wiped out; a re-implementation's choice).
        eps: for the q/k l2 norms.
        backend: None / ``"chunked"`` (the fast path) or ``"reference"``;
            see ``ak.explain("softplus_attention", ...)``.

    Returns:
        ``(B, Nq, Hq, Dv)``; a row whose re-weighted mass is all zero returns zeros.

    Example:
        >>> q = k = v = torch.randn(1, 64, 2, 16)
        >>> out = softplus_attention(q, k, v, p=15.0)
    """
    call = make_call(q, k, v, causal=causal, p=p, offset=offset, short_rows=short_rows, eps=eps)
    return DISPATCHER.run(call, backend)
