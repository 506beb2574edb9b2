"""Tiled CPU neighborhood attention, forward and backward, with no N x N allocation.

"Faster Neighborhood Attention" (arXiv 2403.04690): run NA as dense attention of each query
tile against its halo. Each chunk of tiles gathers its queries and halo keys once
(``index_select``), runs one batched dense attention (tile x halo) with the tiles' small
mask (none for full tiles), and writes results to their tokens. Keys outside a tile's halo are never
touched. The dense inner kernel is PyTorch's fused CPU flash-attention op when present (it
takes strided heads-last views, GQA and a broadcast float mask, and returns the LSE); a plain
matmul/softmax version of the same chunk math is the fallback and also serves gradients that
flow into the returned LSE.

Memory: forward keeps ``q, k, v, out, lse``; backward recomputes per chunk, so peak extra
memory is one chunk (bounded by ``_CHUNK_BYTES``) plus fp32 accumulators for dK/dV.
"""

from __future__ import annotations

import math

import torch

from attnkit.kernels.alloc import recycle_work_buffers
from attnkit.kernels.fused import can_fuse, fused_ops
from attnkit.ops.neighborhood.tiles import TilePlan

_CHUNK_BYTES = 32 << 20  # per chunk: gathered rows, gradients (and matmul-path scores); small enough that
# glibc recycles the buffers from one chunk to the next instead of mapping fresh pages (page faults
# cost ~1/3 of the time with 256 MiB chunks on a 2-core VM)
_VIEW_CHUNK_BYTES = 256 << 20  # 1-D, B=1: rows are strided views (nothing gathered), so fewer, larger calls win
_KEEP_HALO_BYTES = 256 << 20  # forward's gathered K/V halos kept for backward when at most this big


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
    if can_fuse(q, v):
        fwd, _ = fused_ops()
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
    if dlse is None and can_fuse(q, v):
        _, bwd = fused_ops()
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
# On a busy machine every parallel op pays a thread wake-up, so the loops below keep the number
# of ops per chunk small: 1-D chunks are strided views (no gather), others do one gather for
# queries and one for keys+values, and outputs are scattered back once at the end.

