"""Inference fast path of PSA's pyramid attention (arXiv 2512.04025) on torch's fused CPU op.

Same result as ``pyramid_sparse_attention``'s general path (one softmax over every visible
pooled token, ``+ln r`` per level), computed without per-element masks:

* each chunk of query blocks gathers, per level, only as many selected blocks as its fullest
  row has (causal rows have few candidates early and many late, so a global maximum would
  double the work), and a per-row additive mask ``(rows, L)`` carries ``ln r`` and ``-inf``
  for padded slots -- broadcast over the rows of a block, never ``(bq, L)`` per element;
* causal (``block_q % block_kv == 0``, diagonal KV blocks at factor 1, as ``psa_level_map``
  makes them): every pooled token of a KV block that starts before the query block is wholly
  in the past, so the only causal mask is inside the query block's own span. That part runs
  as one block-diagonal causal call at full resolution, the rest unmasked, and the two merge
  by log-sum-exp.

Without autograd only: the ``fused`` backend of ``pyramid_sparse_attention`` / ``psa_attention``.
"""

from __future__ import annotations

import math

import torch

from attnkit.kernels import alloc
from attnkit.kernels.fused import fused_ops
from attnkit.kernels.gather import layout_indices
from attnkit.kernels.merge import merge_partials


def causal_diag_ok(lm: torch.Tensor, block_q: int, block_kv: int, N: int) -> bool:
    """True when the causal split applies: ``block_q % block_kv == 0`` and every query block's own
    KV blocks are at factor 1 in ``lm (B, Hq, nqb, nkb)``."""
    if block_q % block_kv:
        return False
    nqb, nkb = lm.shape[-2:]
    per = block_q // block_kv
    j = torch.arange(nkb, device=lm.device)
    i = torch.arange(nqb, device=lm.device).unsqueeze(1)
    own = (j >= i * per) & (j < (i + 1) * per)  # (nqb, nkb)
    return bool((lm[..., own] == 1).all())


