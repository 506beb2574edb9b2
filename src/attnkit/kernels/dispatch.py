"""Key-major ("dispatch") engine for per-token routes over contiguous key blocks.

Token-routed mechanisms (MoBA's per-query top-k, VMoBA's global selection) give every query its
own set of key blocks. A union layout per query tile (the block-gather engine) then attends far
more than was chosen, plus a per-token mask. The MoBA paper's own fast path is the other way
round: per (batch, head, key block), gather the queries that chose that block, attend the whole
block (no mask: it is entirely visible), and merge each query's partial results by their
log-sum-exps. Work is proportional to the selected (query, block) pairs, and the key block is a
strided view of K/V, never a copy.

An optional *diagonal* part gives each query ``t`` its own block ``t // bs`` (causally masked or
full) as one batched call over all blocks; MoBA's causal own block and VMoBA's forced own block
(in partition order) are this part.

With ``fused=None`` on the CPU in float32/bfloat16/float16 (block a multiple of 16, no ragged last
key block) both parts run on the compiled tile kernel (``kernels/flash.py``), forward and backward:
the gathered query tiles against K/V laid out block-major, and the own block as a block-diagonal tile
list (:func:`dispatch_kernel_reason` says when not). Otherwise two paths, chosen by the caller through
``fused``: each part on torch's fused CPU flash-attention
op (it returns the log-sum-exp; no backward) with the merge an in-place rescaling into one
accumulator per query, or the explicit softmax of ``attend_gathered`` with the partials merged
by differentiable scatter-adds. Cost: ``O(P * bs * D)`` for ``P`` selected pairs plus ``O(N * bs * D)`` for the
diagonal; memory: ``O(N * Dv)`` without autograd.
"""

from __future__ import annotations

import math

import torch

from attnkit._validate import check_qkv, int_arg, resolve_scale
from attnkit.kernels import alloc
from attnkit.kernels.flash import TileList, flash_attention, native_reason
from attnkit.kernels.fused import fused_check, fused_ops
from attnkit.kernels.gather import attend_gathered, compute_dtype, needs_grad
from attnkit.kernels.tiles import layout_tile_list
from attnkit.masks.causal import causal as causal_mask

_TILE = 128  # query rows per tile: pads < 128 rows per (batch, head, block) group
_KERNEL_TILE = 64  # the same on the tile kernel (its query tile)




def _tiles(sel: torch.Tensor, tile: int):
    """Pack the (query, block) pairs of ``sel (B, Hq, N, n)`` into query tiles of one key block each.

    Returns ``rows (nt, tile)`` flat query rows ``(b * Hq + h) * N + t`` (padding = ``B*Hq*N``, a
    dummy row), ``tgrp (nt,)`` the flat group ``(b * Hq + h) * n + j`` of each tile, and per
    non-empty group its id, first tile and tile count (tiles of a group are consecutive).
    """
    B, hq, N, n = sel.shape
    dev = sel.device
    b_i, h_i, j_i, t_i = sel.permute(0, 1, 3, 2).nonzero(as_tuple=True)  # sorted by (b, h, j, t), each (P,)
    grp = (b_i * hq + h_i) * n + j_i  # (P,)
    counts = torch.bincount(grp, minlength=B * hq * n)  # (G,)
    starts = torch.cumsum(counts, 0) - counts
    ntile_g = (counts + tile - 1) // tile
    tstart = torch.cumsum(ntile_g, 0) - ntile_g
    pos = torch.arange(grp.numel(), device=dev) - starts[grp]
    tid = tstart[grp] + pos // tile  # (P,) tile of each pair
    nt = int(ntile_g.sum())
    rows = torch.full((nt * tile,), B * hq * N, dtype=torch.long, device=dev)
    rows[tid * tile + pos % tile] = (b_i * hq + h_i) * N + t_i
    tgrp = torch.zeros(nt, dtype=torch.long, device=dev)
    tgrp[tid] = grp
    gid = torch.nonzero(ntile_g).squeeze(1)  # (G',) non-empty groups
    return rows.view(nt, tile), tgrp, (gid, tstart[gid], ntile_g[gid])


