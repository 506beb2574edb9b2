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

_CHUNK_BYTES = 256 << 20  # gathered rows, gradients (and scores on the matmul path) per chunk
_KEEP_HALO_BYTES = 256 << 20  # forward's gathered K/V halos kept for backward when at most this big


def _flash_ops():
    fwd = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    return (fwd, bwd) if fwd is not None and bwd is not None else (None, None)


def use_flash(q: torch.Tensor, v: torch.Tensor) -> bool:
    """The fused CPU kernel needs a CPU tensor and ``Dv == D``."""
    return q.device.type == "cpu" and q.shape[-1] == v.shape[-1] and _flash_ops()[0] is not None


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
# On a busy machine every parallel op pays a thread wake-up, so the loops below keep the number
# of ops per chunk small: 1-D chunks are strided views (no gather), others do one gather for
# queries and one for keys+values, and outputs are scattered back once at the end.

def _step(plan: TilePlan, B: int, H: int, Hkv: int, D: int, Dv: int, itemsize: int, fused: bool) -> int:
    """Tiles per chunk so that the chunk's gathers, gradients (and fallback scores) stay within ``_CHUNK_BYTES``."""
    per_tile = B * 2 * (plan.Hk * Hkv * (D + Dv) + plan.M * H * (D + 2 * Dv)) * itemsize
    if not fused:
        per_tile += B * plan.M * H * plan.Hk * 4 * 3  # scores, probabilities, dS on the matmul path
    return max(1, _CHUNK_BYTES // max(per_tile, 1))


def _view(x: torch.Tensor, aff: tuple[int, int, int], C: int, R: int) -> torch.Tensor:
    """Rows ``off + c*cs + r*rs`` of ``x (1, N, H, Dx)`` as a ``(C, H, R, Dx)`` strided view (no copy)."""
    _, _, H, Dx = x.shape
    off, cs, rs = aff
    return x.as_strided((C, H, R, Dx), (cs * H * Dx, Dx, rs * H * Dx, 1), x.storage_offset() + off * H * Dx)


def _rows(x: torch.Tensor, idx: torch.Tensor, aff, C: int, R: int) -> torch.Tensor:
    """Rows ``idx`` of ``x (B, N, H, Dx)`` as ``(B*C, H, R, Dx)``: a strided view when affine (B=1), else one gather."""
    if aff is not None and x.shape[0] == 1:
        return _view(x, aff, C, R)
    B, _, H, Dx = x.shape
    return x.index_select(1, idx).view(B * C, R, H, Dx).transpose(1, 2)  # (B*C, H, R, Dx)


def _bias(plan: TilePlan, ch, x: torch.Tensor, B: int) -> torch.Tensor | None:
    bias = plan.chunk_bias(ch, x.dtype, x.device)  # None, (1, 1, M, Hk) or (C, 1, M, Hk)
    if bias is not None and B > 1 and bias.shape[0] > 1:
        bias = bias.repeat(B, 1, 1, 1)  # (B*C, 1, M, Hk): batch-major like the gathered rows
    return bias


def _untile(plan: TilePlan, parts: list[torch.Tensor]) -> torch.Tensor:
    """Tile-major chunk results ``(B, C*M, ...)`` -> token order ``(B, N, ...)``."""
    x = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
    if plan.inv_is_identity:
        return x.contiguous()
    return x.index_select(1, plan.inv.to(x.device))


def tiled_forward(q, k, v, plan: TilePlan, scale: float, halos: dict | None = None):
    """q ``(B, N, H, D)``, k/v ``(B, N, Hkv, D|Dv)`` (contiguous) -> out ``(B, N, H, Dv)``, lse ``(B, N, H)``.

    ``halos``: if a dict is given, each chunk's gathered ``(k, v)`` halos are stored in it by
    ``(lo, hi)`` so a backward pass can reuse them instead of gathering again.
    """
    B, _, H, D = q.shape
    Hkv, Dv = k.shape[2], v.shape[3]
    M, Hk = plan.M, plan.Hk
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    outs, lses = [], []
    for ch in plan.chunks(_step(plan, B, H, Hkv, D, Dv, q.element_size(), use_flash(q, v))):
        C = ch.hi - ch.lo
        qidx, kidx = ch.qidx.to(q.device), ch.kidx.to(q.device)
        kc, vc = _rows(k, kidx, ch.kaff, C, Hk), _rows(v, kidx, ch.kaff, C, Hk)
        if halos is not None:
            halos[ch.lo, ch.hi] = (kc, vc)
        o, lse = chunk_forward(_rows(q, qidx, ch.qaff, C, M), kc, vc, _bias(plan, ch, q, B), scale)
        outs.append(o.transpose(1, 2).reshape(B, C * M, H, Dv))  # (B, C*M, H, Dv); a view for the fused kernel
        lses.append(lse.transpose(1, 2).reshape(B, C * M, H))  # (B, C*M, H)
    return _untile(plan, outs), _untile(plan, lses).to(lse_dtype)


def tiled_backward(do, q, k, v, out, lse, plan: TilePlan, scale: float, dlse=None, halos: dict | None = None):
    """Gradients of :func:`tiled_forward`; ``do (B, N, H, Dv)``, ``dlse (B, N, H)`` or None, ``halos`` from it."""
    B, N, H, D = q.shape
    Hkv, Dv = k.shape[2], v.shape[3]
    M, Hk = plan.M, plan.Hk
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dk = torch.zeros(B, N, Hkv, D, dtype=acc, device=q.device)  # halos overlap: accumulate
    dv = torch.zeros(B, N, Hkv, Dv, dtype=acc, device=q.device)
    dqs = []
    for ch in plan.chunks(_step(plan, B, H, Hkv, D, Dv, q.element_size(), use_flash(q, v) and dlse is None)):
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
        kv = (halos or {}).get((ch.lo, ch.hi))
        kc, vc = kv if kv is not None else (_rows(k, kidx, ch.kaff, C, Hk), _rows(v, kidx, ch.kaff, C, Hk))
        dq_c, dk_c, dv_c = chunk_backward(doc, _rows(q, qidx, ch.qaff, C, M), kc, vc, _rows(out, qidx, ch.qaff, C, M),
                                          lse_c, _bias(plan, ch, q, B), scale, dlse_c)
        dqs.append(dq_c.transpose(1, 2).reshape(B, C * M, H, D))  # (B, C*M, H, D)
        dk.index_add_(1, kidx, dk_c.transpose(1, 2).reshape(B, C * Hk, Hkv, D).to(acc))
        dv.index_add_(1, kidx, dv_c.transpose(1, 2).reshape(B, C * Hk, Hkv, Dv).to(acc))
    return _untile(plan, dqs), dk.to(q.dtype), dv.to(q.dtype)


class TiledNA(torch.autograd.Function):
    """Autograd wrapper: saves only ``q, k, v, out, lse``; backward recomputes chunk by chunk."""

    @staticmethod
    def forward(ctx, q, k, v, plan, scale):
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
