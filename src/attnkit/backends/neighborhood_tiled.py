"""Tiled CPU neighborhood attention, forward and backward, with no N x N allocation.

"Faster Neighborhood Attention" (arXiv 2403.04690): run NA as dense attention of each query
tile against its halo. Each chunk of tiles gathers its queries and halo keys once
(``index_select``), runs one batched dense attention (tile x halo) with the tiles' small
mask (none for full tiles), and scatters results back. Keys outside a tile's halo are never
touched. The dense inner kernel is PyTorch's fused CPU flash-attention op when present (it
takes strided heads-last views, GQA and a broadcast float mask, and returns the LSE); a plain
matmul/softmax version of the same chunk math is the fallback and also serves gradients that
flow into the returned LSE.

Memory: forward keeps ``q, k, v, out, lse``; backward recomputes per chunk, so peak extra
memory is one chunk (bounded by ``_CHUNK_BYTES``) plus fp32 accumulators for dK/dV.
"""

from __future__ import annotations

import torch

from attnkit.backends.neighborhood_tiles import TilePlan

_CHUNK_BYTES = 48 << 20  # gathered K/V (and scores on the fallback path) per chunk
_HALF = (torch.float16, torch.bfloat16)


def _flash_ops():
    fwd = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    return (fwd, bwd) if fwd is not None and bwd is not None else (None, None)


def use_flash(q: torch.Tensor, v: torch.Tensor) -> bool:
    """The fused CPU kernel needs a CPU tensor and ``Dv == D``."""
    return q.device.type == "cpu" and q.shape[-1] == v.shape[-1] and _flash_ops()[0] is not None


def _bias(allowed: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``(C, M, Hk)`` bool -> ``(C, 1, M, Hk)`` additive mask (0 / -inf), broadcast over heads."""
    if allowed is None:
        return None
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf")).unsqueeze(1)


# ----- chunk math: q (C, H, M, D), k (C, Hkv, Hk, D), v (C, Hkv, Hk, Dv), bias (C|1, 1, M, Hk) or None -----

def _manual_scores(q, k, bias, scale):
    C, H, M, D = q.shape
    Hkv = k.shape[1]
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    q5 = q.to(ct).reshape(C, Hkv, H // Hkv, M, D)  # (C, Hkv, G, M, D): query head h uses kv head h // G
    s = torch.matmul(q5, k.to(ct).unsqueeze(2).transpose(-1, -2)).mul_(scale)  # (C, Hkv, G, M, Hk)
    if bias is not None:
        s.add_(bias.to(ct).unsqueeze(1))
    return s


def chunk_forward(q, k, v, bias, scale):
    """Returns ``out (C, H, M, Dv)`` in q's dtype and ``lse (C, H, M)`` (fp64 for fp64, else fp32)."""
    if use_flash(q, v):
        fwd, _ = _flash_ops()
        return fwd(q, k, v, attn_mask=bias, scale=scale)
    C, H, M, _ = q.shape
    s = _manual_scores(q, k, bias, scale)
    m = s.amax(-1, keepdim=True)
    p = s.sub_(m).exp_()
    den = p.sum(-1, keepdim=True)
    out = torch.matmul(p, v.to(p.dtype).unsqueeze(2)).div_(den)  # (C, Hkv, G, M, Dv)
    lse = (m + den.log()).squeeze(-1)
    return out.reshape(C, H, M, -1).to(q.dtype), lse.reshape(C, H, M)


def chunk_backward(do, q, k, v, out, lse, bias, scale, dlse=None):
    """Gradients ``dq (C, H, M, D)``, ``dk``, ``dv`` of one chunk; ``dlse (C, H, M)`` optional."""
    if dlse is None and use_flash(q, v):
        _, bwd = _flash_ops()
        return bwd(do, q, k, v, out, lse, 0.0, False, attn_mask=bias, scale=scale)
    C, H, M, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    s = _manual_scores(q, k, bias, scale)
    ct = s.dtype
    p = s.sub_(lse.to(ct).reshape(C, Hkv, G, M, 1)).exp_()  # (C, Hkv, G, M, Hk) probabilities
    do5 = do.to(ct).reshape(C, Hkv, G, M, -1)  # (C, Hkv, G, M, Dv)
    o5 = out.to(ct).reshape(C, Hkv, G, M, -1)
    dv = torch.matmul(p.transpose(-1, -2), do5).sum(2)  # (C, Hkv, Hk, Dv)
    dp = torch.matmul(do5, v.to(ct).unsqueeze(2).transpose(-1, -2))  # (C, Hkv, G, M, Hk)
    delta = (do5 * o5).sum(-1, keepdim=True)  # (C, Hkv, G, M, 1)
    if dlse is not None:
        delta = delta - dlse.to(ct).reshape(C, Hkv, G, M, 1)  # d lse / d s = p
    ds = p.mul_(dp.sub_(delta))
    dq = torch.matmul(ds, k.to(ct).unsqueeze(2)).mul_(scale).reshape(C, H, M, D)
    dk = torch.matmul(ds.transpose(-1, -2), q.to(ct).reshape(C, Hkv, G, M, D)).sum(2).mul_(scale)  # (C, Hkv, Hk, D)
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype)


# ----- whole op -----