def routed_block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sel: torch.Tensor,
                           block_size: int, *, diag: str | None = None,
                           scale: float | None = None, fused: bool | None = None) -> torch.Tensor:
    """Each query attends every key of its selected key blocks (plus optionally its own block).

    Args:
        q: ``(B, N, Hq, D)``; k: ``(B, Nk, Hkv, D)``; v: ``(B, Nk, Hkv, Dv)``; ``Hq % Hkv == 0``.
        sel: bool ``(B, Hq, N, n)``, ``n = ceil(Nk / block_size)``: query ``t`` attends all keys of
            block ``j`` iff ``sel[b, h, t, j]`` (the last block may be partial). With ``diag`` set,
            ``sel`` must not contain the query's own block.
        block_size: key block ``bs``.
        diag: ``None``, ``"causal"`` (query ``t`` also attends keys ``j * bs <= u <= t`` of its own
            block ``j = t // bs``) or ``"full"`` (all of its own block); needs ``N == Nk``.
        scale: logit scale, default ``D ** -0.5``.
        fused: run every part on the fused CPU op (True; ValueError when it cannot: an input needs
            a gradient, or ``kernels.fused.fused_check`` fails), on the differentiable matmul
            softmax (False), or None: fused exactly when no input needs a gradient, the input is
            not float64 (the fused exp is approximate) and ``fused_check`` passes. Ops pass it
            explicitly and show the choice in ``explain``.

    Returns:
        ``(B, N, Hq, Dv)``; a query with no key at all gets zeros.

    Example:
        >>> q = k = v = torch.randn(1, 1024, 4, 32)
        >>> sel = torch.zeros(1, 4, 1024, 8, dtype=torch.bool); sel[..., 512:, 0] = True
        >>> out = routed_block_attention(q, k, v, sel, 128, diag="causal")  # own block + block 0
    """
    hq, hkv = check_qkv(q, k, v)
    int_arg("block_size", block_size, 1)
    if diag not in (None, "causal", "full"):
        raise ValueError(f"diag must be None, 'causal' or 'full', got {diag!r}")
    B, N, _, D = q.shape
    Nk, Dv = k.shape[1], v.shape[-1]
    bs = block_size
    n = math.ceil(Nk / bs)
    if not isinstance(sel, torch.Tensor) or sel.dtype != torch.bool or tuple(sel.shape) != (B, hq, N, n):
        raise ValueError(f"sel must be a bool tensor (B, Hq, N, n) = {(B, hq, N, n)}, got "
                         f"{getattr(sel, 'dtype', type(sel).__name__)} {tuple(getattr(sel, 'shape', ()))}")
    if diag is not None and N != Nk:
        raise ValueError(f"diag needs self-attention (N == Nk), got N={N}, Nk={Nk}")
    scale = resolve_scale(scale, D)
    if fused is None and dispatch_kernel_reason(q, bs, Nk) is None and native_reason(q) is None:
        return _on_kernel(q, k, v, sel, bs, diag, scale)
    cdt = compute_dtype(q.dtype)
    grad = needs_grad(q, k, v)
    ok, why = fused_check(q, v)
    if fused is None:
        # fp64 keeps the matmul path: the fused kernel's exp is approximate (~1e-9 relative)
        fused = ok and not grad and cdt != torch.float64
    elif fused and grad:
        raise ValueError("fused=True cannot run: inputs require grad (the fused op has no backward)")
    elif fused and not ok:
        raise ValueError(f"fused=True cannot run: {why}")
    fwd = fused_ops()[0] if fused else None
    g = hq // hkv
    qh = q.to(cdt).transpose(1, 2).contiguous()  # (B, Hq, N, D)
    kh = k.to(cdt).transpose(1, 2).contiguous()  # (B, Hkv, Nk, D)
    vh = v.to(cdt).transpose(1, 2).contiguous()  # (B, Hkv, Nk, Dv)
    pad = n * bs - Nk
    # key blocks as (B*Hkv*n, bs, X), zero-padded; a tile's block is one index_select row
    kb = _pad(kh, pad).view(B, hkv, n, bs, D).reshape(B * hkv * n, bs, D)  # (B*Hkv*n, bs, D)
    vb = _pad(vh, pad).view(B, hkv, n, bs, Dv).reshape(B * hkv * n, bs, Dv)  # (B*Hkv*n, bs, Dv)
    rows, tgrp, groups = _tiles(sel, _TILE)

    def kv_of(gr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # flat group -> (key-block id, block)
        return (gr // (hq * n) * hkv + gr // n % hq // g) * n + gr % n, gr % n
    # padded keys of a ragged last block: -inf bias for the tiles reading it
    kbias = None
    if pad:
        kbias = torch.zeros(n, bs, dtype=cdt, device=q.device)
        kbias[-1, bs - pad:] = float("-inf")
    qf = torch.cat([qh.reshape(B * hq * N, D), qh.new_zeros(1, D)])  # (B*Hq*N + 1, D): last row = padding
    own = _diag(fwd, qh, kh, vh, diag, bs, n, scale) if diag is not None else None  # (B*Hq*N, Dv), (B*Hq*N,)
    if rows.shape[0] == 0:
        if own is None:
            return q.new_zeros(B, N, hq, Dv)
        return own[0].view(B, hq, N, Dv).transpose(1, 2).to(q.dtype)
    if fwd is not None:
        tiles = _tile_attention_fused(fwd, qf, kb, vb, rows, groups, kv_of, kbias, scale)
    else:
        kv_id, tj = kv_of(tgrp)
        tiles = _tile_attention(qf, kb, vb, rows, kv_id, None if kbias is None else kbias[tj], scale)
    out = _merge(own, tiles, rows, B * hq * N)  # (B*Hq*N, Dv)
    return out.view(B, hq, N, Dv).transpose(1, 2).to(q.dtype)  # (B, N, Hq, Dv)


def dispatch_kernel_reason(q: torch.Tensor, bs: int, nk: int) -> str | None:
    """None when :func:`routed_block_attention` (with ``fused=None``) runs on the compiled tile kernel, else why not."""
    why = native_reason(q, build=False)
    if why is not None:
        return why
    if bs % 16:
        return f"block {bs} is not a multiple of 16"
    if nk % bs:
        return f"ragged last key block ({nk} keys, block {bs})"
    return None


def _on_kernel(q, k, v, sel, bs, diag, scale):
    """Key-major dispatch on the tile kernel: the gathered query tiles (one key block each) are one kernel
    call over K/V laid out block-major ``(B*Hkv*n blocks)``, the own block another (a block-diagonal tile
    list, causal or full); partials merged by log-sum-exp. Differentiable end to end (kernel backward)."""
    B, N, hq, D = q.shape
    Nk, hkv, Dv = k.shape[1], k.shape[2], v.shape[-1]
    n, g = Nk // bs, hq // hkv
    rows, tgrp, _ = _tiles(sel, _KERNEL_TILE)
    own = None
    if diag is not None:
        lay = torch.eye(n, dtype=torch.bool)
        tl = layout_tile_list(lay[None, None], bs, bs, N, Nk, causal_mask() if diag == "causal" else None)
        od, ld = flash_attention(q, k, v, tl, scale)  # (B, N, Hq, Dv), (B, N, Hq)
        own = (od.transpose(1, 2).reshape(B * hq * N, Dv).float(), ld.transpose(1, 2).reshape(-1))
    if rows.shape[0] == 0:
        if own is None:
            return q.new_zeros(B, N, hq, Dv)
        return own[0].view(B, hq, N, Dv).transpose(1, 2).to(q.dtype)
    qf = torch.cat([q.transpose(1, 2).reshape(B * hq * N, D), q.new_zeros(1, D)])  # (B*Hq*N + 1, D)
    qg = qf.index_select(0, rows.reshape(-1)).view(1, -1, 1, D)  # (1, nt*T, 1, D): tile-major queries
    kb = k.transpose(1, 2).reshape(1, B * hkv * Nk, 1, D)  # (1, B*Hkv*Nk, 1, D): key blocks consecutive
    vb = v.transpose(1, 2).reshape(1, B * hkv * Nk, 1, Dv)
    bk = 64 if bs % 64 == 0 else (32 if bs % 32 == 0 else 16)
    per = bs // bk
    kv_id = (tgrp // (hq * n) * hkv + tgrp // n % hq // g) * n + tgrp % n  # (nt,) key block of each tile
    nt = rows.shape[0]
    cols = (kv_id[:, None] * per + torch.arange(per)).reshape(-1)  # (nt*per,) its kernel key tiles
    tl = TileList(_KERNEL_TILE, bk, (torch.arange(nt + 1) * per).view(1, 1, -1), cols.contiguous(),
                  torch.full((cols.numel(),), -1, dtype=torch.long), torch.zeros(1, 1, 1, _KERNEL_TILE, -(-bk // 64),
                                                                                    dtype=torch.long),
                  _KERNEL_TILE * bs)
    ot, lt = flash_attention(qg, kb, vb, tl, scale)  # (1, nt*T, 1, Dv), (1, nt*T, 1)
    out = _merge(own, (ot.view(-1, Dv).float(), lt.view(-1)), rows, B * hq * N)  # (B*Hq*N, Dv)
    return out.view(B, hq, N, Dv).transpose(1, 2).to(q.dtype)  # (B, N, Hq, Dv)


def _pad(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Zero-pad ``x (B, H, N, X)`` along N."""
    return torch.cat([x, x.new_zeros(*x.shape[:2], pad, x.shape[-1])], 2) if pad else x


def _tile_attention(qf, kb, vb, rows, kv_id, bias, scale):
    """Differentiable: every tile with its gathered key block, chunked -> ``(out (nt*T, Dv), lse (nt*T,))``."""
    nt, tile = rows.shape
    D, Dv, bs = qf.shape[-1], vb.shape[-1], kb.shape[1]
    chunk = max(1, alloc.CHUNK_BYTES // (tile * (bs + D + Dv) * qf.element_size()))
    outs, lses = [], []
    for i0 in range(0, nt, chunk):
        i1 = min(nt, i0 + chunk)
        kv = kv_id[i0:i1]
        o, l = attend_gathered(qf[rows[i0:i1]], kb[kv], vb[kv], None, scale,
                               None if bias is None else bias[i0:i1].unsqueeze(1))  # (c, T, Dv), (c, T)
        outs.append(o.reshape(-1, Dv))
        lses.append(l.reshape(-1))
    return torch.cat(outs), torch.cat(lses)


def _tile_attention_fused(fwd, qf, kb, vb, rows, groups, kv_of, kbias, scale):
    """No autograd: groups with the same tile count run as one fused call, their tiles as query heads
    sharing one key head (the op's GQA), so a key block is read once per group, never copied per tile."""
    nt, tile = rows.shape
    D, Dv, bs = qf.shape[-1], vb.shape[-1], kb.shape[1]
    gid, tstart, ntile = groups
    out = qf.new_empty(nt, tile, Dv)
    lse = qf.new_empty(nt, tile)
    per_group_rows = max(1, alloc.CHUNK_BYTES // ((bs + D + Dv) * qf.element_size()))
    for c in torch.unique(ntile).tolist():
        pick = ntile == c
        tix = (tstart[pick].unsqueeze(1) + torch.arange(c, device=rows.device))  # (Gc, c) tile ids
        kv, blk = kv_of(gid[pick])  # (Gc,)
        step = max(1, per_group_rows // (c * tile))
        for g0 in range(0, tix.shape[0], step):
            t_c, kv_c = tix[g0:g0 + step], kv[g0:g0 + step]
            gc = t_c.shape[0]
            qt = qf.index_select(0, rows[t_c.reshape(-1)].reshape(-1)).view(gc, c, tile, D)  # (Gc, c, T, D)
            bias = None if kbias is None else kbias[blk[g0:g0 + step]].view(gc, 1, 1, bs)
            o, l = fwd(qt, kb.index_select(0, kv_c).unsqueeze(1), vb.index_select(0, kv_c).unsqueeze(1),
                       attn_mask=bias, scale=scale)  # (Gc, c, T, Dv), (Gc, c, T)
            out.index_copy_(0, t_c.reshape(-1), o.reshape(-1, tile, Dv))
            lse.index_copy_(0, t_c.reshape(-1), l.reshape(-1, tile))
    return out.view(-1, Dv), lse.view(-1)


def _diag(fwd, qh, kh, vh, diag, bs, n, scale):
    """Own-block attention of every query: ``(out (B*Hq*N, Dv), lse (B*Hq*N,))``."""
    B, hq, N = qh.shape[:3]
    g = hq // kh.shape[1]
    kh, vh = (t.repeat_interleave(g, 1) if g > 1 else t for t in (kh, vh))  # (B, Hq, N, *)
    full = N // bs  # complete blocks; a ragged last block runs apart on its real tokens
    outs, lses = [], []
    for lo, hi, nb, b in ((0, full * bs, full, bs), (full * bs, N, 1, N - full * bs)):
        if hi <= lo:
            continue
        qd, kd, vd = (t[:, :, lo:hi].reshape(B * hq * nb, b, t.shape[-1]) for t in (qh, kh, vh))  # (B*Hq*nb, b, *)
        if fwd is not None:
            o, l = fwd(qd.unsqueeze(1), kd.unsqueeze(1), vd.unsqueeze(1), is_causal=diag == "causal", scale=scale)
            o, l = o.squeeze(1), l.squeeze(1)
        else:
            ok = torch.ones(b, b, dtype=torch.bool, device=qh.device)
            o, l = attend_gathered(qd, kd, vd, ok.tril() if diag == "causal" else None, scale)
        outs.append(o.reshape(B, hq, hi - lo, -1))
        lses.append(l.reshape(B, hq, hi - lo))
    return torch.cat(outs, 2).reshape(B * hq * N, -1), torch.cat(lses, 2).reshape(-1)


def _merge(own, tiles, rows, n_rows):
    """Log-sum-exp merge of the own-block part (or None) and the tile partials into ``(n_rows, Dv)``;
    differentiable (the shift is detached)."""
    ix_t = rows.reshape(-1)
    ot, lt = tiles
    has_diag = own is not None
    if has_diag:
        od, ld = own
        top = ld.detach().clone()  # the own block is never empty: a finite shift for every row
        top = torch.cat([top, top.new_zeros(1)]).scatter_reduce(0, ix_t, lt.detach(), "amax")
    else:
        top = torch.full((n_rows + 1,), float("-inf"), dtype=lt.dtype, device=lt.device)
        top = top.scatter_reduce(0, ix_t, lt.detach(), "amax")
        top = torch.where(torch.isfinite(top), top, 0.0)
    wt = torch.exp(lt - top[ix_t])  # (P',)
    den = torch.zeros(n_rows + 1, dtype=lt.dtype, device=lt.device).index_add(0, ix_t, wt)
    acc = torch.zeros(n_rows + 1, ot.shape[-1], dtype=ot.dtype, device=ot.device)
    if ot.requires_grad or wt.requires_grad:
        acc = acc.index_add(0, ix_t, ot * wt.unsqueeze(-1))
    else:  # inference: weight the tile outputs in place (a fresh (P', Dv) buffer page-faults)
        acc.index_add_(0, ix_t, ot.mul_(wt.unsqueeze(-1)))
    den, acc = den[:n_rows], acc[:n_rows]
    if has_diag:
        wd = torch.exp(ld - top[:n_rows])
        den = den + wd
        acc = acc + od * wd.unsqueeze(-1)
    return acc / torch.where(den > 0, den, 1.0).unsqueeze(-1)