def pyramid_fused(q, k, v, lm, factors, block_q, block_kv, causal, scale):
    """``q (B, Nq, Hq, D)``, ``k, v (B, Nk, Hkv, D)`` (``Nk % block_kv == 0``), ``lm (B, Hq, nqb, nkb)``
    pool factors -> ``(B, Nq, Hq, D)``. Causal needs :func:`causal_diag_ok`."""
    fwd = fused_ops()[0]
    B, Nq, hq, D = q.shape
    Nk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    nqb, nkb = lm.shape[-2:]
    dev, dt = q.device, q.dtype
    if causal:  # off-diagonal part: drop the own span and anything after it (handled by the diagonal call)
        per = block_q // block_kv
        j = torch.arange(nkb, device=dev)
        lm = lm.masked_fill(j >= torch.arange(nqb, device=dev).unsqueeze(1) * per, 0)
    pad_q = nqb * block_q - Nq
    qh = q.transpose(1, 2)  # (B, Hq, Nq, D) view
    if pad_q:
        qh = torch.cat([qh, qh.new_zeros(B, hq, pad_q, D)], 2)
    qb = qh.reshape(B * hq, nqb, block_q, D)  # (B*Hq, nqb, bq, D)
    # one bank of every level's pooled tokens in granules of gr tokens (gr = the smallest pooled
    # block), so that one index_select per chunk gathers a row's blocks of all levels
    gr = block_kv // factors[-1]
    kbank, vbank, sels, off = [], [], [], 0
    for r in factors:
        kr = k.view(B, Nk // r, r, hkv, D).mean(2).transpose(1, 2)  # (B, Hkv, Nk/r, D)
        vr = v.view(B, Nk // r, r, hkv, D).mean(2).transpose(1, 2)
        kbank.append(kr.reshape(B, hkv, -1, gr, D))  # (B, Hkv, Nk/r/gr, gr, D)
        vbank.append(vr.reshape(B, hkv, -1, gr, D))
        idx, valid = layout_indices(lm == r)  # (B, Hq, nqb, kmax): selected blocks first, ascending
        sels.append((idx.reshape(B * hq, nqb, -1), valid.reshape(B * hq, nqb, -1), off, block_kv // r // gr, r))
        off += nkb * (block_kv // r // gr)
    kb = torch.cat(kbank, 2).reshape(-1, gr, D)  # (B*Hkv*off, gr, D)
    vb = torch.cat(vbank, 2).reshape(-1, gr, D)
    out = q.new_empty(B * hq, nqb, block_q, D)
    lse = q.new_empty(B * hq, nqb, block_q)
    kvh = (torch.arange(B * hq, device=dev) // hq) * hkv + torch.arange(B * hq, device=dev) % hq // g  # (B*Hq,)
    # granules of each row (all levels), selected first per level
    ids = torch.cat([(kvh.view(-1, 1, 1, 1) * off + o + idx.unsqueeze(-1) * per + torch.arange(per, device=dev))
                     .flatten(-2) for idx, _, o, per, _ in sels], -1)  # (B*Hq, nqb, G)
    okg = torch.cat([valid.unsqueeze(-1).expand(*valid.shape, per).flatten(-2) for _, valid, _, per, _ in sels], -1)
    lng = torch.cat([torch.full((valid.shape[-1] * per,), math.log(r), dtype=dt, device=dev)
                     for _, valid, _, per, r in sels])  # (G,) ln r per granule slot
    # per chunk only the slots some row of the chunk uses: order slots so used ones come first
    order = torch.sort(okg.to(torch.int8), dim=-1, descending=True, stable=True).indices  # (B*Hq, nqb, G)
    ids, okg = torch.gather(ids, -1, order), torch.gather(okg, -1, order)
    bias_all = torch.where(okg, lng[order], float("-inf")).to(dt)  # (B*Hq, nqb, G)
    used = okg.sum(-1)  # (B*Hq, nqb) granules per row
    gmax = max(1, int(used.max()))
    chunk = max(1, min(nqb, alloc.CHUNK_BYTES // max(1, B * hq * gmax * gr * 2 * D * 4)))
    kbuf = kb.new_empty(B * hq * chunk * gmax, gr, D)
    vbuf = vb.new_empty(B * hq * chunk * gmax, gr, D)
    for i0 in range(0, nqb, chunk):
        i1 = min(nqb, i0 + chunk)
        c = i1 - i0
        gc = int(used[:, i0:i1].max())
        if gc == 0:  # no off-diagonal key for any row of this chunk
            out[:, i0:i1] = 0.0
            lse[:, i0:i1] = float("-inf")
            continue
        fl = ids[:, i0:i1, :gc].reshape(-1)
        kg = torch.index_select(kb, 0, fl, out=kbuf[: fl.numel()]).view(B * hq, c, gc * gr, D)
        vg = torch.index_select(vb, 0, fl, out=vbuf[: fl.numel()]).view(B * hq, c, gc * gr, D)
        bias = bias_all[:, i0:i1, :gc].repeat_interleave(gr, -1)  # (B*Hq, c, gc*gr)
        o, l = fwd(qb[:, i0:i1], kg, vg, attn_mask=bias.unsqueeze(-2), scale=scale)  # (B*Hq, c, bq, D), (.., bq)
        empty = used[:, i0:i1] == 0  # (B*Hq, c): rows with no visible off-diagonal token
        if bool(empty.any()):
            o = o.masked_fill(empty[..., None, None], 0.0)
            l = l.masked_fill(empty[..., None], float("-inf"))
        out[:, i0:i1], lse[:, i0:i1] = o, l
    if causal:  # own span: block-diagonal causal attention at full resolution, merged by log-sum-exp
        full = Nq // block_q
        m = full * block_q
        # heads stay in the head dim (strided views of the heads-last inputs when B=1, no transposed copies);
        # and B*full items of Hq heads run ~1.7x faster than B*Hq*full single-head items
        qv, kv_, vv = (t[:, :m].reshape(B * full, block_q, t.shape[2], D).transpose(1, 2) for t in (q, k, v))
        if g > 1:
            kv_, vv = kv_.repeat_interleave(g, 1), vv.repeat_interleave(g, 1)  # (B*full, Hq, bq, D)
        od, ld = fwd(qv, kv_, vv, is_causal=True, scale=scale)  # (B*full, Hq, bq, D), (B*full, Hq, bq)
        od = od.view(B, full, hq, block_q, D).transpose(1, 2).reshape(B * hq, full, block_q, D)
        ld = ld.view(B, full, hq, block_q).transpose(1, 2).reshape(B * hq, full, block_q)
        if full < nqb:  # ragged last query block: its real rows against its real keys
            r0 = Nq - m
            kd, vd = (t.transpose(1, 2).repeat_interleave(g, 1) if g > 1 else t.transpose(1, 2) for t in (k, v))
            o2, l2 = fwd(qb[:, full:, :r0], kd[:, :, m:Nq].reshape(B * hq, 1, r0, D),
                         vd[:, :, m:Nq].reshape(B * hq, 1, r0, D), is_causal=True, scale=scale)
            od = torch.cat([od, torch.cat([o2, o2.new_zeros(B * hq, 1, block_q - r0, D)], 2)], 1)
            ld = torch.cat([ld, torch.cat([l2, l2.new_zeros(B * hq, 1, block_q - r0)], 2)], 1)
        out, _ = merge_partials(od, ld, out, lse)  # ld is finite: every query sees itself
    out = out.view(B, hq, nqb * block_q, D)[:, :, :Nq]  # (B, Hq, Nq, D)
    return out.transpose(1, 2)  # (B, Nq, Hq, D)
