"""Batched tile groups of the blocked backend: R query tiles with one key chunk each, one kernel call.

Two kernels run a group. The fused one is torch's CPU flash-attention op
(``aten::_scaled_dot_product_flash_attention_for_cpu`` and its backward): it returns the
log-sum-exp, takes GQA natively and an additive mask, and is ~1.7x faster here than our
multi-pass softmax. It is a private op, so it is looked up at run time and the plain matmul
kernel below stays the fallback (and the path for ``Dv != D`` and for gradients flowing into
the returned log-sum-exp, which the fused backward does not take).

Layouts: internal ``q (B, Hkv, Nq, G, D)``, ``k (B, Hkv, Nk, D)``; the fused op wants
``(B*R, Hq, bq, D)`` with query head ``h = hkv * G + g``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnkit.kernels.fused import can_fuse, fused_ops
from attnkit.ops.dense.blocked.plan import Group

_NEG_INF = float("-inf")


def group_keys(t: torch.Tensor, grp: Group) -> torch.Tensor:
    """Keys of a group from ``t (B, Hkv, Nk, X)``: ``(B, Hkv, R, W, X)``."""
    b, hkv = t.shape[:2]
    return t.index_select(2, grp.index.flatten()).view(b, hkv, grp.tiles, grp.index.shape[1], -1)


def _span(grp: Group) -> tuple[int, int]:
    return grp.q0, grp.q0 + grp.tiles * grp.rows


# ---- fused kernel ------------------------------------------------------------------------------

def _to_fused(x: torch.Tensor, grp: Group) -> torch.Tensor:
    """Group rows of ``x (B, Hkv, Nq, G, X)`` as ``(B*R, Hq, bq, X)``."""
    b, hkv, _, g, d = x.shape
    q0, q1 = _span(grp)
    x = x[:, :, q0:q1].reshape(b, hkv, grp.tiles, grp.rows, g, d)         # (B, Hkv, R, bq, G, X)
    return x.permute(0, 2, 1, 4, 3, 5).reshape(b * grp.tiles, hkv * g, grp.rows, d)


def _from_fused(x: torch.Tensor, b: int, hkv: int, grp: Group) -> torch.Tensor:
    """Inverse of :func:`_to_fused`: ``(B*R, Hq, bq, *X)`` -> ``(B, Hkv, R*bq, G, *X)``."""
    r, bq = grp.tiles, grp.rows
    rest = x.shape[3:]
    x = x.reshape(b, r, hkv, -1, bq, *rest)                               # (B, R, Hkv, G, bq, *X)
    x = x.permute(0, 2, 1, 4, 3, *range(5, 5 + len(rest)))                 # (B, Hkv, R, bq, G, *X)
    return x.reshape(b, hkv, r * bq, x.shape[4], *rest)


def _keys_fused(t: torch.Tensor, grp: Group) -> torch.Tensor:
    """Keys of a group from ``t (B, Hkv, Nk, X)`` (any strides) as ``(B*R, Hkv, W, X)``."""
    b, hkv = t.shape[:2]
    if grp.start is not None and b == 1:  # overlapping windows of one sequence: a view, no copy
        _, sh, sn, sx = t.stride()
        w = grp.index.shape[1]
        return t.as_strided((grp.tiles, hkv, w, t.shape[-1]), (grp.rows * sn, sh, sn, sx),
                            t.storage_offset() + grp.start * sn)
    kg = group_keys(t, grp)                                                # (B, Hkv, R, W, X)
    return kg.transpose(1, 2).reshape(b * grp.tiles, hkv, kg.shape[3], -1)  # (B*R, Hkv, W, X)


def _bias(grp: Group, b: int, dtype: torch.dtype):
    """The plan's additive mask as ``(B*R, 1, bq, W)`` and its empty rows as ``(B*R, 1, bq)`` (or None);
    empty rows run unmasked and the caller zeroes them."""
    if grp.bias is None:
        return None, None
    bias, empty = grp.bias.to(dtype), grp.empty
    if b > 1:
        bias = bias.repeat(b, 1, 1, 1)
        empty = None if empty is None else empty.repeat(b, 1)
    return bias, (None if empty is None else empty[:, None])


def _forward_fused(q, k, v, grp: Group, scale: float, out, lse) -> None:
    b, hkv = k.shape[:2]
    bias, empty = _bias(grp, b, q.dtype)
    fwd, _ = fused_ops()
    o, l = fwd(_to_fused(q, grp), _keys_fused(k, grp), _keys_fused(v, grp), attn_mask=bias, scale=scale)
    if empty is not None:
        o, l = o.masked_fill(empty[..., None], 0.0), l.masked_fill(empty, _NEG_INF)
    q0, q1 = _span(grp)
    out[:, :, q0:q1] = _from_fused(o, b, hkv, grp)
    lse[:, :, q0:q1] = _from_fused(l.unsqueeze(-1), b, hkv, grp).squeeze(-1).to(lse.dtype)


def _backward_fused(q, k, v, out, lse_safe, dout, grp: Group, scale: float, dq, dk, dv) -> None:
    b, hkv = k.shape[:2]
    bias, _ = _bias(grp, b, q.dtype)  # empty rows carry lse = +inf, so their P = 0
    _, bwd = fused_ops()
    kf, vf = _keys_fused(k, grp), _keys_fused(v, grp)
    lf = _to_fused(lse_safe.unsqueeze(-1), grp).squeeze(-1)                # (B*R, Hq, bq)
    gq, gk, gv = bwd(_to_fused(dout, grp), _to_fused(q, grp), kf, vf, _to_fused(out, grp), lf, 0.0, False,
                     attn_mask=bias, scale=scale)
    q0, q1 = _span(grp)
    dq[:, :, q0:q1] = _from_fused(gq, b, hkv, grp)
    flat, w = grp.index.flatten(), grp.index.shape[1]
    dk.index_add_(2, flat, gk.view(b, grp.tiles, hkv, w, -1).transpose(1, 2).reshape(b, hkv, flat.numel(), -1))
    dv.index_add_(2, flat, gv.view(b, grp.tiles, hkv, w, -1).transpose(1, 2).reshape(b, hkv, flat.numel(), -1))


# ---- matmul kernel -----------------------------------------------------------------------------

def _scores(qg, kg, grp: Group, scale: float) -> torch.Tensor:
    """qg (B, Hkv, R, bq*G, D), kg (B, Hkv, R, W, D) -> masked scaled scores (B, Hkv, R, bq, G, W)."""
    b, hkv, r = qg.shape[:3]
    s = torch.matmul(qg, kg.transpose(-1, -2)).mul_(scale)                # (B, Hkv, R, bq*G, W)
    s = s.view(b, hkv, r, grp.rows, -1, s.shape[-1])                       # (B, Hkv, R, bq, G, W)
    if grp.allowed is not None:
        s.masked_fill_(~grp.allowed[:, :, None, :], _NEG_INF)             # (R, bq, 1, W) over G
    return s


def _forward_matmul(q, k, v, grp: Group, scale: float, out, lse) -> None:
    b, hkv, _, g, _ = q.shape
    r, bq, dv = grp.tiles, grp.rows, v.shape[-1]
    q0, q1 = _span(grp)
    qg = q[:, :, q0:q1].reshape(b, hkv, r, bq * g, -1)                     # (B, Hkv, R, bq*G, D)
    s = _scores(qg, group_keys(k, grp), grp, scale)                        # (B, Hkv, R, bq, G, W)
    m = s.amax(-1)
    m_safe = torch.where(m == _NEG_INF, 0.0, m)
    p = s.sub_(m_safe[..., None]).exp_()
    l = p.sum(-1)                                                          # (B, Hkv, R, bq, G)
    pv = torch.matmul(p.view(b, hkv, r, bq * g, -1), group_keys(v, grp))   # (B, Hkv, R, bq*G, Dv)
    nonempty = l > 0
    o = pv.view(b, hkv, r, bq, g, dv) / torch.where(nonempty, l, 1.0)[..., None]
    out[:, :, q0:q1] = o.view(b, hkv, q1 - q0, g, dv)
    lg = torch.where(nonempty, m_safe + torch.log(torch.where(nonempty, l, 1.0)), _NEG_INF)
    lse[:, :, q0:q1] = lg.view(b, hkv, q1 - q0, g)


def _backward_matmul(q, k, v, lse_safe, dout, delta, grp: Group, scale: float, dq, dk, dv) -> None:
    b, hkv, _, g, _ = q.shape
    r, bq = grp.tiles, grp.rows
    q0, q1 = _span(grp)
    qg = q[:, :, q0:q1].reshape(b, hkv, r, bq * g, -1)                     # (B, Hkv, R, bq*G, D)
    dog = dout[:, :, q0:q1].reshape(b, hkv, r, bq * g, -1)                 # (B, Hkv, R, bq*G, Dv)
    kg, vg = group_keys(k, grp), group_keys(v, grp)                        # (B, Hkv, R, W, D|Dv)
    s = _scores(qg, kg, grp, scale)                                        # (B, Hkv, R, bq, G, W)
    p = s.sub_(lse_safe[:, :, q0:q1].view(b, hkv, r, bq, g, 1)).exp_().view(b, hkv, r, bq * g, -1)
    dvg = torch.matmul(p.transpose(-1, -2), dog)                           # (B, Hkv, R, W, Dv)
    dp = torch.matmul(dog, vg.transpose(-1, -2))                           # (B, Hkv, R, bq*G, W)
    ds = p.mul_(dp.sub_(delta[:, :, q0:q1].reshape(b, hkv, r, bq * g, 1))).mul_(scale)
    dq[:, :, q0:q1] = torch.matmul(ds, kg).view(b, hkv, r * bq, g, -1)
    flat = grp.index.flatten()
    dk.index_add_(2, flat, torch.matmul(ds.transpose(-1, -2), qg).view(b, hkv, flat.numel(), -1))
    dv.index_add_(2, flat, dvg.view(b, hkv, flat.numel(), -1))


def group_forward(q, k, v, grp: Group, scale: float, out, lse) -> None:
    """Write ``out`` and ``lse`` rows of one group (internal layouts)."""
    (_forward_fused if can_fuse(q, v) else _forward_matmul)(q, k, v, grp, scale, out, lse)


def group_backward(q, k, v, out, lse_safe, dout, delta, grp: Group, scale: float, dq, dk, dv, *,
                   fused: bool) -> None:
    """Accumulate one group's gradients; ``fused`` is False when an lse gradient must flow (in ``delta``)."""
    if fused and can_fuse(q, v):
        _backward_fused(q, k, v, out, lse_safe, dout, grp, scale, dq, dk, dv)
    else:
        _backward_matmul(q, k, v, lse_safe, dout, delta, grp, scale, dq, dk, dv)


