"""Block-gather engine: attention over per-(batch, head) block-sparse layouts.

Routed mechanisms (MoBA, BiFormer, PSA) choose different key blocks for every batch
element, head and query block, so a tile walk over one head-independent mask does not
fit them. This engine turns a layout into, per query block, the indices of its selected
key blocks (padded to the largest count ``kmax`` of any row, padding masked), gathers
those K/V blocks with one ``index_select`` and runs a batched matmul over all query
blocks at once, then a masked softmax. Autograd provides the backward pass.

On the CPU in float32/bfloat16/float16 with a key block that is a multiple of 16 (and an element mask,
if any, that is a head-independent ``ak.masks`` Mask) the layout instead runs on the compiled tile
kernel (``kernels/tiles.py``): exactly the selected blocks, no K/V gather, the kernel's backward;
:func:`gather_path` says which engine runs. The gather path below is the fallback (float64,
``ATTNKIT_NATIVE=0``, other blocks and masks).

Cost: ``O(B * Hq * Nq * kmax * bk * D)`` flops. Memory: the forward is chunked over query
blocks (about 64 MiB of gathered K/V and scores per chunk; with ``reuse_buffers`` the gather
buffers are reused across chunks, since fresh multi-MiB allocations page-fault); with gradients
autograd keeps every chunk's gathered K/V and probabilities, i.e.
``O(B * Hq * nqb * kmax * bk * (D + Dv + bq))`` elements. The K/V gather duplicates
blocks per query head, which is the price of per-head routing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from attnkit._validate import check_qkv, resolve_scale
from attnkit.kernels import alloc
from attnkit.kernels.flash import flash_attention, native_reason
from attnkit.kernels.tiles import gather_kernel_reason, layout_tile_list


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd will record an op on ``tensors``: grad mode is on and one of them requires grad.

    Ops compute this once, when they build their call, and choose their path from it explicitly.
    """
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for half types, else the input dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def attend_gathered(
    qb: torch.Tensor, kg: torch.Tensor, vg: torch.Tensor, allowed: torch.Tensor | None, scale: float,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax attention of query tiles over their gathered keys.

    Args:
        qb: ``(..., bq, D)`` queries (already in the compute dtype).
        kg: ``(..., L, D)`` gathered keys; vg: ``(..., L, Dv)`` gathered values.
        allowed: bool broadcastable to ``(..., bq, L)`` (True = attend) or None (all).
        scale: logit scale.
        bias: optional additive logit bias broadcastable to ``(..., bq, L)`` (e.g. PSA's ``ln r``).

    Returns:
        ``(out (..., bq, Dv), lse (..., bq))``; rows with no allowed key give zeros and ``-inf``.
    """
    s = torch.matmul(qb, kg.transpose(-1, -2)) * scale  # (..., bq, L)
    if bias is not None:
        s = s + bias
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    # an empty row has max -inf; shift by 0 instead so exp gives exact zeros, not NaN
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    out = torch.matmul(p, vg) / safe  # (..., bq, Dv)
    lse = (m + torch.log(denom)).squeeze(-1)  # log(0) = -inf for empty rows
    return out, lse


def block_sizes(block_size: object) -> tuple[int, int]:
    """``block_size`` as ``(bq, bk)`` from an int or a pair; raises on non-positive values."""
    pair = tuple(block_size) if isinstance(block_size, (tuple, list)) else (block_size, block_size)
    if len(pair) != 2 or any(isinstance(b, bool) or not isinstance(b, int) for b in pair):
        raise TypeError(f"block_size must be an int or a pair of ints (bq, bk), got {block_size!r}")
    if min(pair) < 1:
        raise ValueError(f"block_size must be positive, got {block_size!r}")
    return pair  # type: ignore[return-value]


def check_layout(layout: object, B: int, H: int, nqb: int, nkb: int) -> torch.Tensor:
    """Validate a layout and return it as bool ``(B or 1, H or 1, nqb, nkb)``."""
    if not isinstance(layout, torch.Tensor):
        raise TypeError(f"layout must be a bool tensor, got {type(layout).__name__}")
    if layout.dtype != torch.bool:
        raise TypeError(f"layout must be a bool tensor (True = attend), got {layout.dtype}")
    if not 2 <= layout.dim() <= 4:
        raise ValueError(f"layout must be (nqb, nkb), (H, nqb, nkb) or (B, H, nqb, nkb); got {tuple(layout.shape)}")
    lay = layout.reshape((1,) * (4 - layout.dim()) + tuple(layout.shape))
    if lay.shape[-2:] != (nqb, nkb):
        raise ValueError(f"layout has {tuple(lay.shape[-2:])} blocks, expected (nqb, nkb) = ({nqb}, {nkb}) "
                         "= (ceil(Nq / bq), ceil(Nk / bk))")
    if lay.shape[0] not in (1, B) or lay.shape[1] not in (1, H):
        raise ValueError(f"layout leading dims {tuple(lay.shape[:2])} must be 1 or (B, Hq) = ({B}, {H})")
    return lay


def layout_indices(layout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected key blocks per row, ascending, padded to the largest row count.

    Args:
        layout: bool ``(..., nqb, nkb)``.

    Returns:
        ``(idx (..., nqb, kmax) long, valid (..., nqb, kmax) bool)``; padded slots are invalid.
    """
    counts = layout.sum(dim=-1)  # (..., nqb)
    kmax = max(int(counts.max()), 1)
    # a stable descending sort of 0/1 lists the selected blocks first, in ascending order
    idx = torch.sort(layout.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :kmax]
    valid = torch.arange(kmax, device=layout.device) < counts.unsqueeze(-1)
    return idx, valid


def _blocks(x: torch.Tensor, n_blocks: int, b: int) -> torch.Tensor:
    """``x (B, N, H, D)`` -> zero-padded ``(B, H, n_blocks, b, D)``."""
    B, N, H, D = x.shape
    pad = n_blocks * b - N
    if pad:
        x = torch.cat([x, x.new_zeros(B, pad, H, D)], dim=1)
    return x.view(B, n_blocks, b, H, D).permute(0, 3, 1, 2, 4)  # (B, H, n, b, D)


def _on_kernel(q, k, v, lay, bq, bk, extra_mask, scale):
    """The layout on the compiled tile kernel: one entry list per (batch, head) of the layout; when the
    layout is per query head and query heads share a KV head, one kernel call per position in the group
    (its heads then map one-to-one to KV heads). Returns ``out (B, Nq, Hq, Dv)``, ``lse (B, Nq, Hq)`` float32."""
    hq, hkv = q.shape[2], k.shape[2]
    g = hq // hkv
    nq, nk = q.shape[1], k.shape[1]
    if lay.shape[1] == 1 or g == 1:
        return flash_attention(q, k, v, layout_tile_list(lay, bq, bk, nq, nk, extra_mask), scale)
    outs, lses = [], []
    for j in range(g):  # query heads j, j + g, ...: head h uses KV head h // g
        o, l_ = flash_attention(q[:, :, j::g], k, v, layout_tile_list(lay[:, j::g], bq, bk, nq, nk, extra_mask), scale)
        outs.append(o)
        lses.append(l_)
    out = torch.stack(outs, 3).reshape(*q.shape[:2], hq, v.shape[-1])  # (B, Nq, Hkv, G, Dv) -> (B, Nq, Hq, Dv)
    return out, torch.stack(lses, 3).reshape(*q.shape[:2], hq)  # (B, Nq, Hq)


def gather_path(q: torch.Tensor, k: torch.Tensor, layout: torch.Tensor, block_size, extra_mask=None) -> str:
    """Which engine :func:`block_gather_attention` runs for these inputs, in words (for ``explain``)."""
    bq, bk = block_sizes(block_size)
    hq, hkv = q.shape[-2], k.shape[-2]
    heads = layout.shape[-3] if layout.dim() >= 3 else 1
    why = gather_kernel_reason(q, (bq, bk), extra_mask, hq, hkv, heads)
    if why is None:
        return "compiled tile kernel over the selected blocks (one entry list per batch and head; kernel backward)"
    return f"gathered K/V blocks, batched softmax (tile kernel not used: {why})"


def block_gather_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: torch.Tensor, block_size: int | tuple[int, int],
    *, extra_mask: object = None, scale: float | None = None, return_lse: bool = False,
    reuse_buffers: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention where each (batch, head, query block) attends only its selected key blocks.

    Args:
        q: ``(B, Nq, Hq, D)``; k: ``(B, Nk, Hkv, D)``; v: ``(B, Nk, Hkv, Dv)``; ``Hq % Hkv == 0`` (GQA).
        layout: bool ``(B or 1, Hq or 1, nqb, nkb)`` (or without leading dims), True = query block
            ``i`` attends key block ``j``; ``nqb = ceil(Nq / bq)``, ``nkb = ceil(Nk / bk)``.
        block_size: ``b`` or ``(bq, bk)``; the last block of a sequence may be partial.
        extra_mask: optional element-level mask with ``mask_mod(b, h, q_idx, kv_idx)`` (e.g.
            ``ak.masks.causal()``), applied inside the selected blocks.
        scale: logit scale, default ``D ** -0.5``.
        return_lse: also return the log-sum-exp ``(B, Nq, Hq)`` (``-inf`` for empty rows).
        reuse_buffers: gather every chunk into one pair of buffers (``index_select(out=)``, which
            autograd cannot record: ValueError when an input needs a gradient). None: reuse exactly
            when no input needs one (:func:`needs_grad`); ops pass it explicitly. Same numbers
            either way.

    Returns:
        ``out (B, Nq, Hq, Dv)`` in the input dtype (fp32 accumulation for half types);
        rows with no allowed key are zeros.

    Example:
        >>> q = k = v = torch.randn(1, 256, 4, 32)
        >>> lay = torch.eye(4, dtype=torch.bool)            # block-diagonal, 64-token blocks
        >>> out = block_gather_attention(q, k, v, lay, 64)  # (1, 256, 4, 32)
    """
    hq, hkv = check_qkv(q, k, v)
    bq, bk = block_sizes(block_size)
    B, Nq, _, D = q.shape
    Nk, Dv = k.shape[1], v.shape[-1]
    nqb, nkb = math.ceil(Nq / bq), math.ceil(Nk / bk)
    lay = check_layout(layout, B, hq, nqb, nkb).to(q.device)
    if extra_mask is not None and not callable(getattr(extra_mask, "mask_mod", None)):
        raise TypeError(f"extra_mask must have a mask_mod(b, h, q_idx, kv_idx) method, got {type(extra_mask).__name__}")
    scale = resolve_scale(scale, D)
    grad = needs_grad(q, k, v)
    if reuse_buffers and grad:
        raise ValueError("reuse_buffers=True cannot record autograd (index_select(out=)): inputs require grad")
    if gather_kernel_reason(q, (bq, bk), extra_mask, hq, hkv, lay.shape[1]) is None and native_reason(q) is None:
        out, lse = _on_kernel(q, k, v, lay, bq, bk, extra_mask, scale)
        return (out, lse) if return_lse else out
    # without lse the fused SDPA kernel runs each chunk (it accumulates half types in fp32 and
    # returns zeros for empty rows); with lse the explicit softmax below runs in fp32/fp64
    fused = not return_lse
    cdt = q.dtype if fused else compute_dtype(q.dtype)
    dev = q.device

    idx, valid = layout_indices(lay)  # (Bl, Hl, nqb, kmax)
    kmax = idx.shape[-1]
    L = kmax * bk
    # flat block ids into (B * Hkv * nkb) so one index_select gathers every head's blocks
    b_ar = torch.arange(B, device=dev).view(B, 1, 1, 1)
    kvh = (torch.arange(hq, device=dev) // (hq // hkv)).view(1, hq, 1, 1)
    flat = (b_ar * hkv + kvh) * nkb + idx  # (B, Hq, nqb, kmax)
    kflat = _blocks(k.to(cdt), nkb, bk).reshape(B * hkv * nkb, bk, D)  # (B*Hkv*nkb, bk, D)
    vflat = _blocks(v.to(cdt), nkb, bk).reshape(B * hkv * nkb, bk, Dv)  # (B*Hkv*nkb, bk, Dv)
    qb = _blocks(q.to(cdt), nqb, bq)  # (B, Hq, nqb, bq, D)

    kv_idx = (idx.unsqueeze(-1) * bk + torch.arange(bk, device=dev)).flatten(-2)  # (Bl, Hl, nqb, L)
    slot_ok = valid.unsqueeze(-1).expand(*valid.shape, bk).flatten(-2) & (kv_idx < Nk)  # (Bl, Hl, nqb, L)
    need_mask = extra_mask is not None or not bool(slot_ok.all())

    # big chunks: few large ops parallelise better than many small ones on CPU
    per_block = B * hq * L * (bq + D + Dv) * torch.finfo(cdt).bits // 8
    chunk = max(1, min(nqb, alloc.CHUNK_BYTES // max(per_block, 1)))
    # without autograd, gather into buffers reused across chunks: fresh multi-MiB allocations
    # page-fault on every chunk and cost more than the copy itself
    reuse = not grad if reuse_buffers is None else bool(reuse_buffers)
    if reuse:
        kbuf = kflat.new_empty(B * hq * chunk * kmax, bk, D)
        vbuf = vflat.new_empty(B * hq * chunk * kmax, bk, Dv)
    outs, lses = [], []
    for i0 in range(0, nqb, chunk):
        i1 = min(nqb, i0 + chunk)
        c = i1 - i0
        fl = flat[:, :, i0:i1].reshape(-1)
        if reuse:
            kg = torch.index_select(kflat, 0, fl, out=kbuf[: fl.numel()]).view(B * hq, c, L, D)
            vg = torch.index_select(vflat, 0, fl, out=vbuf[: fl.numel()]).view(B * hq, c, L, Dv)
        else:
            kg = kflat.index_select(0, fl).view(B * hq, c, L, D)  # (B*Hq, c, L, D)
            vg = vflat.index_select(0, fl).view(B * hq, c, L, Dv)  # (B*Hq, c, L, Dv)
        allowed = None
        if need_mask:
            allowed = slot_ok[:, :, i0:i1].unsqueeze(-2)  # (Bl, Hl, c, 1, L)
            if extra_mask is not None:
                q_idx = torch.arange(i0 * bq, i1 * bq, device=dev).clamp_max(Nq - 1).view(1, 1, c, bq, 1)
                kvi = kv_idx[:, :, i0:i1].clamp_max(Nk - 1).unsqueeze(-2)  # (Bl, Hl, c, 1, L)
                em = extra_mask.mask_mod(torch.arange(B, device=dev).view(B, 1, 1, 1, 1),
                                         torch.arange(hq, device=dev).view(1, hq, 1, 1, 1), q_idx, kvi)
                allowed = allowed & em
            allowed = allowed.expand(B, hq, c, allowed.shape[-2], L).reshape(B * hq, c, -1, L)
        qc = qb[:, :, i0:i1].reshape(B * hq, c, bq, D)  # (B*Hq, c, bq, D)
        if fused:
            o = F.scaled_dot_product_attention(qc, kg, vg, attn_mask=allowed, scale=scale)
        else:
            o, lse = attend_gathered(qc, kg, vg, allowed, scale)
            lses.append(lse.view(B, hq, c, bq))
        if reuse:
            outs.append(None)
            if i0 == 0:
                full = o.new_empty(B, hq, nqb, bq, Dv)
            full[:, :, i0:i1] = o.view(B, hq, c, bq, Dv)
        else:
            outs.append(o.view(B, hq, c, bq, Dv))
    out = (full if reuse else torch.cat(outs, dim=2)).flatten(2, 3)[:, :, :Nq]  # (B, Hq, Nq, Dv)
    out = out.permute(0, 2, 1, 3).to(q.dtype)  # (B, Nq, Hq, Dv)
    if not return_lse:
        return out
    lse = torch.cat(lses, dim=2).flatten(2, 3)[:, :, :Nq].permute(0, 2, 1)  # (B, Nq, Hq)
    return out, lse
