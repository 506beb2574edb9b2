"""MoBA: Mixture of Block Attention for Long-Context LLMs (arXiv 2502.13189).

Keys are cut into blocks; a parameter-free router scores every block by its mean key and
each query attends, at token level, only inside its top-k blocks. Causal: the query's own
block is always selected (causally masked inside) and blocks past the query are never
candidates; the top-k budget counts the own block. Token routing runs the paper's key-major
dispatch (``backends.block_dispatch``); block routing runs, without autograd, the fused CPU op
(own block + each query block's gathered past blocks, merged by log-sum-exp), else the
block-gather engine.
"""


from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from attnkit._validate import check_qkv, resolve_scale
from attnkit.kernels import alloc
from attnkit.kernels.dispatch import _diag, routed_block_attention
from attnkit.kernels.fused import fused_ops
from attnkit.kernels.gather import block_gather_attention, compute_dtype
from attnkit.kernels.merge import merge_partials


def block_means(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean over each block of ``block`` tokens of ``x (B, N, H, D)`` -> ``(B, n, H, D)``; a partial
    last block is divided by its real token count."""
    B, N, H, D = x.shape
    n = math.ceil(N / block)
    pad = n * block - N
    xp = torch.cat([x, x.new_zeros(B, pad, H, D)], 1) if pad else x
    counts = torch.full((n,), float(block), dtype=x.dtype, device=x.device)
    counts[-1] = block - pad
    return xp.view(B, n, block, H, D).sum(2) / counts.view(1, n, 1, 1)  # (B, n, H, D)



def route_topk(scores: torch.Tensor, own: torch.Tensor | None, topk: int, causal: bool) -> torch.Tensor:
    """MoBA's router on gate scores ``(..., R, n)`` (R query rows, n key blocks) -> bool selection.

    ``own`` (R,) is each row's own block (forced in; causal: later blocks excluded) or None.
    Ties go to the lower block index (stable sort), so exactly ``min(topk, #candidates)`` are chosen.
    """
    n = scores.shape[-1]
    s = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores.clone()
    if own is not None:
        j = torch.arange(n, device=s.device)
        if causal:
            s = s.masked_fill(j > own.unsqueeze(-1), float("-inf"))
        s = s.masked_fill(j == own.unsqueeze(-1), float("inf"))
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :topk]
    chosen = torch.gather(s, -1, order) > float("-inf")  # never count an excluded block as chosen
    return torch.zeros_like(s, dtype=torch.bool).scatter_(-1, order, chosen)



@dataclass(frozen=True)
class _TokenRoutes:
    """Element mask of per-token routing: query ``t`` may see key ``u`` iff its route table selects
    ``u``'s block (and ``u <= t`` when causal). Has the ``mask_mod`` protocol of ``ak.masks``."""

    table: torch.Tensor  # (B, H, N, n) bool
    block: int
    causal: bool

    def mask_mod(self, b, h, q_idx, kv_idx):
        ok = self.table[b, h, q_idx, kv_idx // self.block]
        return ok & (q_idx >= kv_idx) if self.causal else ok



class _Causal:
    def mask_mod(self, b, h, q_idx, kv_idx):
        return q_idx >= kv_idx



def moba_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, topk: int, *,
                   causal: bool = True, routing: str = "token", scale: float | None = None,
                   return_layout: bool = False):
    """Mixture of block attention.

    Args:
        q: ``(B, N, Hq, D)``; k: ``(B, Nk, Hkv, D)``; v: ``(B, Nk, Hkv, Dv)`` (GQA: keys pooled per KV
            head, routed per query head).
        block_size: key block ``Bk`` (and query block of the engine); the last block may be partial.
        topk: selected blocks per query, the own block included (``1 <= topk <= ceil(Nk / Bk)``).
        causal: causal self-attention (``N == Nk``); non-causal self forces the own block,
            non-causal cross (``N != Nk``) is plain top-k.
        routing: ``"token"`` (paper: every query scores blocks) or ``"block"`` (the mean query of
            each query block routes for the block; cheaper and exactly ``topk`` blocks per row).

    Returns:
        ``(B, N, Hq, Dv)``; with ``return_layout`` also the bool selection ``(B, Hq, rows, n)``.

    Example:
        >>> q = k = v = torch.randn(1, 1024, 4, 32)
        >>> out = moba_attention(q, k, v, block_size=128, topk=3)
    """
    hq, hkv = check_qkv(q, k, v)
    if routing not in ("token", "block"):
        raise ValueError(f"routing must be 'token' or 'block', got {routing!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    N = q.shape[1]
    Nk = k.shape[1]
    n = math.ceil(Nk / block_size)
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= n:
        raise ValueError(f"topk must be in [1, number of key blocks = ceil({Nk} / {block_size}) = {n}], got {topk}")
    self_attn = N == Nk
    if causal and not self_attn:
        raise ValueError(f"causal MoBA needs self-attention (Nq == Nk), got Nq={N}, Nk={Nk}")
    cdt = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    kbar = block_means(k.detach().to(cdt), block_size).repeat_interleave(hq // hkv, dim=2)  # (B, n, Hq, D)
    qr = q.detach().to(cdt)
    if routing == "block":
        qr = block_means(qr, block_size)  # (B, nqb, Hq, D): one route per query block
    scores = torch.einsum("bqhd,bnhd->bhqn", qr, kbar)  # (B, Hq, rows, n); no gradient through routing
    rows = scores.shape[2]
    own = None
    if self_attn:
        own = torch.arange(rows, device=q.device) // (1 if routing == "block" else block_size)
    sel = route_topk(scores, own, topk, causal)  # (B, Hq, rows, n)
    if routing == "block" and _block_fused_ok(q, k, v, block_size, self_attn):
        out = _block_routed_fused(q, k, v, sel, block_size, causal, resolve_scale(scale, q.shape[-1]))
    elif routing == "block":
        out = block_gather_attention(q, k, v, sel, block_size, extra_mask=_Causal() if causal else None, scale=scale)
    else:
        # the paper's dispatch: own block as one batched (causal) block-diagonal part, every other
        # selected block attended in full by the queries that chose it, merged by log-sum-exp
        routes = sel
        if own is not None:
            routes = sel & (torch.arange(n, device=q.device) != own.unsqueeze(-1))  # (B, Hq, N, n)
        out = routed_block_attention(q, k, v, routes, block_size, scale=scale,
                                     diag=None if own is None else ("causal" if causal else "full"))
    return (out, sel) if return_layout else out



def _block_fused_ok(q, k, v, bs: int, self_attn: bool) -> bool:
    """Block routing's inference path: no autograd, CPU, ``D == Dv``, not fp64 (the fused kernel's exp
    is approximate), self-attention on whole blocks. Anything else runs the block-gather engine."""
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return (not grad and self_attn and q.device.type == "cpu" and q.shape[-1] == v.shape[-1]
            and q.dtype != torch.float64 and q.shape[1] % bs == 0 and fused_ops()[0] is not None)






def _block_routed_fused(q, k, v, sel, bs: int, causal: bool, scale: float) -> torch.Tensor:
    """Block-routed MoBA without autograd on torch's fused CPU flash-attention op.

    The own block is one batched (causal) block-diagonal call; each query block's other selected
    blocks are gathered into one key run and attended in full (query blocks with equal counts in one
    call); the two partials merge by log-sum-exp. ``sel (B, Hq, nqb, n)`` includes the own block.
    """
    fwd = fused_ops()[0]
    B, N, hq, D = q.shape
    hkv, n = k.shape[2], sel.shape[-1]
    g, cdt = hq // hkv, compute_dtype(q.dtype)
    qh = q.to(cdt).transpose(1, 2).contiguous()  # (B, Hq, N, D)
    kh, vh = (t.to(cdt).transpose(1, 2).contiguous() for t in (k, v))  # (B, Hkv, N, D)
    od, ld = _diag(fwd, qh, kh, vh, "causal" if causal else "full", bs, n, scale)  # (B*Hq*N, D), (B*Hq*N,)
    past = sel & ~torch.eye(n, dtype=torch.bool, device=q.device)  # (B, Hq, n, n): other selected blocks
    rows = past.flatten(0, 2)  # (R, n), R = B*Hq*n query blocks
    cnt = rows.sum(-1)  # (R,)
    qb = qh.view(-1, bs, D)  # (R, bs, D)
    kb, vb = kh.view(-1, bs, D), vh.view(-1, bs, D)  # (B*Hkv*n, bs, D)
    r_all = torch.arange(rows.shape[0], device=q.device)
    kv_base = (r_all // (hq * n) * hkv + r_all // n % hq // g) * n  # (R,) first key block of the row's KV head
    op = torch.zeros(rows.shape[0], bs, D, dtype=cdt, device=q.device)
    lp = torch.full((rows.shape[0], bs), float("-inf"), dtype=cdt, device=q.device)
    for c in torch.unique(cnt).tolist():
        if c == 0:
            continue
        r = torch.nonzero(cnt == c).squeeze(1)  # (Rc,)
        blk = torch.sort(rows[r].byte(), dim=-1, descending=True, stable=True).indices[:, :c]  # (Rc, c)
        ids = kv_base[r].unsqueeze(1) + blk  # (Rc, c) flat key blocks
        step = max(1, alloc.CHUNK_BYTES // (c * bs * 2 * D * qb.element_size()))
        for i0 in range(0, r.numel(), step):
            rr, ii = r[i0:i0 + step], ids[i0:i0 + step].reshape(-1)
            kg = kb.index_select(0, ii).view(rr.numel(), 1, c * bs, D)  # (Rc', 1, c*bs, D)
            vg = vb.index_select(0, ii).view(rr.numel(), 1, c * bs, D)
            o, l = fwd(qb.index_select(0, rr).unsqueeze(1), kg, vg, scale=scale)  # (Rc', 1, bs, D), (Rc', 1, bs)
            op.index_copy_(0, rr, o.squeeze(1))
            lp.index_copy_(0, rr, l.squeeze(1))
    lp, op = lp.view(-1), op.view(-1, D)  # (B*Hq*N,), (B*Hq*N, D)
    out, _ = merge_partials(od, ld, op, lp)  # the own block is never empty: ld is finite
    return out.view(B, hq, N, D).transpose(1, 2).to(q.dtype)  # (B, N, Hq, D)