def _step(plan: TilePlan, B: int, H: int, Hkv: int, D: int, Dv: int, itemsize: int, fused: bool) -> int:
    """Tiles per chunk so that the chunk's gathers, gradients (and fallback scores) stay within the chunk budget."""
    per_tile = B * 2 * (plan.Hk * Hkv * (D + Dv) + plan.M * H * (D + 2 * Dv)) * itemsize
    if not fused:
        per_tile += B * plan.M * H * plan.Hk * 4 * 3  # scores, probabilities, dS on the matmul path
    budget = _VIEW_CHUNK_BYTES if len(plan.shape) == 1 and B == 1 else _CHUNK_BYTES
    return max(1, budget // max(per_tile, 1))


def _view(x: torch.Tensor, aff: tuple[int, int, int], C: int, R: int) -> torch.Tensor:
    """Rows ``off + c*cs + r*rs`` of ``x (1, N, H, Dx)`` as a ``(C, H, R, Dx)`` strided view (no copy)."""
    _, _, H, Dx = x.shape
    off, cs, rs = aff
    return x.as_strided((C, H, R, Dx), (cs * H * Dx, Dx, rs * H * Dx, 1), x.storage_offset() + off * H * Dx)


# Halo buffers handed from one call to the next. On this class of machine a page fault costs
# ~3 us, so gathering halos into fresh memory (6x the size of K and V for 2-D tiles) was ~1/5 of
# a forward+backward; recycled buffers are already mapped. Bounded; a buffer whose graph is
# dropped without a backward is simply freed.
_POOL: dict[tuple[int, torch.dtype, str], list[torch.Tensor]] = {}
_POOL_BYTES = 512 << 20


def _take(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    # buffers made under inference_mode are inference tensors, which may not be written outside it:
    # they are pooled apart from the others
    free = _POOL.get((math.prod(shape), like.dtype, str(like.device), torch.is_inference_mode_enabled()))
    if free:
        return free.pop().view(shape)
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def _give(*bufs: torch.Tensor) -> None:
    held = sum(t.numel() * t.element_size() for ts in _POOL.values() for t in ts)
    for t in bufs:
        if t._base is not None:
            t = t._base
        size = t.numel() * t.element_size()
        if held + size <= _POOL_BYTES:
            _POOL.setdefault((t.numel(), t.dtype, str(t.device), t.is_inference()), []).append(t)
            held += size


def _rows(x: torch.Tensor, idx: torch.Tensor, aff, C: int, R: int, pooled: list | None = None) -> torch.Tensor:
    """Rows ``idx`` of ``x (B, N, H, Dx)`` as ``(B*C, H, R, Dx)``: a strided view when affine (B=1), else one gather.

    ``pooled``: gather into a recycled buffer and append that buffer to the list (for :func:`_give`).
    """
    if aff is not None and x.shape[0] == 1:
        return _view(x, aff, C, R)
    B, _, H, Dx = x.shape
    if pooled is None:
        return x.index_select(1, idx).view(B * C, R, H, Dx).transpose(1, 2)  # (B*C, H, R, Dx)
    buf = _take((B, C * R, H, Dx), x)
    pooled.append(buf)
    return torch.index_select(x, 1, idx, out=buf).view(B * C, R, H, Dx).transpose(1, 2)  # (B*C, H, R, Dx)


def _bias(plan: TilePlan, ch, x: torch.Tensor, B: int) -> torch.Tensor | None:
    bias = plan.chunk_bias(ch, x.dtype, x.device)  # None, (1, 1, M, Hk) or (C, 1, M, Hk)
    if bias is not None and B > 1 and bias.shape[0] > 1:
        bias = bias.repeat(B, 1, 1, 1)  # (B*C, 1, M, Hk): batch-major like the gathered rows
    return bias


def _put(dst: torch.Tensor, ch, part: torch.Tensor) -> None:
    """Write a chunk's tile-major rows ``part (B, C*M, ...)`` to their tokens in ``dst (B, N, ...)``.

    Straight into the result (no concatenation of chunks, no final reorder). Padded slots repeat
    a real query and are dropped.
    """
    if ch.qaff is not None and dst.shape[0] == 1:  # affine rows (1-D tiles): a strided copy, no index
        C = ch.hi - ch.lo
        M = part.shape[1] // C
        view = dst.view(1, dst.shape[1], -1, 1) if dst.dim() == 3 else dst  # (1, N, H, Dx)
        _view(view, ch.qaff, C, M).copy_(part.view(C, M, view.shape[2], view.shape[3]).transpose(1, 2))
        return
    idx = ch.qidx.to(dst.device)
    if not ch.all_valid:
        keep = ch.qvalid.to(dst.device).nonzero().squeeze(1)
        idx, part = idx.index_select(0, keep), part.index_select(1, keep)
    dst.index_copy_(1, idx, part.to(dst.dtype))


def _scatter_add(dst: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> None:
    """``dst[:, idx] += src`` for ``dst (B, N, H, Dx)``; B=1 runs as rows of a 2-D view (a ~25% faster kernel)."""
    if dst.shape[0] == 1:
        dst.view(dst.shape[1], -1).index_add_(0, idx, src.reshape(src.shape[1], -1))
    else:
        dst.index_add_(1, idx, src)


def tiled_forward(q, k, v, plan: TilePlan, scale: float, halos: dict | None = None):
    """q ``(B, N, H, D)``, k/v ``(B, N, Hkv, D|Dv)`` (contiguous) -> out ``(B, N, H, Dv)``, lse ``(B, N, H)``.

    ``halos``: if a dict is given, each chunk's gathered ``(k, v)`` halos are stored in it by
    ``(lo, hi)`` so a backward pass can reuse them instead of gathering again.
    """
    B, _, H, D = q.shape
    Hkv, Dv = k.shape[2], v.shape[3]
    M, Hk = plan.M, plan.Hk
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty(B, q.shape[1], H, Dv, dtype=q.dtype, device=q.device)
    lse_all = torch.empty(B, q.shape[1], H, dtype=lse_dtype, device=q.device)
    for ch in plan.chunks(_step(plan, B, H, Hkv, D, Dv, q.element_size(), can_fuse(q, v))):
        C = ch.hi - ch.lo
        qidx, kidx = ch.qidx.to(q.device), ch.kidx.to(q.device)
        pooled: list[torch.Tensor] = []
        kc, vc = _rows(k, kidx, ch.kaff, C, Hk, pooled), _rows(v, kidx, ch.kaff, C, Hk, pooled)
        if halos is not None:
            halos[ch.lo, ch.hi] = (kc, vc, pooled)
        o, lse = chunk_forward(_rows(q, qidx, ch.qaff, C, M), kc, vc, _bias(plan, ch, q, B), scale)
        if halos is None:
            _give(*pooled)
        _put(out, ch, o.transpose(1, 2).reshape(B, C * M, H, Dv))  # (B, C*M, H, Dv); a view for the fused kernel
        _put(lse_all, ch, lse.transpose(1, 2).reshape(B, C * M, H))  # (B, C*M, H)
    return out, lse_all


def tiled_backward(do, q, k, v, out, lse, plan: TilePlan, scale: float, dlse=None, halos: dict | None = None):
    """Gradients of :func:`tiled_forward`; ``do (B, N, H, Dv)``, ``dlse (B, N, H)`` or None, ``halos`` from it."""
    B, N, H, D = q.shape
    Hkv, Dv = k.shape[2], v.shape[3]
    M, Hk = plan.M, plan.Hk
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dk = torch.zeros(B, N, Hkv, D, dtype=acc, device=q.device)  # halos overlap: accumulate
    dv = torch.zeros(B, N, Hkv, Dv, dtype=acc, device=q.device)
    dq = torch.empty(B, N, H, D, dtype=q.dtype, device=q.device)
    for ch in plan.chunks(_step(plan, B, H, Hkv, D, Dv, q.element_size(), can_fuse(q, v) and dlse is None)):
        C = ch.hi - ch.lo
        qidx, kidx = ch.qidx.to(q.device), ch.kidx.to(q.device)
        doc = _rows(do, qidx, ch.qaff, C, M)
        keep = None
        if not ch.all_valid:  # padded slots repeat a real query: they must not feed dK/dV
            keep = ch.qvalid.to(q.device).view(C, 1, M).repeat(B, 1, 1)  # (B*C, 1, M)
            doc = doc * keep[..., None].to(doc.dtype)
        lse_c = lse.index_select(1, qidx).view(B * C, M, H).transpose(1, 2).contiguous()  # (B*C, H, M)
        dlse_c = None
        if dlse is not None:
            dlse_c = dlse.index_select(1, qidx).view(B * C, M, H).transpose(1, 2)  # (B*C, H, M)
            dlse_c = dlse_c if keep is None else dlse_c * keep.to(dlse_c.dtype)
        kv = (halos or {}).pop((ch.lo, ch.hi), None)
        pooled: list[torch.Tensor] = []
        kc, vc, pooled = kv if kv is not None else (_rows(k, kidx, ch.kaff, C, Hk, pooled),
                                                    _rows(v, kidx, ch.kaff, C, Hk, pooled), pooled)
        dq_c, dk_c, dv_c = chunk_backward(doc, _rows(q, qidx, ch.qaff, C, M), kc, vc, _rows(out, qidx, ch.qaff, C, M),
                                          lse_c, _bias(plan, ch, q, B), scale, dlse_c)
        del kc, vc
        _give(*pooled)
        _put(dq, ch, dq_c.transpose(1, 2).reshape(B, C * M, H, D))  # (B, C*M, H, D)
        _scatter_add(dk, kidx, dk_c.transpose(1, 2).reshape(B, C * Hk, Hkv, D).to(acc))
        _scatter_add(dv, kidx, dv_c.transpose(1, 2).reshape(B, C * Hk, Hkv, Dv).to(acc))
    return dq, dk.to(q.dtype), dv.to(q.dtype)


class TiledNA(torch.autograd.Function):
    """Autograd wrapper: saves only ``q, k, v, out, lse``; backward recomputes chunk by chunk."""

    @staticmethod
    def forward(ctx, q, k, v, plan, scale):
        recycle_work_buffers()
        B, _, Hkv, D = k.shape
        keep = plan.nt * plan.Hk * B * Hkv * (D + v.shape[-1]) * k.element_size() <= _KEEP_HALO_BYTES
        halos = {} if keep and any(ctx.needs_input_grad[:3]) else None  # reused by backward, no regather
        out, lse = tiled_forward(q, k, v, plan, scale, halos)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale, ctx.halos = plan, scale, halos
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = tiled_backward(dout.contiguous(), q, k, v, out, lse, ctx.plan, ctx.scale,
                                    None if dlse is None else dlse.contiguous(), ctx.halos)
        ctx.halos = None
        return dq, dk, dv, None, None


def neighborhood_tiled(q, k, v, plan: TilePlan, scale: float):
    """q ``(B, N, H, D)`` flattened row-major -> ``out (B, N, H, Dv)``, ``lse (B, N, H)`` (fp32/fp64)."""
    return TiledNA.apply(q.contiguous(), k.contiguous(), v.contiguous(), plan, scale)
