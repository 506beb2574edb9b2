"""Tile lists for the compiled tile kernel (``kernels/flash.py``) from routed block layouts.

"FlashAttention-2" (arXiv 2307.08691) restricted to the tiles a routed layout selects, as in
"MoBA: Mixture of Block Attention for Long-Context LLMs" (arXiv 2502.13189) §2.2 and "BiFormer"
(arXiv 2303.08810) §3.2: a per-(batch, head) block layout becomes one kernel entry list per (batch,
head), every selected block split into kernel tiles (FULL unless an element mask cuts it), so the
kernel visits exactly the selected blocks, forward and backward, without gathering K/V.
"""

from __future__ import annotations

import torch

from attnkit.kernels.flash import TileList, native_reason, pack_bits, tile_entries
from attnkit.masks.base import EMPTY, FULL, PARTIAL, Mask

_KERNEL_BQ = 128  # query rows per kernel tile at most (taller tiles pack each K/V tile for more rows)


def kernel_tiles(bq_l: int, bk_l: int) -> tuple[int, int] | None:
    """Kernel tile ``(bq, bk)`` dividing the layout's ``(bq_l, bk_l)`` blocks, or None when the key
    block is not a multiple of 16 keys (the kernel's smallest key tile)."""
    if bk_l % 16:
        return None
    bk = 64 if bk_l % 64 == 0 else (32 if bk_l % 32 == 0 else 16)
    bq = bq_l if bq_l <= _KERNEL_BQ else max(d for d in range(1, _KERNEL_BQ + 1) if bq_l % d == 0)
    if bq < 8:  # e.g. a prime block of 67 rows: tiles would be a few rows tall; take the whole block
        bq = bq_l
    return bq, bk


def gather_kernel_reason(q: torch.Tensor, block_size: tuple[int, int], extra_mask: object, hq: int, hkv: int,
                         lay_heads: int) -> str | None:
    """None when ``block_gather_attention`` can run on the tile kernel, else why not (for ``explain``)."""
    why = native_reason(q, build=False)
    if why is not None:
        return why
    if kernel_tiles(*block_size) is None:
        return f"key block {block_size[1]} is not a multiple of 16"
    if extra_mask is not None and not (isinstance(extra_mask, Mask) and extra_mask.lead_shape == (1, 1)):
        return f"element mask {type(extra_mask).__name__} is not a head-independent ak.masks Mask"
    return None


def layout_tile_list(lay: torch.Tensor, bq_l: int, bk_l: int, nq: int, nk: int, extra: Mask | None) -> TileList:
    """The tile list of a bool layout ``(Lb, Lh, nqb, nkb)`` of ``(bq_l, bk_l)`` blocks (one entry list per
    lead), ANDed with the head-independent element mask ``extra`` (its partial tiles get bitmasks)."""
    bq, bk = kernel_tiles(bq_l, bk_l)
    nqt, nkt = -(-nq // bq), -(-nk // bk)
    lay = lay.cpu()
    qb = torch.arange(nqt) * bq // bq_l  # (nqt,) layout block of each kernel query tile
    kb = torch.arange(nkt) * bk // bk_l  # (nkt,)
    sel = lay[:, :, qb][:, :, :, kb]  # (Lb, Lh, nqt, nkt)
    if extra is None:
        cls = torch.where(sel, FULL, EMPTY).to(torch.int8)
    else:
        cls = torch.where(sel, extra.blocks(nq, nk, bq, bk), torch.zeros((), dtype=torch.int8))  # (Lb, Lh, nqt, nkt)
    lb, lh = cls.shape[:2]
    rp, lead, ti, tj = tile_entries(cls)  # (Lb, Lh, nqt + 1) and the non-EMPTY tiles
    slots = torch.full((ti.numel(),), -1, dtype=torch.long)
    words = -(-bk // 64)
    bits = torch.zeros(1, 1, 1, bq, words, dtype=torch.long)
    part = cls.view(lb * lh, nqt, nkt)[lead, ti, tj] == PARTIAL
    if bool(part.any()):
        pairs, inverse = torch.unique(torch.stack([ti[part], tj[part]], 1), dim=0, return_inverse=True)  # (U, 2)
        q = pairs[:, :1] * bq + torch.arange(bq)  # (U, bq)
        kv = pairs[:, 1:] * bk + torch.arange(bk)  # (U, bk)
        ok = extra._evaluate(q.clamp_max(nq - 1)[:, :, None], kv.clamp_max(nk - 1)[:, None, :], nq, nk)
        ok = ok & (q < nq)[:, :, None] & (kv < nk)[:, None, :]  # (U, bq, bk)
        bits = pack_bits(ok, bk)[None, None].contiguous()  # (1, 1, U, bq, words)
        slots[part] = inverse
    rows = (torch.clamp(torch.arange(nqt) * bq + bq, max=nq) - torch.arange(nqt) * bq)[ti]
    colw = (torch.clamp(torch.arange(nkt) * bk + bk, max=nk) - torch.arange(nkt) * bk)[tj]
    computed = int((rows * colw).sum()) // (lb * lh)
    return TileList(bq, bk, rp, tj.contiguous(), slots, bits, computed)