def group_inference(q, k, v, grp: Group, scale: float, gqa: bool, out) -> None:
    """Forward only: ``q (B, Hq, Nq, D)``, ``k/v (B, Hkv, Nk, D|Dv)``, ``out (B, Hq, Nq, Dv)``.

    The fused op with the plan's cached additive mask where it applies, else public SDPA with
    the boolean mask; both want 4-D, so the R tiles fold into the batch.
    """
    b, hq, _, d = q.shape
    dv = v.shape[-1]
    r, bq = grp.tiles, grp.rows
    q0, q1 = _span(grp)
    qg = q[:, :, q0:q1].reshape(b, hq, r, bq, d).transpose(1, 2).reshape(b * r, hq, bq, d)
    kg, vg = _keys_fused(k, grp), _keys_fused(v, grp)                     # (B*R, Hkv, W, D|Dv)
    bias, empty = _bias(grp, b, q.dtype)                                   # (B*R, 1, bq, W), (B*R, 1, bq)
    if can_fuse(q, v):
        o, _ = fused_ops()[0](qg, kg, vg, attn_mask=bias, scale=scale)
    else:
        allowed = None if bias is None else bias == 0
        o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=allowed, scale=scale, enable_gqa=gqa)
    if empty is not None:
        o = o.masked_fill(empty[..., None], 0.0)
    out[:, :, q0:q1] = o.view(b, r, hq, bq, dv).transpose(1, 2).reshape(b, hq, q1 - q0, dv)