def _chunks(plan: TilePlan, B: int, H: int, Hkv: int, D: int, Dv: int, itemsize: int):
    per_tile = B * (plan.Hk * Hkv * (D + Dv) + plan.M * H * (D + Dv)) * itemsize
    per_tile += B * plan.M * H * plan.Hk * 4 * 2  # scores/probabilities on the fallback path
    step = max(1, _CHUNK_BYTES // max(per_tile, 1))
    bounds = []
    lo = 0
    while lo < plan.nt:
        hi = min(plan.nt, lo + step)
        if lo < plan.n_full < hi:  # keep full tiles in mask-free chunks
            hi = plan.n_full
        bounds.append((lo, hi))
        lo = hi
    return bounds


def _gather(x: torch.Tensor, idx: torch.Tensor, C: int, rows: int) -> torch.Tensor:
    """``x (B, N, H, D)`` -> ``(B*C, H, rows, D)`` strided view of the gathered rows."""
    B, _, H, D = x.shape
    return x.index_select(1, idx).view(B * C, rows, H, D).transpose(1, 2)  # (B*C, H, rows, D)


def tiled_forward(q, k, v, plan: TilePlan, scale: float):
    """q ``(B, N, H, D)``, k/v ``(B, N, Hkv, D|Dv)`` (contiguous) -> out ``(B, N, H, Dv)``, lse ``(B, N, H)``."""
    B, _, H, D = q.shape
    Hkv, Dv = k.shape[2], v.shape[3]
    M, Hk = plan.M, plan.Hk
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out_t = q.new_empty(B, plan.nt * M, H, Dv)  # tile-major layout
    lse_t = torch.empty(B, plan.nt * M, H, dtype=lse_dtype, device=q.device)
    for lo, hi in _chunks(plan, B, H, Hkv, D, Dv, q.element_size()):
        C = hi - lo
        qidx, _qvalid, kidx, allowed = plan.chunk(lo, hi)
        bias = _bias(allowed, q.dtype)
        if bias is not None and B > 1:
            bias = bias.repeat(B, 1, 1, 1)  # (B*C, 1, M, Hk)
        o, lse = chunk_forward(_gather(q, qidx, C, M), _gather(k, kidx, C, Hk), _gather(v, kidx, C, Hk), bias, scale)
        out_t[:, lo * M:hi * M] = o.transpose(1, 2).reshape(B, C * M, H, Dv)  # (B, C*M, H, Dv)
        lse_t[:, lo * M:hi * M] = lse.transpose(1, 2).reshape(B, C * M, H).to(lse_dtype)
    inv = plan.inv.to(q.device)
    return out_t.index_select(1, inv), lse_t.index_select(1, inv)


def tiled_backward(do, q, k, v, out, lse, plan: TilePlan, scale: float, dlse=None):
    """Gradients of :func:`tiled_forward`; ``do (B, N, H, Dv)``, ``dlse (B, N, H)`` or None."""
    B, N, H, D = q.shape
    Hkv, Dv = k.shape[2], v.shape[3]
    M, Hk = plan.M, plan.Hk
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq_t = torch.empty(B, plan.nt * M, H, D, dtype=q.dtype, device=q.device)
    dk = torch.zeros(B, N, Hkv, D, dtype=acc, device=q.device)  # halos overlap: accumulate
    dv = torch.zeros(B, N, Hkv, Dv, dtype=acc, device=q.device)
    for lo, hi in _chunks(plan, B, H, Hkv, D, Dv, q.element_size()):
        C = hi - lo
        qidx, qvalid, kidx, allowed = plan.chunk(lo, hi)
        bias = _bias(allowed, q.dtype)
        if bias is not None and B > 1:
            bias = bias.repeat(B, 1, 1, 1)  # (B*C, 1, M, Hk)
        keep = qvalid.to(do.dtype)[None, :, None, None]  # padded slots must not feed dK/dV
        do_c = (do.index_select(1, qidx) * keep).view(B * C, M, H, Dv).transpose(1, 2)  # (B*C, H, M, Dv)
        lse_c = lse.index_select(1, qidx).view(B * C, M, H).transpose(1, 2).contiguous()  # (B*C, H, M)
        dlse_c = None
        if dlse is not None:
            dlse_c = (dlse.index_select(1, qidx) * keep[..., 0]).view(B * C, M, H).transpose(1, 2)
        kc, vc = _gather(k, kidx, C, Hk), _gather(v, kidx, C, Hk)
        dq_c, dk_c, dv_c = chunk_backward(do_c, _gather(q, qidx, C, M), kc, vc, _gather(out, qidx, C, M),
                                          lse_c, bias, scale, dlse_c)
        dq_t[:, lo * M:hi * M] = dq_c.transpose(1, 2).reshape(B, C * M, H, D)
        dk.index_add_(1, kidx, dk_c.transpose(1, 2).reshape(B, C * Hk, Hkv, D).to(acc))
        dv.index_add_(1, kidx, dv_c.transpose(1, 2).reshape(B, C * Hk, Hkv, Dv).to(acc))
    dq = dq_t.index_select(1, plan.inv.to(q.device))
    return dq, dk.to(q.dtype), dv.to(q.dtype)


class TiledNA(torch.autograd.Function):
    """Autograd wrapper: saves only ``q, k, v, out, lse``; backward recomputes chunk by chunk."""

    @staticmethod
    def forward(ctx, q, k, v, plan, scale):
        out, lse = tiled_forward(q, k, v, plan, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale = plan, scale
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = tiled_backward(dout.contiguous(), q, k, v, out, lse, ctx.plan, ctx.scale,
                                    None if dlse is None else dlse.contiguous())
        return dq, dk, dv, None, None


def neighborhood_tiled(q, k, v, plan: TilePlan, scale: float):
    """q ``(B, N, H, D)`` flattened row-major -> ``out (B, N, H, Dv)``, ``lse (B, N, H)`` (fp32/fp64)."""
    return TiledNA.apply(q.contiguous(), k.contiguous(), v.contiguous(), plan, scale)
