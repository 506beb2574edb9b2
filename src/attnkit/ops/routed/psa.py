"""PSA: Pyramid Sparse Attention for Efficient Video Understanding and Generation (arXiv 2512.04025).

Instead of a keep/drop choice per (query block, KV block), every KV block exists as a small
pyramid of mean-pooled copies (pool factors 1, 2, 4, 8). Per query block, the most important
KV blocks are attended at full resolution, less important ones through a pooled copy, the
rest are skipped. A pooled key stands for the ``r`` tokens it replaces through a ``+ln r``
logit bias, exact when those tokens are equal. One softmax runs over all visible tokens of
all levels: per level the selected pooled blocks are gathered as in the block-gather engine,
concatenated along the key axis and attended with ``attend_gathered`` (bias = ``ln r``).
"""


from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnkit._validate import check_qkv, resolve_scale
from attnkit.kernels import alloc
from attnkit.kernels.fused import can_fuse
from attnkit.kernels.gather import _blocks, attend_gathered, check_layout, compute_dtype, layout_indices
from attnkit.ops.routed.psa_fused import causal_diag_ok, pyramid_fused

DEFAULT_RATIOS = (0.10, 0.05, 0.0, 0.20)  # repository default: ~85% of blocks skipped



@dataclass(frozen=True)
class PSAConfig:
    """Block sizes, pyramid depth (pool factors ``2**l``, ``l < levels``) and rank bands per level."""

    block_q: int = 128
    block_kv: int = 64
    levels: int = 4
    mask_ratios: tuple[float, ...] = DEFAULT_RATIOS
    causal: bool = False

    def __post_init__(self):
        for name in ("block_q", "block_kv", "levels"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if self.block_kv % 2 ** (self.levels - 1):
            raise ValueError(f"block_kv ({self.block_kv}) must be divisible by the largest pool factor "
                             f"2**(levels-1) = {2 ** (self.levels - 1)} (pooling happens inside KV blocks)")
        r = tuple(self.mask_ratios)
        if len(r) != self.levels or any(x < 0 for x in r) or sum(r) > 1 + 1e-9:
            raise ValueError(f"mask_ratios must be {self.levels} non-negative fractions (one per level) "
                             f"summing to <= 1, got {self.mask_ratios!r}")



def band_ends(n: int, ratios: tuple[float, ...], forced: int = 0) -> list[int]:
    """Rank boundaries of the levels for a row with ``n`` candidate blocks (``forced`` of them
    pinned at full resolution): level ``l`` takes ranks ``[ends[l-1], ends[l])``. Cumulative
    round-half-up, so the counts add up; the top block is always kept at full resolution."""
    ends, acc, prev = [], 0.0, 0
    for i, x in enumerate(ratios):
        acc += x
        e = math.floor(n * acc + 0.5)
        if i == 0:
            e = max(e, forced, min(n, 1))
        prev = min(n, max(prev, e))
        ends.append(prev)
    return ends



def psa_importance(q: torch.Tensor, k: torch.Tensor, block_q: int, block_kv: int, *, causal: bool = False,
                   scale: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """PSA's sampled block-importance estimate ``S (B, Hq, nqb, nkb)``.

    ``block_q // 4`` queries per query block and ``block_kv // 4`` keys per KV block (one offset
    subset shared by all blocks: strided ``0, 4, 8, ...`` without ``generator``, else random)
    attend with softmax over all sampled keys (causal: sampled keys after the sampled query are
    masked); ``S_ij`` is the largest probability inside tile ``(i, j)``. No gradient.
    """
    B, Nq, hq, D = q.shape
    Nk, hkv = k.shape[1], k.shape[2]
    nqb, nkb = math.ceil(Nq / block_q), Nk // block_kv
    cdt = compute_dtype(q.dtype)

    def offsets(b: int) -> torch.Tensor:
        m = max(1, b // 4)
        if generator is None:
            return torch.arange(m) * (b // m)
        return torch.randperm(b, generator=generator)[:m].sort().values

    qpos = (torch.arange(nqb).view(-1, 1) * block_q + offsets(block_q)).clamp_max(Nq - 1).to(q.device)  # (nqb, mq)
    kpos = (torch.arange(nkb).view(-1, 1) * block_kv + offsets(block_kv)).to(q.device)  # (nkb, mk)
    mq, mk = qpos.shape[1], kpos.shape[1]
    qs = (q.detach().to(cdt)[:, qpos.flatten()] * resolve_scale(scale, D)).transpose(1, 2)  # (B, Hq, nqb*mq, D)
    ks = k.detach().to(cdt)[:, kpos.flatten()].repeat_interleave(hq // hkv, dim=2).transpose(1, 2)  # (B, Hq, K, D)
    kflat = kpos.flatten()
    out = qs.new_zeros(B, hq, nqb, nkb)
    # chunks of query blocks keep the (rows, keys) scores in cache; causal chunks stop at the last key
    # any of their sampled queries can see (later tiles are all masked: probability 0)
    step = max(1, 2**23 // max(1, B * hq * mq * nkb * mk))
    for i0 in range(0, nqb, step):
        i1 = min(nqb, i0 + step)
        qp = qpos[i0:i1].flatten()  # (R,)
        kb_end = nkb
        if causal:
            kb_end = min(nkb, int(torch.searchsorted(kflat, qp.max(), right=True)) // mk + 1)
        s = torch.matmul(qs[:, :, i0 * mq:i1 * mq], ks[:, :, :kb_end * mk].transpose(-1, -2))  # (B, Hq, R, K')
        if causal:
            s.masked_fill_(kflat[None, :kb_end * mk] > qp[:, None], float("-inf"))
        # the largest probability of a tile is exp(largest logit - row lse): no full softmax needed
        smax = s.view(B, hq, s.shape[2], kb_end, mk).amax(-1)  # (B, Hq, R, kb_end)
        m = smax.amax(-1, keepdim=True)  # (B, Hq, R, 1), finite: every sampled query sees a key
        lse = m + torch.log(s.sub_(m).exp_().sum(-1, keepdim=True))
        p = torch.exp(smax - lse).view(B, hq, i1 - i0, mq, kb_end)  # (B, Hq, c, mq, kb_end)
        out[:, :, i0:i1, :kb_end] = p.amax(3)
    return out  # (B, Hq, nqb, nkb)



def psa_level_map(scores: torch.Tensor, mask_ratios: tuple[float, ...], *, causal: bool = False,
                  block_q: int = 1, block_kv: int = 1) -> torch.Tensor:
    """Per query-block row, levels from rank quantiles of ``scores (..., nqb, nkb)``.

    Returns int64 pool factors ``M (..., nqb, nkb)`` in ``{0, 1, 2, 4, ...}`` (0 = skip). Causal:
    KV blocks starting after the query block's last token are never candidates and the blocks
    overlapping its diagonal are pinned at factor 1 (every query sees itself). Ties go to the
    lower block index.
    """
    nqb, nkb = scores.shape[-2:]
    dev = scores.device
    s = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores.clone()
    n_cand = torch.full((nqb,), nkb, dtype=torch.long)
    forced = torch.zeros(nqb, dtype=torch.long)
    if causal:
        last = torch.minimum((torch.arange(nqb) + 1) * block_q - 1, torch.tensor(nkb * block_kv - 1))
        first = torch.arange(nqb) * block_q
        n_cand = last // block_kv + 1  # blocks starting at or before the last query
        forced = n_cand - torch.div(first, block_kv, rounding_mode="floor")  # blocks touching the diagonal
        j = torch.arange(nkb)
        s = s.masked_fill((j[None] >= n_cand[:, None]).to(dev), float("-inf"))
        s = s.masked_fill(((j[None] < n_cand[:, None]) & (j[None] >= n_cand[:, None] - forced[:, None])).to(dev),
                          float("inf"))
    ends = torch.tensor([band_ends(int(n), mask_ratios, int(f)) for n, f in zip(n_cand, forced, strict=True)],
                        device=dev)  # (nqb, levels)
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(nkb, device=dev).expand_as(order))
    lvl = (rank.unsqueeze(-1) >= ends.unsqueeze(-2)).sum(-1)  # (..., nqb, nkb): band index, levels = skip
    factor = torch.tensor([2 ** i for i in range(len(mask_ratios))] + [0], device=dev)
    return factor[lvl]



def pyramid_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, level_map: torch.Tensor,
                             block_q: int, block_kv: int, *, causal: bool = False,
                             scale: float | None = None) -> torch.Tensor:
    """Attention over a pyramid of pooled KV blocks chosen per (batch, head, query block).

    Args:
        q: ``(B, Nq, Hq, D)``; k: ``(B, Nk, Hkv, D)``; v: ``(B, Nk, Hkv, Dv)``; GQA by ``Hq % Hkv``.
            ``Nk % block_kv == 0`` (pooling stays inside blocks); ``Nq`` may be ragged.
        level_map: int ``(B or 1, Hq or 1, nqb, nkb)`` pool factors (0 = skip, else a power of two
            dividing ``block_kv``), ``nqb = ceil(Nq / block_q)``, ``nkb = Nk / block_kv``.
        causal: a pooled key covering tokens ``[p r, (p+1) r)`` is visible to query ``t`` only if
            ``(p+1) r - 1 <= t`` (self-attention, ``Nq == Nk``).
        scale: logit scale, default ``D ** -0.5``; each pooled logit gets ``+ ln r``.

    Returns:
        ``(B, Nq, Hq, Dv)``; rows that see no key are zeros.

    Example:
        >>> q = k = v = torch.randn(1, 512, 4, 32)
        >>> M = torch.ones(4, 8, dtype=torch.long)         # every block at full resolution: dense
        >>> out = pyramid_sparse_attention(q, k, v, M, 128, 64)
    """
    hq, hkv = check_qkv(q, k, v)
    for name, val in (("block_q", block_q), ("block_kv", block_kv)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    B, Nq, _, D = q.shape
    Nk, Dv = k.shape[1], v.shape[-1]
    if Nk % block_kv:
        raise ValueError(f"Nk ({Nk}) must be divisible by block_kv ({block_kv}): pooled levels live inside KV blocks")
    if causal and Nq != Nk:
        raise ValueError(f"causal PSA needs self-attention (Nq == Nk), got Nq={Nq}, Nk={Nk}")
    if not isinstance(level_map, torch.Tensor) or level_map.dtype.is_floating_point or level_map.dtype == torch.bool:
        raise TypeError("level_map must be an integer tensor of pool factors (0 = skip)")
    nqb, nkb = math.ceil(Nq / block_q), Nk // block_kv
    lm = check_layout(level_map != 0, B, hq, nqb, nkb).to(q.device)  # validates the shape
    lm = level_map.to(q.device).reshape(lm.shape).expand(B, hq, nqb, nkb)  # (B, Hq, nqb, nkb)
    factors = sorted(int(f) for f in torch.unique(lm) if f != 0)
    bad = [f for f in factors if f & (f - 1) or block_kv % f]
    if bad or bool((lm < 0).any()):
        raise ValueError(f"level_map values must be 0 or powers of two dividing block_kv ({block_kv}), got {bad}")
    scale = resolve_scale(scale, D)
    cdt = compute_dtype(q.dtype)
    dev = q.device
    if not factors:  # nothing visible anywhere
        return q.new_zeros(B, Nq, hq, Dv)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    # fp64 keeps the exact path: the fused kernel's exp is approximate (~1e-9 relative)
    fast = not grad and cdt != torch.float64 and can_fuse(q, v)
    if fast and (not causal or causal_diag_ok(lm, block_q, block_kv, Nq)):
        # inference: fused op, per-row masks only, causal split into own span + unmasked past
        out = pyramid_fused(q.to(cdt), k.to(cdt), v.to(cdt), lm, factors, block_q, block_kv, causal, scale)
        return out.to(q.dtype)
    b_ar = torch.arange(B, device=dev).view(B, 1, 1, 1)
    kvh = (torch.arange(hq, device=dev) // (hq // hkv)).view(1, hq, 1, 1)
    # one bank of every level's pooled tokens in granules of g tokens (g = the smallest pooled block),
    # so that a single index_select gathers a row's blocks of all levels without a concatenation
    g = block_kv // factors[-1] if factors else block_kv
    kbank, vbank, ids, oks, lasts, biases, off = [], [], [], [], [], [], 0
    for r in factors:
        per = block_kv // r // g  # granules per pooled block
        kr = k.to(cdt).view(B, Nk // r // g, g, r, hkv, D).mean(3)  # (B, Nk/r/g, g, Hkv, D)
        vr = v.to(cdt).view(B, Nk // r // g, g, r, hkv, Dv).mean(3)  # (B, Nk/r/g, g, Hkv, Dv)
        kbank.append(kr.permute(0, 3, 1, 2, 4))  # (B, Hkv, Nk/r/g, g, D)
        vbank.append(vr.permute(0, 3, 1, 2, 4))  # (B, Hkv, Nk/r/g, g, Dv)
        idx, valid = layout_indices(lm == r)  # (B, Hq, nqb, kmax)
        ids.append((off + idx.unsqueeze(-1) * per + torch.arange(per, device=dev)).flatten(-2))  # granule ids
        n_tok = idx.shape[-1] * per * g
        oks.append(valid.unsqueeze(-1).expand(*valid.shape, per * g).flatten(-2))  # (B, Hq, nqb, kmax*per*g)
        # last original token covered by each pooled slot (causal visibility is about the last member)
        lasts.append((idx.unsqueeze(-1) * block_kv + (torch.arange(per * g, device=dev) + 1) * r - 1).flatten(-2))
        biases.append(torch.full((n_tok,), math.log(r), dtype=cdt, device=dev))
        off += nkb * per
    kb = torch.cat(kbank, 2).reshape(-1, g, D)  # (B*Hkv*off, g, D)
    vb = torch.cat(vbank, 2).reshape(-1, g, Dv)  # (B*Hkv*off, g, Dv)
    flat = (b_ar * hkv + kvh) * off + torch.cat(ids, -1)  # (B, Hq, nqb, L/g)
    ok_all = torch.cat(oks, -1)  # (B, Hq, nqb, L)
    last_all = torch.cat(lasts, -1)  # (B, Hq, nqb, L)
    bias = torch.cat(biases)  # (L,)
    L = bias.numel()
    qb = _blocks(q.to(cdt), nqb, block_q)  # (B, Hq, nqb, bq, D)
    per_block = B * hq * L * (block_q + D + Dv) * torch.finfo(cdt).bits // 8
    chunk = max(1, min(nqb, alloc.CHUNK_BYTES // max(per_block, 1)))
    # without autograd the fused SDPA kernel runs on a float mask (ln r where visible, -inf elsewhere);
    # with autograd the explicit softmax of attend_gathered (exact zeros and finite grads on empty rows)
    fused = not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
    outs = []
    for i0 in range(0, nqb, chunk):
        i1 = min(nqb, i0 + chunk)
        c = i1 - i0
        fl = flat[:, :, i0:i1].reshape(-1)
        kg = kb.index_select(0, fl).view(B * hq, c, L, D)  # (B*Hq, c, L, D)
        vg = vb.index_select(0, fl).view(B * hq, c, L, Dv)  # (B*Hq, c, L, Dv)
        allowed = ok_all[:, :, i0:i1].unsqueeze(-2)  # (B, Hq, c, 1, L)
        if causal:
            q_idx = torch.arange(i0 * block_q, i1 * block_q, device=dev).view(c, block_q, 1)
            allowed = allowed & (last_all[:, :, i0:i1].unsqueeze(-2) <= q_idx)  # (B, Hq, c, bq, L)
        allowed = allowed.reshape(B * hq, c, -1, L)
        qc = qb[:, :, i0:i1].reshape(B * hq, c, block_q, D)  # (B*Hq, c, bq, D)
        if fused:
            fmask = torch.where(allowed, bias, float("-inf"))  # (B*Hq, c, bq or 1, L)
            o = F.scaled_dot_product_attention(qc, kg, vg, attn_mask=fmask, scale=scale).nan_to_num_(0.0)
        else:
            o, _ = attend_gathered(qc, kg, vg, allowed, scale, bias)
        outs.append(o.view(B, hq, c, block_q, Dv))
    out = torch.cat(outs, 2).flatten(2, 3)[:, :, :Nq]  # (B, Hq, Nq, Dv)
    return out.permute(0, 2, 1, 3).to(q.dtype)  # (B, Nq, Hq, Dv)



def psa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: PSAConfig = PSAConfig(), *,
                  scale: float | None = None, generator: torch.Generator | None = None,
                  return_levels: bool = False):
    """PSA end to end: sampled importance -> rank-band level map -> pyramid attention.

    Args:
        q, k, v: heads-last as in :func:`pyramid_sparse_attention`. config: :class:`PSAConfig`.
        generator: random sampled offsets for the importance estimate (default strided).

    Returns:
        ``(B, Nq, Hq, Dv)``; with ``return_levels`` also the level map ``(B, Hq, nqb, nkb)``.

    Example:
        >>> q = k = v = torch.randn(1, 1024, 4, 64)
        >>> out = psa_attention(q, k, v, PSAConfig(block_q=128, block_kv=64))
    """
    if not isinstance(config, PSAConfig):
        raise TypeError(f"config must be a PSAConfig, got {type(config).__name__}")
    check_qkv(q, k, v)
    if k.shape[1] % config.block_kv:
        raise ValueError(f"Nk ({k.shape[1]}) must be divisible by block_kv ({config.block_kv})")
    s = psa_importance(q, k, config.block_q, config.block_kv, causal=config.causal, scale=scale, generator=generator)
    lm = psa_level_map(s, config.mask_ratios, causal=config.causal, block_q=config.block_q, block_kv=config.block_kv)
    out = pyramid_sparse_attention(q, k, v, lm, config.block_q, config.block_kv, causal=config.causal, scale=scale)
    return (out, lm) if return_levels else out

