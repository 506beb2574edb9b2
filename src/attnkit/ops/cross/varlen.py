"""Packed variable-length cross-attention: many (query sequence, key sequence) pairs in one call.

Sequence ``s`` holds query rows ``cu_q[s]..cu_q[s+1]-1`` of the packed query stream and keys
``cu_k[s]..cu_k[s+1]-1`` of the packed key stream (FlashAttention's ``cu_seqlens`` convention,
"FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness", arXiv 2205.14135);
a query sees only its own sequence's keys. Padding every sequence to the longest and running dense
attention wastes ``S * max(Lq) * max(Lk) - sum(Lq * Lk)`` score entries; the backends here compute
only the block diagonal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnkit._validate import check_qkv, resolve_scale
from attnkit.masks.cross import VarlenCross, varlen_cross
from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.ops.dense.call import attention
from attnkit.reference.naive_cross import naive_varlen_cross_attention


@dataclass(frozen=True, eq=False)
class VarlenCall:
    """A validated ``varlen_cross_attention`` call."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: VarlenCross
    scale: float

    def describe(self) -> str:
        m = self.mask
        return (f"q {tuple(self.q.shape)} k {tuple(self.k.shape)} {self.q.dtype}, {len(m.cu_q) - 1} sequences "
                f"(max Lq {max(m.q_lengths)}, max Lk {max(m.k_lengths)}), density {m.density(*self._n):.3f}"
                f"{', causal' if m.causal else ''}")

    @property
    def _n(self) -> tuple[int, int]:
        return self.q.shape[1], self.k.shape[1]


def make_call(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal=False, scale=None) -> VarlenCall:
    check_qkv(q, k, v)
    if q.shape[0] != 1:
        raise ValueError(f"varlen_cross_attention: q, k, v are packed streams (1, total, H, D); got batch {q.shape[0]}")
    mask = varlen_cross(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, causal=causal)
    if mask.cu_q[-1] != q.shape[1]:
        raise ValueError(f"varlen_cross_attention: cu_seqlens_q ends at {mask.cu_q[-1]} but q holds {q.shape[1]} "
                         "packed query rows")
    if mask.cu_k[-1] != k.shape[1]:
        raise ValueError(f"varlen_cross_attention: cu_seqlens_k ends at {mask.cu_k[-1]} but k holds {k.shape[1]} "
                         "packed keys")
    return VarlenCall(q, k, v, mask, resolve_scale(scale, q.shape[-1]))


def _per_sequence(c: VarlenCall) -> torch.Tensor:
    # one fused SDPA per sequence: no mask to build, and torch's CPU flash kernel for forward and backward
    q, k, v, m = c.q, c.k, c.v, c.mask
    group = q.shape[2] // k.shape[2]
    outs = []
    for s in range(len(m.cu_q) - 1):
        q0, q1, k0, k1 = m.cu_q[s], m.cu_q[s + 1], m.cu_k[s], m.cu_k[s + 1]
        if q1 == q0:
            continue
        if k1 == k0:  # no key: zero rows (the library's empty-row convention)
            outs.append(q.new_zeros(1, q1 - q0, q.shape[2], v.shape[-1]))
            continue
        qs = q[:, q0:q1].transpose(1, 2)                                     # (1, H, Lq, D)
        ks, vs = k[:, k0:k1].transpose(1, 2), v[:, k0:k1].transpose(1, 2)    # (1, Hkv, Lk, D)
        mask = None
        if m.causal:
            lq, lk = q1 - q0, k1 - k0
            if lq > lk:  # the first lq - lk rows see no key: the masked path gives them zero rows

                outs.append(attention(q[:, q0:q1], k[:, k0:k1], v[:, k0:k1],
                                      mask=varlen_cross([lq], [lk], causal=True), scale=c.scale))
                continue
            if lq != lk:  # SDPA's is_causal is top-left aligned: a shifted band needs its mask
                rows = torch.arange(lq, device=q.device)[:, None] + lk - lq
                mask = torch.arange(lk, device=q.device)[None, :] <= rows
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=m.causal and mask is None,
                                           scale=c.scale, enable_gqa=group > 1)
        outs.append(o.transpose(1, 2))                                       # (1, Lq, H, Dv)
    return torch.cat(outs, 1)


def _needs_grad(c: VarlenCall) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in (c.q, c.k, c.v))


def _per_sequence_suits(c: VarlenCall) -> tuple[bool, str]:
    # measured (bench suite `cross`, 8 sequences, 16K/16K, CPU): forward ties with the blocked tile walk,
    # forward+backward is ~1.5x slower through torch's per-sequence SDPA backward
    if _needs_grad(c):
        return False, "with gradients the blocked tile walk (masked) is faster than per-sequence SDPA backward"
    return True, "one fused SDPA per sequence, no mask to build"


def _masked(c: VarlenCall) -> torch.Tensor:
    return attention(c.q, c.k, c.v, mask=c.mask, scale=c.scale)


def _reference(c: VarlenCall) -> torch.Tensor:
    return naive_varlen_cross_attention(c.q, c.k, c.v, c.mask.cu_q, c.mask.cu_k, c.mask.causal, c.scale)


DISPATCHER = Dispatcher("varlen_cross_attention", [
    Backend("per_sequence", _per_sequence, suits=_per_sequence_suits,
            note="a loop over sequences, torch's fused SDPA on each (no mask, no padding)",
            detail=lambda c: f"{len(c.mask.cu_q) - 1} SDPA calls" + (", bottom-right causal" if c.mask.causal else "")),
    Backend("masked", _masked, note="ak.attention with the varlen_cross mask (the blocked tile walk on sparse masks)",
            detail=lambda c: "ak.attention(mask=varlen_cross(...)); see ak.explain('attention', ...)"),
    Backend("reference", _reference, auto=False, note="naive_varlen_cross_attention: each sequence materialised"),
])
register_op("varlen_cross_attention", make_call, DISPATCHER)


def varlen_cross_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal: bool = False, scale: float | None = None,
                           backend: str | None = None) -> torch.Tensor:
    """Cross-attention over packed variable-length sequences.

    Args:
        q: ``(1, Tq, Hq, D)``, the query sequences packed end to end.
        k, v: ``(1, Tk, Hkv, D)`` / ``(1, Tk, Hkv, Dv)``, the key sequences packed the same way.
        cu_seqlens_q, cu_seqlens_k: ``S + 1`` non-decreasing ints from 0 (list or 1-D tensor): the
            start of each sequence in each stream, ending at ``Tq`` / ``Tk``.
        causal: query ``j`` of a sequence sees its keys ``0..j + Lk - Lq`` (bottom-right aligned).
        scale: default ``D ** -0.5``.
        backend: None, ``"per_sequence"``, ``"masked"`` or ``"reference"``
            (``ak.explain("varlen_cross_attention", q, k, v, cu_seqlens_q=..., cu_seqlens_k=...)``).

    Returns:
        ``(1, Tq, Hq, Dv)``; a sequence without keys gives zero rows.

    Example:
        >>> out = varlen_cross_attention(q, k, v, [0, 5, 8], [0, 4, 13])
    """
    return DISPATCHER.run(make_call(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, scale=scale), backend)
